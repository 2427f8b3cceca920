"""The HTTP app of a load-balancing worker: /ping for the platform, vLLM's app behind it.

Its state is what /ping tells the platform: 204 while the engine starts, 200 once it has served
its warm-up request, 503 once it is dead (the platform then replaces the worker). A start-up
that failed answers /ping 200 with the error, and every request 503 with it: an unhealthy
status would make the platform start another worker that fails the same way, each start
billed. vLLM's app answers only the routes its allow-list names (the public inference routes,
as for route jobs); the rest answer 404.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from worker_vllm.errors import EngineUnavailable, ErrorObject, WorkerError

if TYPE_CHECKING:
    from worker_vllm.engine import EngineRunner, VLLMApp

Scope = dict[str, Any]

STARTING = EngineUnavailable("The worker is starting: its engine is not ready yet")


async def _respond(send: Any, status: int, body: Any = None,
                   headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
            *headers] if body is not None else list(headers)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})


def openai_error(error: WorkerError) -> dict[str, ErrorObject]:
    """The OpenAI error object vLLM's own app answers with."""
    err = error.to_error()
    err.setdefault("param", None)
    return {"error": err}


class LoadBalancerApp:
    """ASGI app: the health paths (/ping, and HEALTH_CHECK_PATH where that differs) and, once
    ready, vLLM's app for allowed routes."""

    def __init__(self, health_paths: tuple[str, ...] = ("/ping",)) -> None:
        self.health_paths = health_paths
        self.vllm: VLLMApp | None = None
        self.runner: EngineRunner | None = None
        self.failure: WorkerError | None = None  # the start-up error
        self.dead: str | None = None  # why the engine is considered dead
        self._allowed: dict[tuple[str, str], bool] = {}

    def ready(self, vllm: VLLMApp, runner: EngineRunner) -> None:
        self.vllm, self.runner = vllm, runner

    def failed(self, error: WorkerError) -> None:
        self.failure = error

    def engine_dead(self, reason: str) -> None:
        self.dead = reason

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websocket routes are served
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path in self.health_paths:
            await self._ping(send)
            return
        unavailable = self._unavailable()
        if unavailable is not None:
            await _respond(send, 503, openai_error(unavailable), ((b"retry-after", b"5"),))
            return
        assert self.vllm is not None
        if not self._is_allowed(scope["method"], path):
            await _respond(send, 404, openai_error(WorkerError(
                f"Unknown route {scope['method']} {path}; supported: "
                f"{', '.join(self.vllm.route_list())}", type="invalid_request_error",
                code=404)))
            return
        await self.vllm.app(scope, receive, send)

    def _unavailable(self) -> WorkerError | None:
        if self.failure is not None:
            return self.failure
        if self.dead is not None:
            return EngineUnavailable(f"The engine has stopped ({self.dead}); this worker is "
                                     "being replaced")
        return STARTING if self.vllm is None else None

    def _is_allowed(self, method: str, path: str) -> bool:
        key = (method, path)
        allowed = self._allowed.get(key)
        if allowed is None:
            assert self.vllm is not None
            allowed = self.vllm.allowed(method, path)
            if len(self._allowed) < 10_000:  # paths with ids vary: keep the cache bounded
                self._allowed[key] = allowed
        return allowed

    async def _ping(self, send: Any) -> None:
        if self.failure is not None:
            await _respond(send, 200, {"status": "startup_error", **openai_error(self.failure)})
        elif self.dead is not None:
            await _respond(send, 503, {"status": "unhealthy", "reason": self.dead})
        elif self.vllm is None or self.runner is None:
            await _respond(send, 204)
        else:
            # The engine's own count of unfinished requests: a debug field for tests and
            # dashboards (this app runs on the engine's loop).
            await _respond(send, 200, {"status": "healthy",
                                       "engine_requests": self.runner.unfinished_requests_now()})


async def _lifespan(receive: Any, send: Any) -> None:
    """Nothing to start or stop with the server: the worker drives the engine's life."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
