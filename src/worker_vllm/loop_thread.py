"""An event loop on a private thread, usable from any other loop.

The runpod SDK runs each phase (fitness checks, the job loop, local test mode) under a fresh
``asyncio.run``; vLLM's ``AsyncLLM`` binds its output-handler task to the loop of its first
request, so an engine shared between loops would break after the warm-up. The engine lives on
this loop; callers in any loop reach it through ``call`` / ``stream``. Streamed items cross
to the caller's loop through one relay per caller loop, which wakes that loop once per
iteration of this one (one engine step's outputs for every request in flight), not once per
item: each wake-up is a write to the loop's socket and a hand-over of the GIL.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


class _Relay:
    """Items for queues of one caller loop, put on the loop thread: they leave together at the
    end of the loop thread's iteration (one engine step's outputs reach their requests in one
    iteration), with one wake-up of the caller's loop for them all.

    ``_waking`` is only touched on the loop thread. ``_scheduled`` is set there and cleared by
    ``_deliver`` on the caller's loop before it empties the deque, so an item added after a
    wake-up was seen as pending is delivered by that wake-up."""

    def __init__(self, home: asyncio.AbstractEventLoop, caller: asyncio.AbstractEventLoop
                 ) -> None:
        self._home, self._caller = home, caller
        self._items: collections.deque[tuple[asyncio.Queue, Any]] = collections.deque()
        self._waking = False
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        self._items.append((queue, item))
        if not self._waking:
            self._waking = True
            self._home.call_soon(self._wake)

    def _wake(self) -> None:
        self._waking = False
        if not self._scheduled:
            self._scheduled = True
            self._caller.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        while self._items:
            queue, item = self._items.popleft()
            queue.put_nowait(item)


class LoopThread:
    """A private event loop running on its own daemon thread."""

    def __init__(self, name: str, uvloop: bool = False) -> None:
        """`uvloop`: run uvloop's event loop, as `vllm serve` does (for an HTTP server)."""
        self.loop = _uvloop() if uvloop else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._relays: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Relay] = (
            weakref.WeakKeyDictionary())

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on this loop, from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await `make()` on this loop; cancelling the caller cancels it there."""

        async def run() -> T:
            return await make()

        return await asyncio.wrap_future(self.submit(run()))

    async def stream(self, make: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
        """Iterate `make()` on this loop and relay its items to the caller's loop.

        Closing or cancelling the consumer cancels the producer here (vLLM then aborts the
        request) and waits until that has happened before returning.
        """
        caller = asyncio.get_running_loop()
        relay = self._relays.get(caller)
        if relay is None:
            relay = self._relays[caller] = _Relay(self.loop, caller)
        queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()

        def put(item: Any, exc: BaseException | None = None) -> None:
            relay.put(queue, (item, exc))

        async def pump() -> None:
            try:
                async for item in make():
                    put(item)
            except BaseException as exc:  # CancelledError too: the consumer must hear of it
                put(_DONE, exc)
                raise
            put(_DONE)

        future = self.submit(pump())
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
                await _drain_until_done(queue)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


async def _drain_until_done(queue: asyncio.Queue, limit: float = 10.0) -> None:
    """Wait for the producer's end marker, i.e. until vLLM has aborted the request."""
    try:
        async with asyncio.timeout(limit):
            while (await queue.get())[0] is not _DONE:
                pass
    except TimeoutError:
        log.warning("Engine request did not confirm its abort within %.0f s", limit)


def _uvloop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # vLLM's server depends on it; without it, asyncio's own loop
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
