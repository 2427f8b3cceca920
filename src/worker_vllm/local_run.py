"""Local test mode: run one job from --test_input or test_input.json and print its result.

The SDK's own local mode does not run async-generator handlers (it prints the generator object
and exits 0), so the worker runs the job itself, the way the platform would, and prints the
aggregated output as JSON. The exit code is 1 when the job fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from worker_vllm.errors import InvalidInput, WorkerError, error_result


def read_test_job(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--test_input", default=None)
    args, _ = parser.parse_known_args(argv)
    try:
        if args.test_input is not None:
            job = json.loads(args.test_input)
        elif Path("test_input.json").is_file():
            job = json.loads(Path("test_input.json").read_text())
        else:
            raise InvalidInput("No job given: pass --test_input '{\"input\": {...}}' or put a "
                               "test_input.json in the working directory")
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"The test input is not valid JSON: {exc}") from None
    if not isinstance(job, dict) or "input" not in job:
        raise InvalidInput('The test input must be an object with an "input" field')
    job.setdefault("id", "local-test")
    return job


async def collect(handle: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Aggregate a job's yields as the platform does with return_aggregate_stream."""
    outputs = []
    async for item in handle(job):
        if isinstance(item, dict) and item.get("error"):
            return {"id": job["id"], "status": "FAILED", "error": item["error"]}
        outputs.append(item)
    return {"id": job["id"], "status": "COMPLETED", "output": outputs}


def print_result(result: dict[str, Any]) -> int:
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0 if result["status"] == "COMPLETED" else 1


def fail(job_id: str, exc: WorkerError) -> int:
    return print_result({"id": job_id, "status": "FAILED", **error_result(exc)})


def run_job(handle: Any, job: dict[str, Any]) -> int:
    return print_result(asyncio.run(collect(handle, job)))
