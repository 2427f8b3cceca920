"""The stop channel of ``EventIntake``: stops seen at once, and kept for jobs not yet seen."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from runpod.http_client import TooManyRequests
from runpod.serverless.modules import rp_job

log = logging.getLogger("worker_vllm.queue.sdk.intake")

# Back-off after a request the platform refused with 429 (the SDK's own figure).
TOO_MANY_REQUESTS_S = 5.0
# How long stop signals for jobs this worker has not seen are remembered.
STOP_MEMORY_S = 3600.0
# Shortest cycle of the stop channel's poll (for a channel that answers without holding).
STOP_POLL_FLOOR_S = 0.2


class StopChannel:
    """Replaces the SDK scaler's stop handling (mixed into ``EventIntake``, which has the
    SDK's ``is_alive``, ``jobs_tasks`` and ``stop_signals_fetcher*``)."""

    stopped_early: dict[str, float]
    jobs_tasks: dict[str, asyncio.Task]
    stop_signals_fetcher: Any
    stop_signals_fetcher_timeout: float

    is_alive: Any

    async def monitor_stop_signals(self, session: Any) -> None:
        """The stop channel's long-poll, polled again at once after it held; the SDK sleeps
        1 s after every empty answer, a window in which stops wait unseen."""
        if self.stop_signals_fetcher is rp_job.get_stop_signals and rp_job._job_stop_url() is None:
            log.warning("No stop channel (job-take URL not in the expected form): jobs cannot "
                        "be cancelled")
            return
        loop = asyncio.get_running_loop()
        while self.is_alive():
            asked = loop.time()
            try:
                async with asyncio.timeout(self.stop_signals_fetcher_timeout):
                    job_ids = await self.stop_signals_fetcher(session)
            except TooManyRequests:
                await asyncio.sleep(TOO_MANY_REQUESTS_S)
                continue
            except TimeoutError:
                continue
            except Exception as exc:
                log.error("Stop channel failed (%s: %s)", type(exc).__name__, exc)
                job_ids = []
            for job_id in job_ids:
                await self.stop_job(job_id)
            # A channel that answers at once is not long-polling: do not spin on it.
            await asyncio.sleep(max(0.0, STOP_POLL_FLOOR_S - (loop.time() - asked)))

    async def stop_job(self, job_id: str) -> bool:
        """Cancel a running job; remember a stop for a job not seen yet (its take may still be
        on its way), so that job is never started."""
        task = self.jobs_tasks.get(job_id)
        if task is not None:
            log.info("Stopping job %s", job_id)
            task.cancel()
            return True
        now = time.monotonic()
        self.stopped_early[job_id] = now
        for old, seen in list(self.stopped_early.items()):
            if now - seen > STOP_MEMORY_S:
                del self.stopped_early[old]
        return False
