"""Entry point of the worker: `python src/handler.py`.

On RunPod (the platform's webhooks are set) it serves jobs through the runpod SDK's job loop.
Locally it runs one job from `--test_input '{...}'` or `test_input.json` and prints the result.
"""

from __future__ import annotations

import logging
import os
import sys

from worker_vllm.logs import setup_logging

setup_logging()
log = logging.getLogger("worker_vllm.handler")


def main() -> int:
    from worker_vllm import local_run
    from worker_vllm.errors import WorkerError
    from worker_vllm.startup import build_worker, exit_when_engine_dies, is_production
    from worker_vllm.worker import prevalidate

    local = not is_production(os.environ) or "--test_input" in " ".join(sys.argv)
    job = None
    try:
        if local:
            job = local_run.read_test_job(sys.argv[1:])
            prevalidate(job["input"])  # fail fast, before the engine starts
        worker = build_worker()
    except WorkerError as exc:
        log.error("%s", exc.message)
        return local_run.fail(job["id"] if job else "local-test", exc) if local else 1

    async def handler(job: dict):
        async for item in worker.handle(job):
            yield item

    if local:
        assert job is not None
        code = local_run.run_job(handler, job)
        worker.close()
        return code

    import runpod

    async def engine_is_healthy() -> None:
        await worker.runner.check_health()

    runpod.serverless.register_fitness_check(engine_is_healthy)
    exit_when_engine_dies(worker.runner)
    max_concurrency = worker.settings.max_concurrency
    runpod.serverless.start(
        {
            "handler": handler,
            # Must be constant: a changing value stalls the SDK's job intake.
            "concurrency_modifier": lambda _current: max_concurrency,
            "return_aggregate_stream": True,
        }
    )
    return 0


# vLLM spawns its engine core with multiprocessing "spawn", which re-imports __main__:
# without this guard the child would build a second engine.
if __name__ == "__main__":
    sys.exit(main())
