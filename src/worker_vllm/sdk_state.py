"""The runpod SDK's job-state file, made private to this worker process.

The SDK keeps its in-flight job ids in ``.runpod_jobs.pkl`` in the working directory and takes
no job while that set is full. A worker killed with SIGKILL leaves its ids there, so the next
worker started in the same directory (a restart in the same container) takes nothing; two
workers started from one directory block each other. Each worker process keeps the file in a
directory of its own instead, removed when it exits.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from typing import Any


def use_private_job_state() -> str:
    """Point the SDK's job tracker at a fresh per-process directory; returns it."""
    from runpod.serverless.modules.worker_state import JobsProgress

    directory = tempfile.mkdtemp(prefix="worker-vllm-jobs-")
    JobsProgress._STATE_DIR = directory
    JobsProgress._STATE_FILE = f"{directory}/.runpod_jobs.pkl"
    # The SDK builds its tracker when it is imported, from the old file: start it empty.
    JobsProgress().clear()
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


class EarlyStops:
    """Stop signals for jobs the SDK had taken but not started yet.

    The SDK starts taken jobs from a loop that wakes every 0.1 s and drops a stop signal for a
    job whose task does not exist yet, so a cancel or timeout landing in that window was lost
    and the job ran to its end. The stop channel's fetcher is wrapped to remember every id it
    hands the SDK; a job starting after its stop ends at once.
    """

    def __init__(self, keep_seconds: float = 3600.0) -> None:
        self.keep_seconds = keep_seconds
        self._ids: dict[str, float] = {}

    async def fetch(self, session: Any) -> list[str]:
        from runpod.serverless.modules.rp_job import get_stop_signals

        ids = await get_stop_signals(session)
        now = time.monotonic()
        for job_id in ids:
            self._ids[str(job_id)] = now
        for job_id, seen in list(self._ids.items()):
            if now - seen > self.keep_seconds:
                del self._ids[job_id]
        return ids

    def stopped(self, job_id: str) -> bool:
        return job_id in self._ids
