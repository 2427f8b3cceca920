"""The runpod SDK's job-state file, made private to this worker process and cheap to keep.

The SDK keeps its in-flight job ids in ``.runpod_jobs.pkl`` in the working directory and takes
no job while that set is full. A worker killed with SIGKILL leaves its ids there, so the next
worker started in the same directory (a restart in the same container) takes nothing; two
workers started from one directory block each other. Each worker process keeps the file in a
directory of its own instead, removed when it exits.

The file is how the SDK's heartbeat process learns the ids, and each job-take reads it back.
The SDK rewrites it on every added or removed job (a file lock, a pickle of every job in flight
with its whole input, a temporary file and a rename: 0.5 ms each with short inputs; 256 jobs
with 32,000-character prompts cost the job loop 1.87 s of CPU, measured with runpod 1.10.0 on
a 2-core x86-64 CPU), so ``JobIds`` keeps the ids in memory at once and writes the file, ids
only, at most once per event-loop iteration and in the step of each job-take that reads it
back (the SDK's take replaces its tracker with the file).
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import tempfile
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


class JobIds:
    """The jobs in flight in the SDK's tracker (``JobsProgress``, a set), by id only (the
    heartbeat reports ids; the input stays with the job). The file is written once per
    event-loop iteration however many jobs came or went in it; ``flush`` writes it now."""

    def __init__(self, progress: Any) -> None:
        from runpod.serverless.modules.worker_state import Job

        self._progress, self._job = progress, Job
        self._pending = False

    def add(self, job_id: str) -> None:
        set.add(self._progress, self._job(id=job_id))
        self._changed()

    def remove(self, job_id: str) -> None:
        set.discard(self._progress, self._job(id=job_id))
        self._changed()

    def flush(self) -> None:
        """Write the file if it is behind: a job-take reads it back into the tracker."""
        if self._pending:
            self._pending = False
            self._progress._save_state()

    def _changed(self) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self.flush)
