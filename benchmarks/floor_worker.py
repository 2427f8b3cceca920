"""The floor of the full-path benchmark: the runpod SDK's job loop with a handler that does no
work (it yields one constant message per job). No worker on that loop can go faster.

    JOB_INTAKE=events|sdk MAX_CONCURRENCY=64 python benchmarks/floor_worker.py
    (with the platform's RUNPOD_WEBHOOK_* env, as benchmarks/harness.py sets it)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from worker_vllm.queue.sdk.job_loop import serve_jobs  # noqa: E402

CONSTANT = {"choices": [{"tokens": ["constant"]}], "usage": {"input": 1, "output": 1}}


async def handler(job: dict[str, Any]) -> Any:
    yield CONSTANT


if __name__ == "__main__":
    intake = os.environ.get("JOB_INTAKE", "events")
    assert intake in ("events", "sdk"), intake
    serve_jobs(handler, int(os.environ.get("MAX_CONCURRENCY", "64")), intake=intake)  # type: ignore[arg-type]
