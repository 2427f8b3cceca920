"""The job handler: one validated request in, a stream of results or ONE error shape out."""

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
from worker_vllm.jobs.batching import BatchPolicy, batch_waits
from worker_vllm.jobs.limits import check_openai_body, check_size
from worker_vllm.jobs.native import build_sampling_params, field_named_in, run_native
from worker_vllm.jobs.shapes import (
    BatchOverrides,
    JobInput,
    NativeInput,
    OpenAIInput,
    RouteInput,
    parse_job_input,
)
from worker_vllm.jobs.summary import JobSummary
from worker_vllm.jobs.vllm_app import run_route
from worker_vllm.logs import job_id_var

log = logging.getLogger(__name__)


def batch_policy(settings: WorkerSettings, overrides: BatchOverrides) -> BatchPolicy:
    return BatchPolicy(
        max_size=overrides.max_batch_size or settings.default_batch_size,
        min_size=overrides.min_batch_size or settings.default_min_batch_size,
        growth=overrides.batch_size_growth_factor or settings.default_batch_size_growth_factor,
        flush_interval=settings.stream_flush_interval_ms / 1000,
    )


def prevalidate(raw_input: Any) -> None:
    """Checks that need no engine (used to fail fast before the engine starts)."""
    inp = parse_job_input(raw_input)
    if isinstance(inp, NativeInput):
        build_sampling_params(inp)


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
        message = str(exc)
        param = getattr(exc, "parameter", None) or field_named_in(message,
                                                                  sampling_param_names())
        return InvalidInput(message, param=f"sampling_params.{param}" if param else None)
    return exc


def _close_if_abandoned(results: Any) -> None:
    """Close a job's result generator that its (now finished) task left suspended."""
    if results.ag_frame is not None and not results.ag_running:
        asyncio.get_running_loop().create_task(results.aclose())


class Worker:
    """Routes jobs to the engine. One instance per process, built before the job loop."""

    def __init__(self, runner: EngineRunner, settings: WorkerSettings,
                 app: VLLMApp | None = None, chat_template: str | None = None,
                 concurrency: int = 1) -> None:
        self.runner = runner
        self.settings = settings
        self.app = app
        # Jobs the job loop may run at once (MAX_CONCURRENCY, or the engine's capacity).
        self.concurrency = concurrency
        # Told once a job finds the engine dead (production: closes the job intake).
        self.on_engine_dead: Callable[[str], None] | None = None
        # The --chat-template text (read once from a file if it named one).
        self.chat_template = chat_template

    def close(self) -> None:
        """Shut the engine down (vLLM's app holds the engine too: drop it first)."""
        self.app = None
        self.runner.shutdown()

    async def handle(self, job: dict[str, Any]) -> AsyncIterator[Any]:
        """The job's results. Stopping it, however it happens, aborts the engine request.

        The SDK cancels a job's task; when that lands while the task awaits the SDK's own
        stream POST (between two of our yields), the cancellation never enters this generator
        and the generator is only closed when garbage-collected, leaving vLLM generating. So
        the end of the task that drives us closes the generator (and its engine request) too.
        """
        job_id = str(job.get("id") or "local")
        job_id_var.set(job_id)
        summary = JobSummary()
        batch_waits.set(summary.batch_waits)
        results = self._results(job_id, job.get("input"), summary)
        owner = asyncio.current_task()
        if owner is not None:
            owner.add_done_callback(lambda _task: _close_if_abandoned(results))
        outcome = "stopped"
        try:
            async with contextlib.aclosing(results):
                async for item in results:
                    if isinstance(item, dict) and item.get("error"):
                        outcome = f"failed:{item['error'].get('type', 'error')}"
                    else:
                        summary.saw(item)
                    yield item
            if outcome == "stopped":
                outcome = "completed"
        finally:
            summary.log(outcome)

    def _request(self, raw_input: Any) -> JobInput:
        """The validated request, within this worker's limits (nothing reaches the engine)."""
        check_size(self.settings, raw_input)
        inp = parse_job_input(raw_input)
        if isinstance(inp, OpenAIInput):
            check_openai_body(self.settings, inp.openai_input)
        elif isinstance(inp, RouteInput) and isinstance(inp.body, dict):
            # Route jobs reach the same generating routes: the same limits bound them.
            check_openai_body(self.settings, inp.body, prefix="body.")
        return inp

    def _route(self, inp: JobInput, job_id: str, summary: JobSummary) -> AsyncIterator[Any]:
        policy = batch_policy(self.settings, inp)
        if not isinstance(inp, NativeInput):
            if self.app is None:
                raise InvalidInput("Route jobs are not available", param="route")
            summary.route = inp.openai_route if isinstance(inp, OpenAIInput) else inp.route
            return run_route(self.app, inp, policy, job_id, self.settings.raw_openai_output)
        summary.route = "native" + ("/stream" if inp.stream else "")
        if self.settings.log_job_text:
            log.info("input: %s", inp.prompt if inp.prompt is not None else inp.messages)
        try:
            lora = self.app.lora_request(inp.model) if self.app else None
        except LookupError as exc:
            raise InvalidInput(str(exc.args[0]), param="model", code=404) from None
        return run_native(self.runner, inp, job_id, policy, lora, self.chat_template,
                          self.settings)

    async def _results(self, job_id: str, raw_input: Any, summary: JobSummary
                       ) -> AsyncIterator[Any]:
        try:
            items = self._route(self._request(raw_input), job_id, summary)
            # aclosing: closing this generator closes the route's, which aborts the request.
            async with contextlib.aclosing(items):
                async for item in items:
                    yield item
        except (asyncio.CancelledError, GeneratorExit):
            # The engine request was aborted on the way out; report what the engine says.
            running = await self.runner.num_unfinished_requests()
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
