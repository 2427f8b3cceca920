"""One summary line per job: route, tokens, time to first token, tokens/s, outcome; and, when
JOB_RECORDS_FILE is set, the same as one JSON line in that file."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("worker_vllm.jobs")


@dataclass
class JobSummary:
    route: str = "-"
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    yields: int = 0
    started: float = field(default_factory=time.monotonic)
    first_output: float | None = None
    # How long the oldest delta of each streamed message waited for it (set by batching).
    flush_waits: list[float] = field(default_factory=list)
    # The engine's own count of unfinished requests once the job's own request has ended.
    engine_requests_running: int | None = None
    # The engine as the job ended (after its latest step): requests waiting in its scheduler,
    # the share of its KV cache in use, its preemptions so far; and the most requests that
    # ran and that waited in it at any step while the job ran.
    engine_requests_waiting: int | None = None
    kv_cache_usage: float | None = None
    engine_preemptions: int | None = None
    engine_requests_running_max: int | None = None
    engine_requests_waiting_max: int | None = None

    def saw(self, item: Any) -> None:
        """Account for one yield (the native output or an OpenAI object carries usage)."""
        self.yields += 1
        if self.first_output is None:
            self.first_output = time.monotonic()
        usage = item.get("usage") if isinstance(item, dict) else None
        if isinstance(usage, dict):
            prompt = usage.get("input", usage.get("prompt_tokens", usage.get("input_tokens")))
            output = usage.get("output", usage.get("completion_tokens",
                                                   usage.get("output_tokens")))
            if isinstance(prompt, int):
                self.prompt_tokens = prompt
            if isinstance(output, int):
                self.output_tokens = output

    def log(self, outcome: str) -> None:
        elapsed = time.monotonic() - self.started
        ttft = (f"{(self.first_output - self.started) * 1000:.0f}ms"
                if self.first_output is not None else "-")
        rate = (f"{self.output_tokens / elapsed:.1f}"
                if self.output_tokens and elapsed > 0 else "-")
        waits = sorted(self.flush_waits)
        staleness = f"{waits[int(0.95 * (len(waits) - 1))] * 1000:.0f}ms" if waits else "-"
        # The last message's oldest delta: bounds how long the stream's end waited for it.
        last = f"{self.flush_waits[-1] * 1000:.0f}ms" if self.flush_waits else "-"
        log.info("job done: route=%s outcome=%s prompt_tokens=%s output_tokens=%s ttft=%s "
                 "tok/s=%s yields=%d staleness_p95=%s last_wait=%s time=%.2fs", self.route,
                 outcome, _or_dash(self.prompt_tokens), _or_dash(self.output_tokens), ttft,
                 rate, self.yields, staleness, last, elapsed)


    def engine_load(self, load: Any, watch: Any) -> None:
        """The engine's state as the job ended (an ``EngineLoad``) and while it ran (the
        ``LoadWatch`` that followed it)."""
        self.engine_requests_waiting, self.kv_cache_usage = load.waiting, load.kv_usage
        self.engine_preemptions = load.preempted
        self.engine_requests_running_max = watch.running_max
        self.engine_requests_waiting_max = watch.waiting_max

    def record(self, path: str, job_id: str, outcome: str) -> None:
        """Append the job's record to `path` (one JSON line; one write, so lines of
        concurrent jobs never interleave)."""
        line = json.dumps({
            "id": job_id, "route": self.route, "outcome": outcome,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "yields": self.yields, "seconds": round(time.monotonic() - self.started, 3),
            "engine_requests_running": self.engine_requests_running,
            "engine_requests_waiting": self.engine_requests_waiting,
            "engine_requests_running_max": self.engine_requests_running_max,
            "engine_requests_waiting_max": self.engine_requests_waiting_max,
            "kv_cache_usage": None if self.kv_cache_usage is None
            else round(self.kv_cache_usage, 4),
            "engine_preemptions": self.engine_preemptions,
        }) + "\n"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:
            log.warning("Cannot write the job record to %s: %s", path, exc)


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)
