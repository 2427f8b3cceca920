"""What a worker does once its engine is dead: it must not keep taking work."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from worker_vllm.config.settings import WorkerSettings
from worker_vllm.engine import EngineRunner
from worker_vllm.process_tree import exit_now

log = logging.getLogger("worker_vllm.startup")


def on_engine_death(runner: EngineRunner, settings: WorkerSettings,
                    first: Callable[[str], None] | None = None,
                    exit_after: float | None = 2.0) -> Callable[[str], None]:
    """Once the engine is known dead (the watchdog's verdict, or a caller that found it so)
    `first(reason)` runs once (it closes the job intake, or turns /ping unhealthy) and, unless
    `exit_after` is None, the process exits with code 1 within that many seconds so the
    platform replaces it. Returns the function that reports a death."""
    lock = threading.Lock()
    reported: list[str] = []

    def on_dead(reason: str) -> None:
        with lock:
            if reported:
                return
            reported.append(reason)
        if exit_after is not None:
            log.error("The vLLM engine died (%s); this worker takes no more jobs and exits "
                      "within %.0f s so the platform replaces it", reason, exit_after)
            timer = threading.Timer(exit_after, exit_now, args=(1,))
            timer.daemon = True
            timer.start()
        else:
            log.error("The vLLM engine died (%s)", reason)
        if first is not None:
            first(reason)

    runner.watch(on_dead, probe_every=settings.engine_probe_interval_s,
                 probe_timeout=settings.engine_probe_timeout_s)
    return on_dead
