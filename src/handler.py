"""Entry point of the worker: `python src/handler.py`.

On RunPod (the platform's webhooks are set) it serves jobs through the runpod SDK's job loop.
Locally it runs one job from `--test_input '{...}'` or `test_input.json` and prints the result.
"""

from __future__ import annotations

import logging
import os
import sys

# huggingface_hub reads this at import: use its high-throughput (Xet) transfer for downloads.
os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")

from typing import TYPE_CHECKING

from worker_vllm.errors import WorkerError
from worker_vllm.logs import setup_logging

if TYPE_CHECKING:
    from worker_vllm.jobs.dispatch import Worker

setup_logging()
log = logging.getLogger("worker_vllm.handler")


SDK_TEST_SERVER = ("--rp_serve_api (the runpod SDK's local test server) is not how this worker "
                   "is tried locally: that server differs from the platform (no /cancel, "
                   "/stream returns at the end, generator errors become HTTP 500). Run "
                   "`python src/local_endpoint.py` instead: RunPod's endpoint API on localhost "
                   "with this worker, unmodified, behind it (see the README).")


def main() -> int:
    if any(arg.startswith("--rp_serve_api") for arg in sys.argv[1:]):
        log.error("%s", SDK_TEST_SERVER)
        return 2
    from worker_vllm import local_run
    from worker_vllm.errors import InvalidInput
    from worker_vllm.jobs.dispatch import prevalidate
    from worker_vllm.process_tree import end_children
    from worker_vllm.startup.build import build_worker, is_production, startup_error

    local = not is_production(os.environ) or "--test_input" in " ".join(sys.argv)
    job = None
    try:
        if local:
            job = local_run.read_test_job(sys.argv[1:])
            prevalidate(job["input"])  # fail fast, before the engine starts
        worker = build_worker(read_engine_log=True)
    except InvalidInput as exc:
        log.error("%s", exc.message)
        return local_run.fail(job["id"] if job else "local-test", exc)
    except Exception as exc:
        error = startup_error(exc)
        log.error("Start-up failed: %s", error.message)
        end_children()  # an engine core that half started
        if local:
            return local_run.fail(job["id"] if job else "local-test", error)
        return serve_startup_error(error)
    if local:
        assert job is not None
        code = local_run.run_job(worker.handle, job)
        worker.close()
        return code
    return serve_worker(worker)


def serve_worker(worker: Worker) -> int:
    """Production: the SDK's job loop until SIGTERM (exit 0) or the engine's death (exit 1)."""
    from worker_vllm.process_tree import end_children, exit_now
    from worker_vllm.sdk.intake import IntakeGate
    from worker_vllm.sdk.job_loop import serve_jobs
    from worker_vllm.startup.build import exit_when_engine_dies

    gate = IntakeGate()
    worker.on_engine_dead = exit_when_engine_dies(worker.runner, worker.settings, gate.close)

    async def handler(job: dict):
        async for item in worker.handle(job):
            yield item

    async def engine_is_healthy() -> None:
        await worker.runner.check_health()

    try:
        serve_jobs(handler, worker.concurrency, intake=worker.settings.job_intake, gate=gate,
                   fitness_check=engine_is_healthy)
    finally:
        if gate.closed is not None:
            exit_now(1)  # the engine is dead: no clean shutdown to wait for
        worker.close()
        end_children()
    return 0


def serve_startup_error(error: WorkerError) -> int:
    """Keep the worker up and end every job FAILED with the start-up error: the user sees the
    cause in the first job's output and the queue drains, instead of the platform restarting
    workers that fail the same way (each start billed). ON_STARTUP_ERROR=exit exits instead."""
    from worker_vllm.errors import error_result
    from worker_vllm.sdk.job_loop import serve_jobs
    from worker_vllm.startup.build import startup_failure_action

    if startup_failure_action(os.environ) == "exit":
        return 1
    log.error("Every job will fail with this error; fix the setting and redeploy "
              "(ON_STARTUP_ERROR=exit makes the worker exit instead)")

    async def failing_handler(job: dict):
        yield error_result(error)

    serve_jobs(failing_handler, 30)
    return 0


# vLLM spawns its engine core with multiprocessing "spawn", which re-imports __main__:
# without this guard the child would build a second engine.
if __name__ == "__main__":
    sys.exit(main())
