"""RunPod's load-balancing gateway, played locally in front of one worker in `lb` mode.

Any path is forwarded to the worker's HTTP server, streamed both ways; a request waits while
no worker is healthy (its /ping answers 204 while it starts) for up to the platform's request
timeout, then gets 503; a request that runs longer than that timeout is cut off with 504.
`Authorization: Bearer <key>` is required when the endpoint has an API key (and forwarded, as
the worker may check a key of its own). A worker whose /ping answers anything but 200 or 204
three times in a row is taken out and replaced, as the platform does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("local_platform")

# RunPod's documented limit for one request to a load-balancing endpoint: 5.5 minutes.
REQUEST_TIMEOUT_S = 330.0
UNHEALTHY_PINGS = 3  # consecutive answers other than 200/204 before the worker is replaced
HOP_HEADERS = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
               "upgrade", "proxy-authorization", "proxy-authenticate", "content-length"}


class WorkerHealth:
    """What the worker's /ping says, polled every `interval` seconds."""

    def __init__(self, ping_url: str, interval: float = 0.5) -> None:
        self.ping_url, self.interval = ping_url, interval
        self.path = httpx.URL(ping_url).path  # the health path (HEALTH_CHECK_PATH)
        self.status: int | None = None  # the last /ping status (None: nothing listening)
        self.healthy = asyncio.Event()
        self.unhealthy_in_a_row = 0

    async def poll(self, replace: Any) -> None:
        """Poll for ever; `replace()` ends a worker the platform would take out."""
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                try:
                    self.status = (await client.get(self.ping_url)).status_code
                except httpx.HTTPError:
                    self.status = None
                self._note(replace)
                await asyncio.sleep(self.interval)

    def _note(self, replace: Any) -> None:
        if self.status == 200:
            self.healthy.set()
        else:
            self.healthy.clear()
        if self.status in (200, 204, None):
            self.unhealthy_in_a_row = 0
            return
        self.unhealthy_in_a_row += 1
        if self.unhealthy_in_a_row == UNHEALTHY_PINGS:
            log.error("The worker's /ping answered %s %d times: replacing it", self.status,
                      UNHEALTHY_PINGS)
            replace()

    async def wait(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.healthy.wait()
        return self.healthy.is_set()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Gateway:
    def __init__(self, worker_url: str, health: WorkerHealth, api_key: str | None,
                 request_timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.worker_url, self.health, self.api_key = worker_url, health, api_key
        self.request_timeout = request_timeout
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout, connect=10),
                                        limits=httpx.Limits(max_connections=None,
                                                            max_keepalive_connections=64))

    async def forward(self, request: Request) -> Response:
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_key and given != self.api_key:
            return _error(401, "Invalid or missing API key")
        if request.url.path not in ("/ping", self.health.path) and \
                not await self.health.wait(self.request_timeout):
            return _error(503, "No worker is ready to take the request")
        url = self.worker_url + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        upstream = self.client.build_request(request.method, url, headers=headers,
                                             content=request.stream())
        try:
            response = await self.client.send(upstream, stream=True)
        except httpx.TimeoutException:
            return _error(504, "The request timed out")
        except httpx.HTTPError as exc:
            return _error(502, f"The worker did not answer: {exc}")
        kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(_relay(response), status_code=response.status_code,
                                 headers=kept, background=BackgroundTask(response.aclose))


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """The worker's body as it comes; closing it (the client went away) closes the worker's
    connection, which makes vLLM abort the request."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError:
        return  # the worker went away mid-response: the client sees the body end
    finally:
        await response.aclose()


def create_gateway(gateway: Gateway, lifespan: Any = None) -> Starlette:
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    return Starlette(routes=[Route("/{path:path}", gateway.forward, methods=methods)],
                     lifespan=lifespan)
