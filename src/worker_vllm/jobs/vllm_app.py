"""Route jobs, answered by vLLM's own app in-process.

Two shapes reach it: `{"openai_route", "openai_input"}` (what the platform makes of a request
to `/openai/v1/...`) and `{"route", "body", "method"}` (any allowed route of `vllm serve`).
JSON answers are yielded once; SSE answers as whole events, batched by the stream policy and
ending as vLLM ends them; a non-2xx answer fails the job with vLLM's error and HTTP status.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from worker_vllm.engine import AppResponse, VLLMApp
from worker_vllm.errors import ErrorObject, WorkerError
from worker_vllm.jobs.flush import FlushPolicy, chunked
from worker_vllm.jobs.shapes import OpenAIInput, RouteInput
from worker_vllm.loop_thread import Relayed


class RouteError(WorkerError):
    """An error in the OpenAI error object's shape (param always present)."""

    def to_error(self) -> ErrorObject:
        return ErrorObject(message=self.message, type=self.type, param=self.param,
                           code=self.code)


def route_path(app: VLLMApp, method: str, route: str) -> str:
    """The app's path for a route named with or without `/v1` (`/openai/v1/tokenize` reaches
    vLLM's `/tokenize`, `/chat/completions` its `/v1/chat/completions`)."""
    path = "/" + route.strip().strip("/")
    bare = path.removeprefix("/v1") or "/"
    for candidate in (path, "/v1" + bare, bare):
        if app.allowed(method, candidate):
            return candidate
    return path


def request_of(app: VLLMApp, inp: OpenAIInput | RouteInput) -> tuple[str, str, Any, str]:
    """(method, path, body, the input field naming the route)."""
    if isinstance(inp, OpenAIInput):
        body = inp.openai_input
        method = "POST" if body is not None else "GET"
        return method, route_path(app, method, inp.openai_route), body, "openai_route"
    body = inp.body
    method = inp.method or ("POST" if body is not None else "GET")
    return method, route_path(app, method, inp.route), body, "route"


def _json_body(body: Any) -> bytes | None:
    return None if body is None else json.dumps(body, ensure_ascii=False).encode()


async def call(app: VLLMApp, method: str, path: str, body: Any,
               request_id: str) -> AppResponse:
    """One request to vLLM's app from the job's loop, as route jobs make it: the body as
    JSON, the request id vLLM's own. Closing the response's body aborts the request."""
    return await app.request(method, path, _json_body(body), request_id)


async def call_here(app: VLLMApp, method: str, path: str, body: Any,
                    request_id: str) -> tuple[int, bytes]:
    """The same request made on the engine's loop (a batch's lines run there), answered
    whole: (status, body). Cancelling it aborts the request."""
    return await app.answered(method, path, _json_body(body), request_id)


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def error_from(status: int, raw: bytes) -> RouteError:
    """vLLM's error body (the OpenAI error object, or FastAPI's `detail`) as the job's error."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = raw.decode("utf-8", "replace")
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return RouteError(str(err.get("message", "error")),
                          type=str(err.get("type") or "invalid_request_error"),
                          param=err.get("param"), code=status)
    detail = data.get("detail", data) if isinstance(data, dict) else data
    return RouteError(detail if isinstance(detail, str) else json.dumps(detail),
                      type="invalid_request_error" if status < 500 else "internal_error",
                      code=status)


def app_error(app: VLLMApp, method: str, path: str, body: Any, status: int,
              raw: bytes) -> RouteError:
    """vLLM's error answer to a request, naming the body field a client error is about when
    vLLM's own error does not."""
    error = error_from(status, raw)
    if error.param is None and status < 500 and isinstance(body, dict):
        error.param = app.locate_bad_field(method, path, body)
    return error


class SSEEvents:
    """Whole SSE events (each ending in a blank line) of a response body cut anywhere, pushed
    as they arrive (``flush.Pushed``). A chunk of whole events after a whole one (vLLM sends
    each event as one chunk) goes on as it is, so an item may hold several whole events."""

    def __init__(self, body: Relayed[bytes]) -> None:
        self._body = body
        self._pending = ""

    def _events(self, chunk: bytes) -> str | None:
        text = chunk.decode("utf-8")
        if not self._pending and text.endswith("\n\n"):
            return text
        head, sep, self._pending = (self._pending + text).rpartition("\n\n")
        return head + sep if sep else None

    def push_to(self, put: Callable[[str], None],
                end: Callable[[BaseException | None], None]) -> None:
        def put_events(chunk: bytes) -> None:
            if (events := self._events(chunk)) is not None:
                put(events)

        def end_events(error: BaseException | None) -> None:
            if error is None and self._pending.strip():
                put(self._pending + "\n\n")
            end(error)

        self._body.push_to(put_events, end_events)

    async def aclose(self) -> None:
        await self._body.aclose()


def parse_sse(events: str) -> list[Any]:
    """The JSON payloads of whole SSE events (none for the closing [DONE])."""
    payloads = []
    for event in events.split("\n\n"):
        data = "".join(line[5:].strip() for line in event.splitlines()
                       if line.startswith("data:"))
        if data not in ("", "[DONE]"):
            payloads.append(json.loads(data))
    return payloads


def _event_weight(event: str) -> int:
    """Bytes of an SSE event inside a stream message (a JSON string)."""
    return len(json.dumps(event))


async def run_route(app: VLLMApp, inp: OpenAIInput | RouteInput, policy: FlushPolicy,
                    request_id: str, raw_output: bool = True) -> AsyncIterator[Any]:
    method, path, body, field = request_of(app, inp)
    if not app.allowed(method, path):
        raise RouteError(f"Unknown route {method} {path}; supported: "
                         f"{', '.join(app.route_list())}", type="invalid_request_error",
                         param=field, code=404)
    response = await call(app, method, path, body, request_id)
    async with contextlib.aclosing(response.body) as chunks:
        if response.status >= 400:
            raise app_error(app, method, path, body, response.status, await read_all(chunks))
        if not response.content_type.startswith("text/event-stream"):
            raw = await read_all(chunks)
            try:
                yield json.loads(raw)
            except ValueError:
                yield {"text": raw.decode("utf-8", "replace")}
            return
        async with contextlib.aclosing(chunked(SSEEvents(chunks), policy,
                                               weigh=_event_weight)) as batches:
            async for batch in batches:
                if raw_output:
                    yield "".join(batch.items)
                else:
                    yield [payload for events in batch.items for payload in parse_sse(events)]
