"""The queue front-end: RunPod's job queue through the runpod SDK, or one local test job.

On RunPod (the platform's webhooks are set) it serves jobs through the SDK's job loop.
Locally it runs one job from `--test_input '{...}'` or `test_input.json` and prints the result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from worker_vllm import local_run
from worker_vllm.config.settings import WorkerSettings, load_worker_settings
from worker_vllm.engine import EngineRunner, freeze_vllm_env
from worker_vllm.errors import InvalidInput, WorkerError, error_result
from worker_vllm.jobs.dispatch import JobHandler
from worker_vllm.jobs.validate import validate_job
from worker_vllm.process_tree import end_children, exit_now
from worker_vllm.queue.admission import Admission, FixedAdmission, rule
from worker_vllm.queue.sdk.intake import IntakeGate
from worker_vllm.queue.sdk.job_loop import serve_jobs
from worker_vllm.startup.build import Core, build_core, is_production
from worker_vllm.startup.engine_death import on_engine_death
from worker_vllm.startup.errors import StartupFailure, startup_failure_action

log = logging.getLogger("worker_vllm.handler")


def serve_queue(argv: list[str], env: Mapping[str, str]) -> int:
    """The process's exit code."""
    if not is_production(env) or "--test_input" in " ".join(argv):
        return run_local(argv, env)
    try:
        core = build_core(env, read_engine_log=True)
    except StartupFailure as exc:
        return serve_startup_error(_reported(exc), env)
    return serve_until_stopped(core)


def run_local(argv: list[str], env: Mapping[str, str]) -> int:
    """One job, checked before the engine starts (a bad input fails fast)."""
    job_id = "local-test"
    try:
        job = local_run.read_test_job(argv)
        job_id = job["id"]
        validate_job(job["input"], load_worker_settings(dict(env)))
        core = build_core(env, read_engine_log=True)
    except InvalidInput as exc:
        log.error("%s", exc.message)
        return local_run.fail(job_id, exc)
    except (StartupFailure, WorkerError) as exc:
        failure = exc if isinstance(exc, StartupFailure) else StartupFailure(exc)
        return local_run.fail(job_id, _reported(failure))
    job_admission(core.settings, core.runner)  # logged: what the deployed worker would do
    jobs = JobHandler(core.runner, core.settings, core.app, core.chat_template)
    code = local_run.run_job(jobs.handle, job)
    core.close()
    return code


def _reported(failure: StartupFailure) -> WorkerError:
    error = failure.error()
    log.error("Start-up failed: %s", error.message)
    end_children()  # an engine core that half started
    return error


def serve_until_stopped(core: Core) -> int:
    """Production: the SDK's job loop until SIGTERM (exit 0) or the engine's death (exit 1)."""
    freeze_vllm_env()
    admission = job_admission(core.settings, core.runner)
    jobs = JobHandler(core.runner, core.settings, core.app, core.chat_template,
                      on_results_end=admission.jobs.results_ended)
    gate = IntakeGate()
    jobs.on_engine_dead = on_engine_death(core.runner, core.settings, gate.close)

    async def handler(job: dict):
        async for item in jobs.handle(job):
            yield item

    async def engine_is_healthy() -> None:
        await core.runner.check_health()

    try:
        serve_jobs(handler, admission.limit, intake=core.settings.job_intake, gate=gate,
                   fitness_check=engine_is_healthy, admission=admission,
                   loop=core.runner.loop.loop)
    finally:
        if gate.closed is not None:
            exit_now(1)  # the engine is dead: no clean shutdown to wait for
        core.close()
        end_children()
    return 0


def serve_startup_error(error: WorkerError, env: Mapping[str, str]) -> int:
    """Keep the worker up and end every job FAILED with the start-up error: the user sees the
    cause in the first job's output and the queue drains, instead of the platform restarting
    workers that fail the same way (each start billed). ON_STARTUP_ERROR=exit exits instead."""
    if startup_failure_action(env) == "exit":
        return 1
    log.error("Every job will fail with this error; fix the setting and redeploy "
              "(ON_STARTUP_ERROR=exit makes the worker exit instead)")

    async def failing_handler(job: dict):
        yield error_result(error)

    serve_jobs(failing_handler, 30)
    return 0


def job_admission(settings: WorkerSettings, runner: EngineRunner
                  ) -> Admission | FixedAdmission:
    """Jobs are taken as the engine's load allows (``worker_vllm.queue.admission``), up to
    MAX_NUM_SEQS or MAX_CONCURRENCY; JOB_ADMISSION=fixed and the SDK's own intake
    (JOB_INTAKE=sdk) keep MAX_CONCURRENCY jobs at once (MAX_NUM_SEQS when it is unset), as
    set: jobs beyond MAX_NUM_SEQS then wait inside the engine, which the log says."""
    capacity = runner.capacity()
    cap = settings.max_concurrency
    if settings.job_admission == "fixed" or settings.job_intake == "sdk":
        limit = cap if cap is not None else capacity.max_num_seqs
        log.info("Job concurrency: %d jobs at once (%s; JOB_ADMISSION=%s, JOB_INTAKE=%s)",
                 limit, "MAX_CONCURRENCY" if cap is not None else "MAX_NUM_SEQS",
                 settings.job_admission, settings.job_intake)
        if limit > capacity.max_num_seqs:
            log.warning("MAX_CONCURRENCY=%d is above the engine's MAX_NUM_SEQS=%d: up to %d "
                        "jobs' requests wait inside the engine instead of in the platform's "
                        "queue", limit, capacity.max_num_seqs, limit - capacity.max_num_seqs)
        return FixedAdmission(limit)
    admission = Admission(capacity, cap)
    runner.loads.follow(admission)
    if cap is not None and cap > capacity.max_num_seqs:
        log.warning("MAX_CONCURRENCY=%d is above the engine's MAX_NUM_SEQS=%d, which bounds "
                    "the jobs taken (JOB_ADMISSION=fixed takes %d)", cap,
                    capacity.max_num_seqs, cap)
    log.info("Job intake: jobs are taken while the engine can start them (%s); up to %d at "
             "once (%s)", rule(admission),
             admission.limit, admission.limit_reason)
    return admission
