"""How long each start-up phase took: one log line each, a `ready in` line, and a summary.

The summary (JSON, also logged as one `start-up summary:` line) goes to STARTUP_SUMMARY_FILE
when that is set, for benchmarks and dashboards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("worker_vllm.startup")


class StartupPhases:
    def __init__(self) -> None:
        # The interpreter's own start: imports count as a phase too.
        self.process_start = psutil.Process().create_time()
        self.phases: dict[str, float] = {}
        self.details: dict[str, Any] = {}
        self.mark("python and imports", time.time() - self.process_start)

    def mark(self, name: str, seconds: float, detail: str = "") -> None:
        self.phases[name] = round(seconds, 2)
        log.info("start-up: %s took %.2f s%s", name, seconds, f" ({detail})" if detail else "")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.mark(name, time.monotonic() - started)

    def ready(self, engine_phases: dict[str, float], summary_file: str | None) -> dict[str, Any]:
        for name, seconds in engine_phases.items():
            log.info("start-up: vLLM %s took %.2f s", name, seconds)
        total = round(time.time() - self.process_start, 2)
        log.info("ready in %.1f s", total)
        summary = {"ready_seconds": total, "phases": self.phases,
                   "vllm_phases": engine_phases, **self.details}
        log.info("start-up summary: %s", json.dumps(summary))
        if summary_file:
            Path(summary_file).write_text(json.dumps(summary, indent=2) + "\n")
        return summary
