"""The only module that imports vLLM beyond its top-level package.

vLLM's internal API moves between releases; a vLLM upgrade should touch this file only.

The engine lives on its own thread with its own event loop. The runpod SDK runs each phase
(fitness checks, the job loop, local test mode) under a fresh ``asyncio.run``; vLLM's
``AsyncLLM`` binds its output-handler task to the loop of its first request, so an engine
shared between loops would break after the warm-up. Callers in any loop reach the engine
through ``call`` / ``stream``, which cost one thread-safe hand-off per engine output.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()

__all__ = [
    "EngineDeadError",
    "EngineGenerateError",
    "EngineRunner",
    "VLLMClientError",
    "make_sampling_params",
]


def make_sampling_params(params: dict[str, Any], *, stream: bool) -> SamplingParams:
    """SamplingParams from a job's dict; raises TypeError/ValueError/VLLMClientError if invalid."""
    params = dict(params)
    structured = params.get("structured_outputs")
    if isinstance(structured, dict):
        params["structured_outputs"] = StructuredOutputsParams(**structured)
    # DELTA streams carry only new text, decoded by vLLM's incremental detokenizer, so a
    # multi-byte character is never split; FINAL_ONLY skips per-step outputs when not streaming.
    params["output_kind"] = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    return SamplingParams(**params)


class EngineRunner:
    """An AsyncLLMEngine on a private thread and event loop, usable from any other loop."""

    def __init__(self, engine_args: dict[str, Any]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-engine-loop", daemon=True
        )
        self._thread.start()
        args = AsyncEngineArgs(**engine_args)
        try:
            self.engine = self._submit(self._build(args)).result()
        except BaseException:
            self._stop_loop()
            raise
        self.model_config = self.engine.model_config
        self.max_model_len: int = self.model_config.max_model_len
        self.served_model_names: list[str] = list(
            self.model_config.served_model_name
            if isinstance(self.model_config.served_model_name, list)
            else [self.model_config.served_model_name]
        )

    @staticmethod
    async def _build(args: AsyncEngineArgs) -> Any:
        return AsyncLLMEngine.from_engine_args(args)

    def _submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    # ----- bridging into the engine loop -------------------------------------------------
    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await `make()` on the engine loop; cancelling the caller cancels it there."""

        async def run() -> T:
            return await make()

        return await asyncio.wrap_future(self._submit(run()))

    async def stream(self, make: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
        """Iterate `make()` on the engine loop and relay its items to the caller's loop.

        Closing or cancelling the consumer cancels the producer on the engine loop (vLLM then
        aborts the request) and waits until that has happened before returning.
        """
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()

        def put(item: Any, exc: BaseException | None = None) -> None:
            caller.call_soon_threadsafe(queue.put_nowait, (item, exc))

        async def pump() -> None:
            try:
                async for item in make():
                    put(item)
            except BaseException as exc:  # CancelledError too: the consumer must hear of it
                put(_DONE, exc)
                raise
            put(_DONE)

        future = self._submit(pump())
        finished = False
        try:
            while True:
                item, exc = await queue.get()
                if item is _DONE:
                    finished = True
                    if exc is not None and not isinstance(exc, asyncio.CancelledError):
                        raise exc
                    return
                yield item
        finally:
            if not finished:
                future.cancel()
                await self._drain_until_done(queue)

    @staticmethod
    async def _drain_until_done(queue: asyncio.Queue, limit: float = 10.0) -> None:
        """Wait for the producer's end marker, i.e. until vLLM has aborted the request."""
        try:
            async with asyncio.timeout(limit):
                while (await queue.get())[0] is not _DONE:
                    pass
        except TimeoutError:
            log.warning("Engine request did not confirm its abort within %.0f s", limit)

    # ----- engine operations --------------------------------------------------------------
    def generate(
        self,
        prompt: dict[str, Any],
        params: SamplingParams,
        request_id: str,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        return self.stream(lambda: self.engine.generate(prompt, params, request_id, **kwargs))

    async def num_unfinished_requests(self) -> int:
        async def count() -> int:
            return self.engine.get_num_unfinished_requests()

        return await self.call(count)

    async def running_request_ids(self) -> list[str]:
        """External ids of the requests the engine is working on (for logs and tests)."""

        async def ids() -> list[str]:
            states = self.engine.output_processor.request_states.values()
            return [getattr(st, "external_req_id", None) or st.request_id for st in states]

        return await self.call(ids)

    async def supported_tasks(self) -> tuple[str, ...]:
        return tuple(await self.call(self.engine.get_supported_tasks))

    async def check_health(self) -> None:
        await self.call(self.engine.check_health)

    @property
    def errored(self) -> bool:
        return bool(self.engine.errored)

    def get_tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    def watch(self, on_dead: Callable[[], None], interval: float = 1.0) -> None:
        """Call `on_dead` (from the engine thread) once the engine has died."""

        async def watchdog() -> None:
            # vLLM offers no event for this; poll cheaply.
            while not self.engine.errored:  # noqa: ASYNC110
                await asyncio.sleep(interval)
            on_dead()

        self._submit(watchdog())

    def shutdown(self) -> None:
        async def stop_output_handler() -> None:
            # vLLM stops the engine core before this task, which then logs the core's death
            # as an error; stopping it first makes a clean shutdown quiet.
            task = getattr(self.engine, "output_handler", None)
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        try:
            self._submit(stop_output_handler()).result(timeout=5)
        except Exception:
            log.debug("could not stop the output handler first", exc_info=True)
        try:
            self.engine.shutdown()
        finally:
            self._stop_loop()
            # Finalise now: AsyncLLM.__del__ fails noisily once the interpreter is exiting.
            del self.engine
            gc.collect()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


# ----- the OpenAI-compatible layer: vLLM's own serving classes, in-process ------------------
def _openai_request_types() -> dict[str, tuple[str, str | None, Any]]:
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    # route -> (state attribute, method (None: the object is callable), request type)
    return {
        "/v1/chat/completions": ("openai_serving_chat", "create_chat_completion",
                                 ChatCompletionRequest),
        "/v1/completions": ("openai_serving_completion", "create_completion", CompletionRequest),
        "/v1/responses": ("openai_serving_responses", "create_responses", ResponsesRequest),
        "/v1/messages": ("anthropic_serving_messages", "create_messages",
                         AnthropicMessagesRequest),
        "/v1/embeddings": ("serving_embedding", None, EmbeddingRequest),
    }


def sse_event(item: Any) -> str:
    """One whole SSE event: strings come framed from vLLM; Responses events are objects."""
    if isinstance(item, str):
        return item
    return f"event: {item.type}\ndata: {item.model_dump_json()}\n\n"


def _raw_request(request_id: str) -> Any:
    """A minimal HTTP request: vLLM's serving classes take the request id from its header."""
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                    "headers": [(b"x-request-id", request_id.encode())]})


class OpenAIServing:
    """The serving objects `vllm serve` builds, built once at start-up on the engine loop."""

    def __init__(self, runner: EngineRunner, state: Any) -> None:
        from pydantic import TypeAdapter

        self.runner = runner
        self.state = state
        self.routes = {
            route: (attr, method, TypeAdapter(request_type))
            for route, (attr, method, request_type) in _openai_request_types().items()
            if getattr(state, attr, None) is not None
        }

    @classmethod
    def create(cls, runner: EngineRunner, model_path: str, cli_args: list[str]
               ) -> OpenAIServing:
        """Build the serving layer from `vllm serve` CLI args (so options mean the same)."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        argv = ["--model", model_path, "--served-model-name", *runner.served_model_names,
                *cli_args]
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        state = State()

        async def init() -> None:
            tasks = await runner.engine.get_supported_tasks()
            await init_app_state(runner.engine, state, args, supported_tasks=tasks)

        runner._submit(init()).result()
        return cls(runner, state)

    def supported(self) -> list[str]:
        return sorted([*self.routes, "/v1/models"])

    def lora_request(self, model: str | None) -> Any:
        """The LoRARequest for an adapter name; None for the base model (or no name)."""
        models = self.state.openai_serving_models
        if model is None or models.is_base_model(model):
            return None
        lora = models.lora_requests.get(model)
        if lora is None:
            names = [*self.runner.served_model_names, *models.lora_requests]
            raise LookupError(f"Unknown model {model!r}; served: {', '.join(names)}")
        return lora

    def parse(self, route: str, body: dict[str, Any]) -> Any:
        """The route's request object; raises pydantic.ValidationError for a bad body."""
        return self.routes[route][2].validate_python(body)

    async def models(self) -> dict[str, Any]:
        models = await self.runner.call(self.state.openai_serving_models.show_available_models)
        return models.model_dump(mode="json")

    async def respond(self, route: str, request: Any, request_id: str) -> Any:
        """A dict (response or {"error": ...}) or an async iterator of SSE event strings."""
        attr, method, _ = self.routes[route]
        target = getattr(self.state, attr)
        serve = getattr(target, method) if method else target

        async def run() -> Any:
            return await serve(request, _raw_request(request_id))

        result = await self.runner.call(run)
        if hasattr(result, "__aiter__"):
            return self._relay(result)
        if hasattr(result, "model_dump"):
            return result.model_dump(mode="json")
        body = json.loads(bytes(result.body))  # a starlette JSONResponse (pooling routes)
        return body

    async def _relay(self, generator: Any) -> AsyncIterator[str]:
        # The generator was created on the engine loop; iterate it there.
        async for item in self.runner.stream(lambda: generator):
            yield sse_event(item)
