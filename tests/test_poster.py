"""The platform's POSTs on keep-alive connections (``queue/sdk/poster.py``), against real
servers: aiohttp's (what the local endpoint and the tests' platforms run), raw asyncio ones
that close or hold connections at chosen moments, and TLS with a test CA."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from worker_vllm.queue.sdk.poster import Poster, PostError

HEADERS = {"Authorization": "key-1", "User-Agent": "RunPod-Python-SDK/test",
           "Content-Type": "application/json", "Accept-Encoding": "gzip, deflate"}


async def aiohttp_server(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                         ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/{path:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def test_posts_arrive_whole_with_the_sessions_headers_on_reused_connections():
    seen: list[tuple[int, bytes, dict[str, str], str]] = []

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.transport.get_extra_info("peername")[1], body,  # type: ignore[union-attr]
                     dict(request.headers), request.raw_path))
        return web.Response(text=f"got {len(body)}")

    async def main() -> list[tuple[int, bytes]]:
        runner, port = await aiohttp_server(answer)
        poster = Poster(HEADERS)
        try:
            async def task(t: int) -> list[tuple[int, bytes]]:
                return [await poster.post(f"http://127.0.0.1:{port}/stream?id=job {t}&n={i}",
                                          f'{{"output": "{t}-{i} ✓"}}'.encode() * (i + 1),
                                          {"X-Request-ID": f"job-{t}"})
                        for i in range(10)]
            return [a for answers in await asyncio.gather(*map(task, range(20)))
                    for a in answers]
        finally:
            poster.close()
            await runner.cleanup()

    answers = asyncio.run(main())
    assert len(seen) == 200 and all(status == 200 for status, _ in answers)
    assert sorted(body for _, body in answers) == sorted(b"got %d" % len(b) for _, b, _, _ in seen)
    for _, body, headers, path in seen:
        t, i = path.removeprefix("/stream?id=job+").split("&n=")
        assert body == f'{{"output": "{t}-{i} ✓"}}'.encode() * (int(i) + 1)
        assert headers["X-Request-ID"] == f"job-{t}"
        assert headers["Authorization"] == "key-1"
        assert headers["User-Agent"] == "RunPod-Python-SDK/test"
        assert "Accept-Encoding" not in headers and "Content-Type" not in headers
    # 20 POSTs at a time: connections are kept and used again, never more than 20.
    assert len({peer for peer, _, _, _ in seen}) <= 20


def test_an_answer_in_chunks_and_its_status_come_back():
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=503)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"too ", b"busy"):
            await response.write(part)
        await response.write_eof()
        return response

    async def main() -> list[tuple[int, bytes]]:
        runner, port = await aiohttp_server(answer)
        poster = Poster(HEADERS)
        try:
            return [await poster.post(f"http://127.0.0.1:{port}/done", b"{}", {})
                    for _ in range(3)]
        finally:
            poster.close()
            await runner.cleanup()

    assert asyncio.run(main()) == [(503, b"too busy")] * 3


class RawServer:
    """An HTTP server written on asyncio's streams: it answers each request with 200 unless
    ``drop`` (connection number, request number on it) says to close instead; ``hold`` makes
    it never answer. Records (connection, request number, body) and each connection's end."""

    def __init__(self, drop: set[tuple[int, int]] = frozenset(), close_after: bool = False,
                 hold: bool = False) -> None:
        self.drop, self.close_after, self.hold = drop, close_after, hold
        self.requests: list[tuple[int, int, bytes]] = []
        self.connections = 0
        self.ended: list[int] = []
        self.got_request = asyncio.Event()
        self.a_connection_ended = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections = self.connections + 1
        n = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                n += 1
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.requests.append((conn, n, await reader.readexactly(length)))
                self.got_request.set()
                if (conn, n) in self.drop:
                    return
                if self.hold:
                    await reader.read()  # until the client leaves
                    return
                close = b"Connection: close\r\n" if self.close_after else b""
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n%s\r\nok" % close)
                await writer.drain()
                if self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.ended.append(conn)
            self.a_connection_ended.set()
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/stream"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def test_a_reused_connection_closed_before_any_answer_is_tried_again_on_a_new_one():
    server = RawServer(drop={(1, 2)})

    async def main() -> list[tuple[int, bytes]]:
        async with server as url:
            poster = Poster({})
            answers = [await poster.post(url, b"%d" % i, {}) for i in range(3)]
            poster.close()
            return answers

    assert asyncio.run(main()) == [(200, b"ok")] * 3
    # The second POST was lost with the first connection and sent again on a second one.
    assert server.requests == [(1, 1, b"0"), (1, 2, b"1"), (2, 1, b"1"), (2, 2, b"2")]


def test_a_new_connection_closed_before_any_answer_fails_the_post_once():
    server = RawServer(drop={(1, 1)})

    async def main() -> None:
        async with server as url:
            poster = Poster({})
            with pytest.raises(ConnectionError):
                await poster.post(url, b"x", {})
            assert await poster.post(url, b"y", {}) == (200, b"ok")
            poster.close()

    asyncio.run(main())
    assert server.requests == [(1, 1, b"x"), (2, 1, b"y")]


def test_an_answer_that_closes_the_connection_is_not_followed_on_it():
    server = RawServer(close_after=True)

    async def main() -> None:
        async with server as url:
            poster = Poster({})
            for i in range(3):
                assert await poster.post(url, b"%d" % i, {}) == (200, b"ok")
            poster.close()

    asyncio.run(main())
    assert server.requests == [(1, 1, b"0"), (2, 1, b"1"), (3, 1, b"2")]


def test_a_cancelled_post_closes_its_connection_and_the_next_uses_a_new_one():
    server = RawServer(drop=set(), hold=True)

    async def main() -> None:
        async with server as url:
            poster = Poster({})
            held = asyncio.create_task(poster.post(url, b"held", {}))
            await server.got_request.wait()
            held.cancel()
            with pytest.raises(asyncio.CancelledError):
                await held
            await server.a_connection_ended.wait()  # the cancelled POST's connection closed
            assert server.ended == [1]
            server.hold = False
            assert await poster.post(url, b"next", {}) == (200, b"ok")
            poster.close()

    asyncio.run(main())
    assert server.requests == [(1, 1, b"held"), (2, 1, b"next")]


def test_a_post_without_an_answer_times_out():
    async def main() -> None:
        async with RawServer(hold=True) as url:
            poster = Poster({}, timeout=0.2)
            with pytest.raises(TimeoutError):
                await poster.post(url, b"x", {})
            poster.close()

    asyncio.run(main())


@pytest.mark.parametrize("headers", [{"X-Request-ID": "job\r\nX-Evil: 1"},
                                     {"X-Request-ID": "job\nX-Evil: 1"},
                                     {"X-Request-ID": "job\r"}])
def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(headers):
    server = RawServer()

    async def main() -> None:
        async with server as url:
            poster = Poster({})
            with pytest.raises(PostError, match="line break"):
                await poster.post(url, b"x", headers)
            poster.close()

    asyncio.run(main())
    assert server.requests == []


def test_not_an_http_url_is_refused():
    with pytest.raises(PostError, match="not an http"):
        asyncio.run(Poster({}).post("ftp://example.invalid/x", b"", {}))


def test_https_checks_the_platforms_certificate():
    import trustme

    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def main() -> None:
        runner, port = await aiohttp_server(answer, server_tls)
        try:
            trusting = Poster({}, ssl_context=client_tls)
            for body in (b"a", b"b"):
                assert await trusting.post(f"https://127.0.0.1:{port}/done", body, {}) == (
                    200, body)
            trusting.close()
            # The system's certificates do not know the test CA: refused, no POST made.
            with pytest.raises(ssl.SSLCertVerificationError):
                await Poster({}).post(f"https://127.0.0.1:{port}/done", b"c", {})
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_a_header_beyond_latin_1_is_sent_as_utf_8():
    server = RawServer()

    async def main() -> tuple[int, bytes]:
        async with server as url:
            poster = Poster({"Authorization": "kéy ✓"})
            try:
                return await poster.post(url, b"x", {"X-Request-ID": "jöb-✓"})
            finally:
                poster.close()

    assert asyncio.run(main()) == (200, b"ok")
    assert server.requests == [(1, 1, b"x")]
