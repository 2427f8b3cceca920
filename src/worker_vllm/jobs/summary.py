"""One summary line per job: route, tokens, time to first token, tokens/s, outcome."""

from __future__ import annotations

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
    batch_waits: list[float] = field(default_factory=list)

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
        waits = sorted(self.batch_waits)
        staleness = f"{waits[int(0.95 * (len(waits) - 1))] * 1000:.0f}ms" if waits else "-"
        # The last message's oldest delta: bounds how long the stream's end waited for it.
        last = f"{self.batch_waits[-1] * 1000:.0f}ms" if self.batch_waits else "-"
        log.info("job done: route=%s outcome=%s prompt_tokens=%s output_tokens=%s ttft=%s "
                 "tok/s=%s yields=%d staleness_p95=%s last_wait=%s time=%.2fs", self.route,
                 outcome, _or_dash(self.prompt_tokens), _or_dash(self.output_tokens), ttft,
                 rate, self.yields, staleness, last, elapsed)


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)
