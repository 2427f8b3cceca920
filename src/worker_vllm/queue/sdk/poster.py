"""The platform's POSTs (stream messages, results) on keep-alive HTTP/1.1 connections: each
request written in one ``write``, each answer read by httptools (the C parser uvicorn uses).

aiohttp's client, which the SDK posts with, builds a request object, a timer, a response
object and its stream for every POST: `benchmarks/run.py --posts` measured 131 us of the
client's CPU per 1 KB POST through the SDK's session and 30 us here (64 POSTs at once to a
local aiohttp server, 4,000 a round, median of 3, 2-core x86-64 with AVX-512). A 128-token
streamed job makes about a dozen POSTs, paid in the worker's one process.

What the SDK's session does and this keeps: its default headers (authorization, user agent),
no proxy (aiohttp ignores the proxy variables unless told), the system's certificates for
https, 600 s for a whole POST (one timer checks them all: a timer per POST, as
``asyncio.timeout`` sets, held 3.3% of the worker's samples at 64 streamed jobs). A connection
the platform closed while idle is dropped; a POST whose reused connection closes before any
answer is sent again once on a new connection, as no answer means the platform did not read it.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import httptools
from yarl import URL

# The SDK session's timeout for a whole request (runpod.http_client.AsyncClientSession).
POST_TIMEOUT_S = 600.0
# Headers each POST sets itself (the session's own value is not sent).
_PER_POST = frozenset({"host", "content-length", "content-type", "accept-encoding"})
# Idle connections kept per host: about the jobs a worker runs at once.
MAX_IDLE = 256


class PostError(Exception):
    """A POST the platform did not take: its HTTP status (0: no answer) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}, {message}" if status else message)
        self.status = status


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    tls: bool
    head: bytes  # "POST <path> HTTP/1.1" and the Host header

    @property
    def key(self) -> tuple[str, int, bool]:
        return self.host, self.port, self.tls


@functools.lru_cache(maxsize=1024)  # a job's stream messages all go to one URL
def _target(url: str) -> _Target:
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise PostError(0, f"not an http(s) URL: {url!r}")
    tls = parsed.scheme == "https"
    port = parsed.port or (443 if tls else 80)
    head = f"POST {parsed.raw_path_qs} HTTP/1.1\r\nHost: {parsed.raw_authority}\r\n"
    return _Target(parsed.raw_host, port, tls, head.encode("latin-1"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one POST at a time, its answer parsed as it arrives."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.body: list[bytes] = []
        self.heard = False  # any byte of the answer
        self.closed = False

    # ----- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.heard = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(PostError(0, f"the platform's answer is not HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionResetError("the platform closed the connection before answering"))

    # ----- httptools callbacks ---------------------------------------------------------------
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result((self.parser.get_status_code(), b"".join(self.body),
                                    self.parser.should_keep_alive()))

    # ----- the POST --------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)

    def time_out(self) -> None:
        self._fail(TimeoutError("the platform did not answer in time"))
        self.close()

    async def post(self, request: bytes) -> tuple[int, bytes, bool]:
        """(status, body, whether the connection may be used again)."""
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.body, self.heard = [], False
        self.transport.write(request)
        return await self.answer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Poster:
    """POSTs to the platform with the SDK session's default headers."""

    def __init__(self, headers: Mapping[str, str], timeout: float = POST_TIMEOUT_S,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items()
                                if k.lower() not in _PER_POST).encode()
        self._timeout = timeout
        self._ssl = ssl_context
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._deadlines: dict[_Connection, float] = {}  # of the POSTs awaiting an answer
        self._timer: asyncio.TimerHandle | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """POST ``body`` with ``headers`` added: the answer's (status, body). Raises
        PostError, OSError or TimeoutError when there is no answer."""
        target = _target(url)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if extra.count("\n") != len(headers) or extra.count("\r") != len(headers):
            raise PostError(0, f"a header holds a line break: {headers!r}")
        request = b"".join((target.head, self._headers, extra.encode(),
                            b"Content-Length: %d\r\n\r\n" % len(body), body))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        connection = self._idle_connection(target)
        reused = connection is not None
        if connection is None:
            connection = await asyncio.wait_for(self._connect(target), self._timeout)
        try:
            try:
                status, body, keep = await self._timed(connection, request, deadline)
            except ConnectionError:
                if not reused or connection.heard:
                    raise
                # The platform closed it when idle.
                connection = await asyncio.wait_for(self._connect(target),
                                                    deadline - loop.time())
                status, body, keep = await self._timed(connection, request, deadline)
        except BaseException:
            connection.close()  # mid-request (cancelled, failed): never used again
            raise
        if keep and not connection.closed and len(idle := self._idle.setdefault(
                target.key, [])) < MAX_IDLE:
            idle.append(connection)
        else:
            connection.close()
        return status, body

    async def _timed(self, connection: _Connection, request: bytes,
                     deadline: float) -> tuple[int, bytes, bool]:
        self._deadlines[connection] = deadline
        if self._timer is None:
            self._start_timer()
        try:
            return await connection.post(request)
        finally:
            del self._deadlines[connection]

    def _start_timer(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._timeout / 10, self._check)

    def _check(self) -> None:
        """Time out the POSTs past their deadline; check again while any is waiting."""
        now = asyncio.get_running_loop().time()
        for connection, deadline in list(self._deadlines.items()):
            if deadline <= now:
                connection.time_out()
        self._timer = None
        if self._deadlines:
            self._start_timer()

    def _idle_connection(self, target: _Target) -> _Connection | None:
        idle = self._idle.get(target.key)
        while idle:
            connection = idle.pop()
            if not connection.closed:  # closed by either side, or lost
                return connection
        return None

    async def _connect(self, target: _Target) -> _Connection:
        tls: ssl.SSLContext | None = None
        if target.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        _, connection = await asyncio.get_running_loop().create_connection(
            _Connection, target.host, target.port, ssl=tls,
            server_hostname=target.host if tls else None)
        return connection

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
