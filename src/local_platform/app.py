"""The local endpoint's app: RunPod's endpoint API on one side, the worker protocol on the
other, and the bearer-key check in front."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from . import client_api, openai_api, worker_api
from .messages import ApiError, error_response, handle_api_error, openai_error_response
from .state import Endpoint


class AuthMiddleware:
    """Bearer-key check as a pure ASGI middleware: Starlette's @app.middleware("http") wraps
    every request and streamed body in extra tasks, a large share of this server's CPU."""

    def __init__(self, app: Any, api_key: str | None, worker_key: str) -> None:
        self.app, self.api_key, self.worker_key = app, api_key, worker_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            given = dict(scope["headers"]).get(b"authorization", b"").decode(
                "latin-1").removeprefix("Bearer ")
            denied: JSONResponse | None = None
            if path.startswith("/_worker/"):
                if given != self.worker_key:
                    denied = error_response(401, "Unknown worker")
            elif self.api_key and given != self.api_key:
                message = "Invalid or missing API key"
                denied = (openai_error_response(401, message, "authentication_error")
                          if "/openai/" in path else error_response(401, message))
            if denied is not None:
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(endpoint: Endpoint, api_key: str | None, worker_key: str,
               lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="worker-vllm local endpoint", lifespan=lifespan)
    app.add_middleware(AuthMiddleware, api_key=api_key, worker_key=worker_key)
    app.add_exception_handler(ApiError, handle_api_error)
    app.state.endpoint = endpoint  # what every route serves
    app.include_router(client_api.router)
    app.include_router(openai_api.router)
    app.include_router(worker_api.router)
    return app
