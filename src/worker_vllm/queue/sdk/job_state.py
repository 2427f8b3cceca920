"""The runpod SDK's job-state file, made private to this worker process and cheap to keep.

The SDK keeps its in-flight job ids in ``.runpod_jobs.pkl`` in the working directory and takes
no job while that set is full. A worker killed with SIGKILL leaves its ids there, so the next
worker started in the same directory (a restart in the same container) takes nothing; two
workers started from one directory block each other. Each worker process keeps the file in a
directory of its own instead, removed when it exits.

The file is how the SDK's heartbeat process learns the ids (it reads them every
``RUNPOD_PING_INTERVAL``, 10 s by default). The SDK rewrites it on every added or removed job (a
file lock, a pickle of every job in flight with its whole input, a temporary file and a rename:
0.5 ms each with short inputs; 256 jobs with 32,000-character prompts cost the job loop 1.87 s
of CPU, measured with runpod 1.10.0 on a 2-core x86-64 CPU) and reads it back at every job-take
(to say in the take's URL whether jobs are in flight). Here ``JobIds`` keeps the ids in memory
at once and writes the file, ids only, at most once every ``WRITE_INTERVAL_S``, and the job-take
asks this process's own set (``JobListInMemory``): the file is written for the heartbeat alone.
With a handler that does nothing (benchmarks/floor_worker.py) at c64, the file's writes and
reads were 42% of the job loop's py-spy samples, on the same 2-core x86-64 CPU.
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import tempfile
from typing import Any

# How stale the heartbeat's list may be: a tenth of the SDK's default ping interval.
WRITE_INTERVAL_S = 1.0


def use_private_job_state() -> str:
    """Point the SDK's job tracker at a fresh per-process directory, and its job-take at the
    tracker in memory; returns the directory."""
    from runpod.serverless.modules import rp_job
    from runpod.serverless.modules.worker_state import JobsProgress

    directory = tempfile.mkdtemp(prefix="worker-vllm-jobs-")
    JobsProgress._STATE_DIR = directory
    JobsProgress._STATE_FILE = f"{directory}/.runpod_jobs.pkl"
    # The SDK builds its tracker when it is imported, from the old file: start it empty.
    JobsProgress().clear()
    rp_job.job_progress = JobListInMemory(JobsProgress())
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


class JobListInMemory:
    """What the SDK's job-take asks of its tracker (``get_job_list``), answered from this
    process's set: the SDK's own reads the file back first, though this process keeps the set
    (the heartbeat's process, which needs the file, uses the tracker itself)."""

    def __init__(self, progress: Any) -> None:
        self._progress = progress

    def get_job_list(self) -> str | None:
        return ",".join(str(job) for job in self._progress) or None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._progress, name)


class JobIds:
    """The jobs in flight in the SDK's tracker (``JobsProgress``, a set), by id only (the
    heartbeat reports ids; the input stays with the job). The file is written at most once
    every ``WRITE_INTERVAL_S`` however many jobs came or went; ``flush`` writes it now."""

    def __init__(self, progress: Any) -> None:
        from runpod.serverless.modules.worker_state import Job

        self._progress, self._job = progress, Job
        self._write: asyncio.TimerHandle | None = None

    def add(self, job_id: str) -> None:
        set.add(self._progress, self._job(id=job_id))
        self._changed()

    def remove(self, job_id: str) -> None:
        set.discard(self._progress, self._job(id=job_id))
        self._changed()

    def flush(self) -> None:
        """Write the file if it is behind."""
        if self._write is not None:
            self._write.cancel()
            self._write = None
            self._progress._save_state()

    def _changed(self) -> None:
        if self._write is None:
            self._write = asyncio.get_running_loop().call_later(WRITE_INTERVAL_S, self.flush)
