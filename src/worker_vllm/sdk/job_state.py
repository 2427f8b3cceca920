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
