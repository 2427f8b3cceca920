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
import dataclasses
import functools
import gc
import json
import logging
import math
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import (
    RepetitionDetectionParams,
    RequestOutputKind,
    StructuredOutputsParams,
)
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()

__all__ = [
    "EngineDeadError",
    "EngineGenerateError",
    "EngineRunner",
    "SamplingParamsError",
    "VLLMClientError",
    "make_sampling_params",
]


# SamplingParams fields the worker sets itself or that are not request options.
_INTERNAL_SAMPLING_FIELDS = {
    "output_kind": "set by the worker from `stream`",
    "skip_clone": "an engine-internal flag",
    "output_text_buffer_length": "an engine-internal field",
}
# What the engine core's msgpack decoder accepts for an integer.
_INT64 = (-(2**63), 2**63 - 1)
_MAX_DEPTH = 16


class SamplingParamsError(ValueError):
    """An invalid sampling_params field; `parameter` names it."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


@functools.cache
def _struct_fields(cls: Any) -> frozenset[str]:
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        names = [f.name for f in msgspec.structs.fields(cls)]
    else:
        names = [f.name for f in dataclasses.fields(cls) if f.init]
    return frozenset(n for n in names if not n.startswith("_"))


def sampling_param_names() -> list[str]:
    """The SamplingParams fields a job may set."""
    return sorted(_struct_fields(SamplingParams) - set(_INTERNAL_SAMPLING_FIELDS))


def _check_values(value: Any, path: str, depth: int = 0) -> None:
    """Values the engine core could not decode: 64-bit overflow, non-finite, deep nesting."""
    if depth > _MAX_DEPTH:
        raise SamplingParamsError(f"{path} is nested too deeply", path)
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        raise SamplingParamsError(f"{path}={value} is out of the 64-bit integer range", path)
    if isinstance(value, float) and not math.isfinite(value):
        raise SamplingParamsError(f"{path} must be a finite number, got {value}", path)
    if isinstance(value, dict):
        for key, item in value.items():
            _check_values(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_values(item, path, depth + 1)


def _check_keys(params: dict[str, Any]) -> None:
    for key in params:
        if key in _INTERNAL_SAMPLING_FIELDS:
            raise SamplingParamsError(f"{key} cannot be set: {_INTERNAL_SAMPLING_FIELDS[key]}",
                                      key)
        if key not in _struct_fields(SamplingParams):
            raise SamplingParamsError(f"unknown field '{key}'", key)
    nested = {"structured_outputs": StructuredOutputsParams,
              "repetition_detection": RepetitionDetectionParams}
    for key, cls in nested.items():
        value = params.get(key)
        if isinstance(value, dict):
            unknown = sorted(set(value) - _struct_fields(cls))
            if unknown:
                raise SamplingParamsError(f"unknown field '{key}.{unknown[0]}'", key)


def _json_natural(params: dict[str, Any]) -> dict[str, Any]:
    """Accept the JSON forms of fields whose Python type JSON cannot express."""
    bias = params.get("logit_bias")
    if isinstance(bias, dict):
        # JSON object keys are strings: "5" means token id 5 (as in the OpenAI API).
        converted = {}
        for key, value in bias.items():
            if isinstance(key, str) and key.strip().lstrip("-").isdigit():
                key = int(key)
            converted[key] = value
        params["logit_bias"] = converted
    if isinstance(params.get("bad_words"), str):
        params["bad_words"] = [params["bad_words"]]  # one word, as `stop` takes one string
    return params


_MSGSPEC_PATH = re.compile(r"\$\.([A-Za-z_]+)")


def _convert_error(exc: msgspec.ValidationError) -> SamplingParamsError:
    text = str(exc)
    match = _MSGSPEC_PATH.search(text)
    return SamplingParamsError(text.replace("`", ""), match.group(1) if match else None)


def make_sampling_params(params: dict[str, Any], *, stream: bool) -> SamplingParams:
    """SamplingParams from a job's dict, type- and range-checked as the engine core needs.

    ``SamplingParams(**d)`` does not check types, and a wrongly typed value kills the engine
    core's input thread while decoding (every request in flight with it), so the dict is
    converted with the type information SamplingParams declares (msgspec), which also runs
    vLLM's own range checks. Raises SamplingParamsError or VLLMClientError.
    """
    if not isinstance(params, dict):
        raise SamplingParamsError("sampling_params must be an object")
    params = _json_natural(dict(params))
    _check_keys(params)
    for key, value in params.items():
        _check_values(value, key)
    # DELTA streams carry only new text, decoded by vLLM's incremental detokenizer, so a
    # multi-byte character is never split; FINAL_ONLY skips per-step outputs when not streaming.
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    params["output_kind"] = kind.value  # msgspec converts the value to the enum
    try:
        return msgspec.convert(params, SamplingParams)
    except msgspec.ValidationError as exc:
        raise _convert_error(exc) from None


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

    def chat_content_format(self, chat_template: str | None) -> str:
        """"string" or "openai": how the chat template expects message content (vLLM's own
        detection, as its chat route uses it)."""
        from vllm.renderers.hf import resolve_chat_template_content_format

        return resolve_chat_template_content_format(
            chat_template, None, "auto", self.get_tokenizer(), model_config=self.model_config)

    def watch(self, on_dead: Callable[[str], None], interval: float = 1.0,
              probe_every: float = 0.0, probe_timeout: float = 60.0) -> None:
        """Call `on_dead(reason)` (from the engine thread) once the engine has died.

        vLLM offers no event for this: `errored` is polled cheaply. An engine core whose input
        thread died never sets it, so every `probe_every` seconds (0: never) a one-token
        request must finish within `probe_timeout` seconds, or the engine counts as dead.
        """

        async def watchdog() -> None:
            loop = asyncio.get_running_loop()
            last_probe = loop.time()
            probes = 0
            while not self.engine.errored:
                await asyncio.sleep(interval)
                if probe_every and loop.time() - last_probe >= probe_every:
                    probes += 1
                    if not await self._probe(f"health-probe-{probes}", probe_timeout):
                        on_dead(f"a health probe got no answer within {probe_timeout:.0f} s")
                        return
                    last_probe = loop.time()
            on_dead("the engine reported an error")

        self._submit(watchdog())

    async def _probe(self, request_id: str, timeout: float) -> bool:
        """Whether a one-token request completes in time (on the engine loop)."""
        if "generate" not in await self.engine.get_supported_tasks():
            try:
                async with asyncio.timeout(timeout):
                    await self.engine.check_health()
                return True
            except Exception:
                return False
        params = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)
        token = self.get_tokenizer().bos_token_id or 0
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.engine.generate({"prompt_token_ids": [token]}, params,
                                                    request_id):
                    pass
            return True
        except TimeoutError:
            return False
        except Exception:
            log.warning("health probe failed", exc_info=True)
            return False

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
