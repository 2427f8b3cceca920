"""Where the job loop runs: the SDK's ``JobScaler.start`` runs it under ``asyncio.run`` in the
main thread; given the engine's loop, it runs there instead."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import sys
from typing import Any

from runpod.serverless.modules import rp_scale

from worker_vllm.loop_thread import wait_handling_signals


class StartOnLoop:
    """Mixed into ``EventIntake`` before the SDK's ``JobScaler``: its ``start``, with the job
    loop on ``config["job_loop"]`` (a running loop on another thread) when one is given.

    On the engine's loop, a job's messages (vLLM's outputs, its app's SSE events) reach the
    job loop with no crossing between threads, and one loop wakes per engine step where two
    did. vLLM's own API server likewise answers its requests on its engine client's loop."""

    config: dict[str, Any]
    handle_shutdown: Any
    run: Any

    def start(self) -> None:
        loop: asyncio.AbstractEventLoop | None = self.config.get("job_loop")
        if loop is None:
            super().start()  # type: ignore[misc]
            return
        # What the SDK's start does before its asyncio.run (tests/test_sdk_intake.py checks).
        sys.excepthook = rp_scale._handle_uncaught_exception
        signal.signal(signal.SIGTERM, self.handle_shutdown)
        signal.signal(signal.SIGINT, self.handle_shutdown)
        done = asyncio.run_coroutine_threadsafe(self.run(), loop)
        wait_handling_signals(lambda timeout: bool(concurrent.futures.wait([done], timeout).done))
        done.result()  # raises what the job loop raised
