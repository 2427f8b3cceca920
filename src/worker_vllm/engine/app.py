"""vLLM's own HTTP app, as `vllm serve` builds it, called in-process through ASGI: no socket,
no HTTP parsing. vLLM's routing, validation, status codes and error bodies apply unchanged.

Only inference routes are reachable: vLLM's app also carries operator routes (pause, sleep,
collective RPC, cache resets, scale-out, ...) that a job must never reach.

A job goes through the app's middleware stack without the middlewares that add nothing to a job
(`JOB_SKIPPED_MIDDLEWARE`), each of which wraps every SSE event's `send`; the exception
handlers (vLLM's error bodies), `--middleware` entries and the rest stay.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker_vllm.engine.runner import EngineRunner
from worker_vllm.loop_thread import Relayed

# Inference routes of `vllm serve` that jobs may call (those the model's tasks registered).
INFERENCE_ROUTES: dict[str, frozenset[str]] = {
    path: frozenset(methods) for path, methods in {
        "/v1/models": {"GET"},
        "/v1/chat/completions": {"POST"},
        "/v1/chat/completions/render": {"POST"},
        "/v1/completions": {"POST"},
        "/v1/completions/render": {"POST"},
        "/v1/responses": {"POST"},
        "/v1/responses/{response_id}": {"GET"},
        "/v1/responses/{response_id}/cancel": {"POST"},
        "/v1/responses/render": {"POST"},
        "/v1/messages": {"POST"},
        "/v1/messages/count_tokens": {"POST"},
        "/v1/messages/render": {"POST"},
        "/v1/embeddings": {"POST"},
        "/pooling": {"POST"},
        "/classify": {"POST"},
        "/score": {"POST"}, "/v1/score": {"POST"},
        "/rerank": {"POST"}, "/v1/rerank": {"POST"}, "/v2/rerank": {"POST"},
        "/tokenize": {"POST"},
        "/detokenize": {"POST"},
        "/v1/audio/transcriptions": {"POST"},
        "/v1/audio/translations": {"POST"},
    }.items()
}
# Changing the served adapters at run time: only when the worker is told to allow it.
LORA_ROUTES: dict[str, frozenset[str]] = {
    "/v1/load_lora_adapter": frozenset({"POST"}),
    "/v1/unload_lora_adapter": frozenset({"POST"}),
}


# Middlewares of vLLM's app that a job skips: CORS answers browsers (a job has no origin), the
# HTTP metrics instrumentator counts requests for a /metrics route that jobs cannot reach, and
# the scaling check guards elastic expert-parallel scale-out, an operator route jobs cannot
# reach. With them, the app's middlewares held 3.2% of the job loop's py-spy samples at 64
# streamed chat jobs on a 2-core x86-64 CPU; without them, 1.4%.
JOB_SKIPPED_MIDDLEWARE = frozenset({
    "starlette.middleware.cors.CORSMiddleware",
    "prometheus_fastapi_instrumentator.middleware.PrometheusInstrumentatorMiddleware",
    "vllm.entrypoints.serve.elastic_ep.middleware.ScalingMiddleware",
})


def _qualified(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class JobStack:
    """The app's ASGI middleware stack as Starlette builds it, without JOB_SKIPPED_MIDDLEWARE
    (the app's own stack, serving HTTP on load-balancing endpoints, is left as it is)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        kept = [m for m in app.user_middleware
                if _qualified(m.cls) not in JOB_SKIPPED_MIDDLEWARE]
        saved, app.user_middleware = app.user_middleware, kept
        try:
            self.stack = app.build_middleware_stack()
        finally:
            app.user_middleware = saved

    def layers(self) -> list[str]:
        """The stack's middlewares, outermost first (down to vLLM's router)."""
        names, layer = [], self.stack
        while layer is not None and layer is not self.app.router:
            names.append(_qualified(type(layer)))
            layer = getattr(layer, "app", None)
        return names

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["app"] = self.app  # as Starlette.__call__ sets it: routes read app.state
        if self.app.root_path:  # as FastAPI.__call__ does
            scope["root_path"] = self.app.root_path
        await self.stack(scope, receive, send)


# How long the app may take to end a request once told that its client left.
DISCONNECT_GRACE_S = 5.0


@dataclass
class AppResponse:
    status: int
    content_type: str
    # The body's chunks, relayed from the engine's loop as the app sends them (iterate it, or
    # have them pushed: `Relayed.push_to`); closing it disconnects.
    body: Relayed[bytes]


def _template(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{\w+\\\}", r"[^/]+", re.escape(path)) + "$")


class VLLMApp:
    """vLLM's FastAPI app and its state, built on the engine's loop from the parsed
    `vllm serve` arguments."""

    def __init__(self, runner: EngineRunner, app: Any, allow_lora_updates: bool) -> None:
        self.runner = runner
        self.app = app
        self.state = app.state
        registered: dict[str, set[str]] = {}
        for route in app.routes:
            path, methods = getattr(route, "path", None), getattr(route, "methods", None)
            if path and methods:
                registered.setdefault(path, set()).update(methods)
        allowed = dict(INFERENCE_ROUTES) | (LORA_ROUTES if allow_lora_updates else {})
        self.routes = {path: frozenset(methods & registered[path])
                       for path, methods in allowed.items()
                       if path in registered and methods & registered[path]}
        self._patterns = [(_template(p), p) for p in self.routes]
        self.job_stack = JobStack(app)

    @classmethod
    def create(cls, runner: EngineRunner, args: Any) -> VLLMApp:
        """LoRA load/unload routes are reachable only when vLLM's own switch for runtime
        adapter updates (VLLM_ALLOW_RUNTIME_LORA_UPDATING) is on."""
        from vllm import envs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        async def build() -> Any:
            tasks = await runner.engine.get_supported_tasks()
            app = build_app(args, tasks, runner.model_config)
            await init_app_state(runner.engine, app.state, args, supported_tasks=tasks)
            return app

        return cls(runner, runner.loop.submit(build()).result(),
                   bool(envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING))

    def lifespan(self) -> Any:
        """vLLM's own app lifespan (periodic stats logging, a frozen start-up heap), as
        `vllm serve` runs it: an async context manager, entered on the engine loop."""
        return self.app.router.lifespan_context(self.app)

    def allowed(self, method: str, path: str) -> bool:
        # A route's own path first (a dict look-up: a batch asks once per line and route),
        # then the templated ones (`/v1/responses/{response_id}`).
        if (methods := self.routes.get(path)) is not None and method in methods:
            return True
        return any(p.match(path) and method in self.routes[t] for p, t in self._patterns)

    def route_list(self) -> list[str]:
        return sorted(f"{m} {p}" for p, methods in self.routes.items() for m in sorted(methods))

    def locate_bad_field(self, method: str, path: str, body: dict[str, Any]) -> str | None:
        """The body field an error without `param` is about, found by validating the body
        against the route's own request type (validation only: nothing runs)."""
        route = next((r for r in self.app.routes if getattr(r, "path", None) == path
                      and method in (getattr(r, "methods", None) or ())), None)
        field = getattr(route, "body_field", None)
        model = getattr(field, "type_", None) or getattr(
            getattr(field, "field_info", None), "annotation", None)
        return None if model is None else _bad_field(model, body)

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

    async def request(self, method: str, path: str, body: bytes | None,
                      request_id: str) -> AppResponse:
        """Call the app; returns once the response has started. Closing its body (or
        cancelling the caller) disconnects, which makes vLLM abort the request."""
        events: Relayed[Any] = self.runner.loop.pushed(
            lambda emit: _asgi_call(self.job_stack, method, path, body, request_id, emit))
        try:
            kind, status, content_type = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        assert kind == "start"
        return AppResponse(status, content_type, events)

    async def answered(self, method: str, path: str, body: bytes | None,
                       request_id: str) -> tuple[int, bytes]:
        """The whole answer (status, body) to a request, for a caller on the engine's loop
        itself: no relay between loops. Cancelling it disconnects, as closing a body does."""
        status, chunks = 0, []

        def emit(item: tuple[str, Any, Any] | bytes) -> None:
            nonlocal status
            if isinstance(item, tuple):
                status = item[1]
            else:
                chunks.append(item)

        await _asgi_call(self.job_stack, method, path, body, request_id, emit)
        return status, b"".join(chunks)


def _bad_field(model: Any, body: dict[str, Any]) -> str | None:
    """The field of `body` that fails validation against `model` (None: none found)."""
    from pydantic import TypeAdapter, ValidationError

    adapter = TypeAdapter(model)

    def fails(candidate: dict[str, Any]) -> tuple[bool, str | None]:
        try:
            adapter.validate_python(candidate)
        except ValidationError as exc:
            loc = exc.errors()[0]["loc"]
            return True, ".".join(str(p) for p in loc) or None
        except Exception:  # a validator that raised TypeError or the like
            return True, None
        return False, None

    bad, where = fails(body)
    if where:
        return where
    if bad:  # a validator raised: the field whose removal changes that is the culprit
        for key in body:
            still_bad, where = fails({k: v for k, v in body.items() if k != key})
            if not still_bad or where:
                return key
    return None


async def _asgi_call(app: Any, method: str, path: str, body: bytes | None, request_id: str,
                     emit: Callable[[tuple[str, Any, Any] | bytes], None]) -> None:
    """Run one request through the ASGI app on this (the engine's) loop, emitting ("start",
    status, content type), then the bytes of each body chunk as the app sends it (no task
    step per chunk); returns when the app has, raising what it raised."""
    disconnected = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body or b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            emit(("start", message["status"], headers.get("content-type", "")))
        elif message["type"] == "http.response.body" and message.get("body"):
            emit(message["body"])

    task = asyncio.ensure_future(app(_scope(method, path, body, request_id), receive, send))
    try:
        # Not `await task`: cancelling this call (the client left) must not cancel the app's
        # task before it has heard the disconnect.
        await asyncio.wait({task})
        task.result()  # raises what the app raised
    finally:
        # The client leaves: the app hears a disconnect first. vLLM's JSON routes cancel their
        # work on it (`with_cancellation`); cancelling the app's task alone would leave that
        # work running in a task of its own, generating to the end.
        disconnected.set()
        if not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _scope(method: str, path: str, body: bytes | None, request_id: str) -> dict[str, Any]:
    """The ASGI scope of one in-process request."""
    headers = [(b"x-request-id", request_id.encode())]
    if body is not None:
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": headers, "client": ("worker", 0), "server": ("worker", 0),
            "state": {}}
