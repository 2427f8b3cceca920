"""The runpod SDK's job loop, as the worker runs it in production."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from worker_vllm.queue.admission import Admission, FixedAdmission
from worker_vllm.queue.sdk.intake import IntakeGate, install
from worker_vllm.queue.sdk.job_state import use_private_job_state
from worker_vllm.queue.sdk.results import handle_job


def serve_jobs(handler: Callable[[dict[str, Any]], AsyncIterator[Any]], concurrency: int, *,
               intake: Literal["events", "sdk"] = "events", gate: IntakeGate | None = None,
               fitness_check: Callable[[], Awaitable[None]] | None = None,
               admission: Admission | FixedAdmission | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Run ``runpod.serverless.start`` until SIGTERM or until ``gate`` closes.

    ``intake="events"`` takes jobs through ``EventIntake``, as many as ``admission`` says (or
    ``concurrency`` at once without it); ``"sdk"`` keeps the SDK's own polling intake with
    ``concurrency`` jobs at once (its 1 s and 0.1 s waits; no gate, stops before start are
    lost). ``loop``: the engine's running loop (on its own thread), where the events intake
    then runs the job loop.
    """
    import runpod
    from runpod.serverless.modules import rp_scale

    use_private_job_state()
    if fitness_check is not None:
        runpod.serverless.register_fitness_check(fitness_check)
    config: dict[str, Any] = {
        "handler": handler,
        # Must be constant: a changing value stalls the SDK's job intake.
        "concurrency_modifier": lambda _current: concurrency,
        # The job's messages streamed and returned as its result within the platform's
        # limits (the SDK's own handle_job with return_aggregate_stream, weighed).
        "jobs_handler": handle_job,
    }
    if intake == "events":
        install()  # reads config["jobs_handler"]
        config["intake_gate"] = gate if gate is not None else IntakeGate()
        config["admission"] = admission
        config["job_loop"] = loop
    else:
        # The SDK's own scaler reads config["jobs_handler"] in local test mode only: in
        # production it takes rp_scale's handle_job.
        rp_scale.handle_job = handle_job
    # As vllm serve does once started: the start-up heap (the SDK's, vLLM's and torch's modules,
    # 627,000 objects) out of the garbage collector's reach; a full collection of it, set off by
    # decoding a 126 KB batch input, stopped the job loop for 0.28 s (measured in isolation on a
    # 2-core x86-64 CPU).
    gc.collect()
    gc.freeze()
    runpod.serverless.start(config)
