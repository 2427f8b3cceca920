"""The job handler: one validated job in, a stream of results or ONE error shape out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from worker_vllm.config.settings import WorkerSettings
from worker_vllm.engine import (
    EngineDeadError,
    EngineGenerateError,
    EngineRunner,
    VLLMApp,
    VLLMClientError,
    sampling_param_names,
)
from worker_vllm.errors import EngineUnavailable, InvalidInput, WorkerError, error_result
from worker_vllm.jobs.batch.job import run_batch
from worker_vllm.jobs.flush import FlushPolicy, flush_waits
from worker_vllm.jobs.native import run_native
from worker_vllm.jobs.shapes import (
    BatchInput,
    FlushOverrides,
    NativeInput,
    OpenAIInput,
    RouteInput,
)
from worker_vllm.jobs.summary import JobSummary
from worker_vllm.jobs.validate import ValidJob, invalid_sampling, validate_job
from worker_vllm.jobs.vllm_app import run_route
from worker_vllm.logs import job_id_var

log = logging.getLogger(__name__)


def flush_policy(settings: WorkerSettings, overrides: FlushOverrides) -> FlushPolicy:
    return FlushPolicy(
        max_size=overrides.max_batch_size or settings.default_batch_size,
        min_size=overrides.min_batch_size or settings.default_min_batch_size,
        growth=overrides.batch_size_growth_factor or settings.default_batch_size_growth_factor,
        flush_interval=settings.stream_flush_interval_ms / 1000,
        messages_per_s=settings.stream_messages_per_s,
    )


ENGINE_GONE = "The engine has stopped; this worker is being replaced"


def as_worker_error(exc: BaseException) -> BaseException:
    if isinstance(exc, WorkerError):
        return exc
    if isinstance(exc, EngineDeadError):
        return EngineUnavailable(ENGINE_GONE)
    if isinstance(exc, EngineGenerateError):
        return WorkerError(f"The engine failed this request ({exc}); other jobs are unaffected",
                           type="engine_error", code=500)
    if isinstance(exc, (VLLMClientError, ValueError)):
        # vLLM checks a request against the model (vocabulary, logprob limits, schemas) as it
        # is added and raises ValueError subclasses with messages meant for the client.
        return invalid_sampling(exc, sampling_param_names(), fallback=None)
    return exc


def _close_if_abandoned(results: Any) -> None:
    """Close a job's result generator that its (now finished) task left suspended."""
    if results.ag_frame is not None and not results.ag_running:
        asyncio.get_running_loop().create_task(results.aclose())


def app_job(app: VLLMApp | None, inp: OpenAIInput | RouteInput | BatchInput,
            settings: WorkerSettings, policy: FlushPolicy, job_id: str, summary: JobSummary
            ) -> AsyncIterator[Any]:
    """The results of a job that vLLM's app answers: a route, or a batch of them."""
    if app is None:
        raise InvalidInput("Route and batch jobs are not available", param="route")
    if isinstance(inp, BatchInput):
        summary.route = "batch" + ("/stream" if inp.stream else "")
        return run_batch(app, inp, settings, job_id, policy)
    summary.route = inp.openai_route if isinstance(inp, OpenAIInput) else inp.route
    return run_route(app, inp, policy, job_id, settings.raw_openai_output)


class JobHandler:
    """Validates jobs and routes them to the engine or vLLM's app. One per process."""

    def __init__(self, runner: EngineRunner, settings: WorkerSettings,
                 app: VLLMApp | None = None, chat_template: str | None = None,
                 on_results_end: Callable[[str], None] | None = None) -> None:
        self.runner = runner
        self.settings = settings
        self.app = app
        # Told once a job finds the engine dead (production: closes the job intake).
        self.on_engine_dead: Callable[[str], None] | None = None
        # Told of a job's id once its results have ended (production: the admission's jobs).
        self.on_results_end = on_results_end
        # The --chat-template text (read once from a file if it named one).
        self.chat_template = chat_template

    async def handle(self, job: dict[str, Any]) -> AsyncIterator[Any]:
        """The job's results. Stopping it, however it happens, aborts the engine request.

        The SDK cancels a job's task; when that lands while the task awaits the SDK's own
        stream POST (between two of our yields), the cancellation never enters this generator
        and the generator is only closed when garbage-collected, leaving vLLM generating. So
        the end of the task that drives us closes the results (and their engine request) too;
        whoever closes them first, their close writes the job's summary and record.
        """
        job_id = str(job.get("id") or "local")
        job_id_var.set(job_id)
        summary = JobSummary()
        flush_waits.set(summary.flush_waits)
        results = self._tracked(job_id, job.get("input"), summary)
        owner = asyncio.current_task()
        if owner is not None:
            owner.add_done_callback(lambda _task: _close_if_abandoned(results))
        try:
            async for item in results:
                yield item
        finally:
            if results.ag_frame is not None and not results.ag_running:
                await results.aclose()

    async def _tracked(self, job_id: str, raw_input: Any, summary: JobSummary
                       ) -> AsyncIterator[Any]:
        """The job's results; once they end, however, its summary line and record."""
        outcome = "stopped"
        with self.runner.loads.watching() as load:
            try:
                async with contextlib.aclosing(self._results(job_id, raw_input, summary)) \
                        as results:
                    async for item in results:
                        if isinstance(item, dict) and item.get("error"):
                            outcome = f"failed:{item['error'].get('type', 'error')}"
                        else:
                            summary.saw(item)
                        yield item
                if outcome == "stopped":
                    outcome = "completed"
                if self.settings.job_records_file:
                    # The record of a job that ended on its own carries the engine's count.
                    summary.engine_requests_running = \
                        await self.runner.num_unfinished_requests()
            finally:
                if self.on_results_end is not None:
                    self.on_results_end(job_id)
                summary.log(outcome)
                if self.settings.job_records_file:
                    summary.engine_load(self.runner.loads.latest, load)
                    summary.record(self.settings.job_records_file, job_id, outcome)

    def _route(self, job: ValidJob, job_id: str, summary: JobSummary) -> AsyncIterator[Any]:
        inp = job.input
        policy = flush_policy(self.settings, inp)
        if not isinstance(inp, NativeInput):
            return app_job(self.app, inp, self.settings, policy, job_id, summary)
        summary.route = "native" + ("/stream" if inp.stream else "")
        if self.settings.log_job_text:
            log.info("input: %s", inp.prompt if inp.prompt is not None else inp.messages)
        try:
            lora = self.app.lora_request(inp.model) if self.app else None
        except LookupError as exc:
            raise InvalidInput(str(exc.args[0]), param="model", code=404) from None
        return run_native(self.runner, inp, job.sampling, job_id, policy, lora,
                          self.chat_template)

    async def _results(self, job_id: str, raw_input: Any, summary: JobSummary
                       ) -> AsyncIterator[Any]:
        try:
            items = self._route(validate_job(raw_input, self.settings), job_id, summary)
            # aclosing: closing this generator closes the route's, which aborts the request.
            async with contextlib.aclosing(items):
                async for item in items:
                    yield item
        except (asyncio.CancelledError, GeneratorExit):
            # The engine request was aborted on the way out; report what the engine says.
            running = await self.runner.num_unfinished_requests()
            summary.engine_requests_running = running
            log.info("job stopped; engine requests still running: %d", running)
            raise
        except Exception as exc:
            mapped = self._engine_gone(as_worker_error(exc))
            if isinstance(mapped, WorkerError):
                log.warning("job failed: %s", mapped.message)
            else:
                log.exception("job failed with an internal error")
            yield error_result(mapped)

    def _engine_gone(self, error: BaseException) -> BaseException:
        """A server-side failure with the engine dead is the engine's death, whatever vLLM's
        layer reported (its app answers 500 "EngineCore encountered an issue"); the first
        job to see it closes the intake."""
        if isinstance(error, WorkerError) and error.code < 500:
            return error
        if not (isinstance(error, EngineUnavailable) or self.runner.errored):
            return error
        if self.on_engine_dead is not None:
            self.on_engine_dead("a job found the vLLM engine dead")
        return error if isinstance(error, EngineUnavailable) else EngineUnavailable(ENGINE_GONE)
