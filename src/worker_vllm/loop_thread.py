"""An event loop on a private thread, usable from any other loop.

The runpod SDK runs each phase (fitness checks, the job loop, local test mode) under a fresh
``asyncio.run``; vLLM's ``AsyncLLM`` binds its output-handler task to the loop of its first
request, so an engine shared between loops would break after the warm-up. The engine lives on
this loop; callers in any loop reach it through ``call`` / ``relayed``. Streamed items cross
to the caller's loop through one relay per caller loop, which wakes that loop once per
iteration of this one (one engine step's outputs for every request in flight), not once per
item: each wake-up is a write to the loop's socket and a hand-over of the GIL.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()

# How often the main thread, waiting on other threads, looks up: Python runs a signal's handler
# in the main thread only, and a signal the kernel hands to another thread (vLLM's, uvicorn's,
# the engine loop's) waits until the main thread next runs Python code; an untimed wait slept
# through a SIGINT to the process group for minutes.
SIGNAL_POLL_S = 0.5


def wait_handling_signals(wait: Callable[[float], bool]) -> None:
    """Block the main thread until ``wait(timeout)`` returns True, running signal handlers
    between its timed waits."""
    while not wait(SIGNAL_POLL_S):
        pass


class _Relay:
    """Calls on one caller loop, made from the loop thread: they run together at the end of
    the loop thread's iteration (one engine step's outputs reach their requests in one
    iteration), with one wake-up of the caller's loop for them all.

    ``_waking`` is only touched on the loop thread. ``_scheduled`` is set there and cleared by
    ``_deliver`` on the caller's loop before it empties the deque, so a call added after a
    wake-up was seen as pending is made by that wake-up."""

    def __init__(self, home: asyncio.AbstractEventLoop, caller: asyncio.AbstractEventLoop
                 ) -> None:
        self._home, self._caller = home, caller
        self._calls: collections.deque[tuple[Callable[[Any], None], Any]] = (
            collections.deque())
        self._waking = False
        self._scheduled = False

    def put(self, call: Callable[[Any], None], arg: Any) -> None:
        self._calls.append((call, arg))
        if not self._waking:
            self._waking = True
            self._home.call_soon(self._wake)

    def _wake(self) -> None:
        self._waking = False
        if self._caller is self._home:  # a caller on the loop thread: no wake-up to send
            self._deliver()
        elif not self._scheduled:
            self._scheduled = True
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                self._caller.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        while self._calls:
            call, arg = self._calls.popleft()
            call(arg)


# A producer on the loop thread: a coroutine function that hands each item to the callback it
# is given (an iterated producer is one that emits what it iterates).
Pushing = Callable[[Callable[[T], None]], Awaitable[None]]


class Relayed(Generic[T]):
    """The items of a producer running on the loop thread, in the caller's loop: iterated
    (``async for``), or from some point on pushed to callbacks (``push_to``: no task wakes up
    per item). ``aclose()`` cancels the producer (vLLM then aborts the request) and waits
    until it has ended."""

    def __init__(self, thread: LoopThread, make: Pushing[T]) -> None:
        self._home = thread.loop
        self._relay = thread.relay_for(asyncio.get_running_loop())
        self._queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        self._sink: Callable[[tuple[Any, BaseException | None]], None] = (
            self._queue.put_nowait)
        self._handed_end = False  # the consumer has had the end
        self._ended = asyncio.Event()  # the producer's end reached the caller's loop
        # On the loop thread only: the producer's task, a stop asked for, its end relayed.
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._end_sent = False
        if self._home is asyncio.get_running_loop():
            self._home.call_soon(self._start, make)
        else:
            self._home.call_soon_threadsafe(self._start, make)

    def _start(self, make: Pushing[T]) -> None:
        if self._stopping:
            self._send_end(asyncio.CancelledError())
            return
        self._task = self._home.create_task(self._pump(make))
        # A task cancelled before its first step never runs `_pump`: its end is sent here.
        self._task.add_done_callback(lambda _: self._send_end(asyncio.CancelledError()))

    def _stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    def _send_end(self, exc: BaseException | None) -> None:
        if not self._end_sent:
            self._end_sent = True
            self._relay.put(self._deliver, (_DONE, exc))

    async def _pump(self, make: Pushing[T]) -> None:
        try:
            await make(self._emit)
        except BaseException as exc:  # CancelledError too: the consumer must hear of it
            self._send_end(exc)
            if not isinstance(exc, Exception):
                raise  # a cancellation goes on; an error is the consumer's (relayed), not
                # the task's, which nothing awaits ("Task exception was never retrieved")
        self._send_end(None)

    def _emit(self, item: T) -> None:
        self._relay.put(self._deliver, (item, None))

    def _deliver(self, entry: tuple[Any, BaseException | None]) -> None:
        if entry[0] is _DONE:
            self._ended.set()
        self._sink(entry)

    def __aiter__(self) -> Relayed[T]:
        return self

    async def __anext__(self) -> T:
        if self._handed_end:
            raise StopAsyncIteration
        item, exc = await self._queue.get()
        if item is _DONE:
            self._handed_end = True
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                raise exc
            raise StopAsyncIteration
        return item

    def push_to(self, put: Callable[[T], None],
                end: Callable[[BaseException | None], None]) -> None:
        """From now on hand each item to `put` and then the end to `end` (the producer's
        error, or None), on the caller's loop as they arrive; items already here first. An
        error raised by `put` ends the stream with that error and stops the producer."""

        def sink(entry: tuple[Any, BaseException | None]) -> None:
            if self._handed_end:
                return
            item, exc = entry
            if item is _DONE:
                self._handed_end = True
                end(None if isinstance(exc, asyncio.CancelledError) else exc)
                return
            try:
                put(item)
            except Exception as error:  # noqa: BLE001 - the consumer hears of it
                self._handed_end = True
                self._home.call_soon_threadsafe(self._stop)
                end(error)

        self._sink = sink
        while not self._queue.empty():
            sink(self._queue.get_nowait())

    async def aclose(self, limit: float = 10.0) -> None:
        self._handed_end = True
        if self._ended.is_set():
            return
        self._home.call_soon_threadsafe(self._stop)
        try:
            async with asyncio.timeout(limit):
                await self._ended.wait()
        except TimeoutError:
            log.warning("Engine request did not confirm its abort within %.0f s", limit)


class LoopThread:
    """A private event loop running on its own daemon thread."""

    def __init__(self, name: str, uvloop: bool = False) -> None:
        """`uvloop`: run uvloop's event loop, as `vllm serve` runs its server and engine client."""
        self.loop = _uvloop() if uvloop else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._relays: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Relay] = (
            weakref.WeakKeyDictionary())

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on this loop, from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def relay_for(self, caller: asyncio.AbstractEventLoop) -> _Relay:
        relay = self._relays.get(caller)
        if relay is None:
            relay = self._relays[caller] = _Relay(self.loop, caller)
        return relay

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await `make()` on this loop; cancelling the caller cancels it there."""
        if asyncio.get_running_loop() is self.loop:
            return await make()

        async def run() -> T:
            return await make()

        return await asyncio.wrap_future(self.submit(run()))

    def relayed(self, make: Callable[[], AsyncIterator[T]]) -> Relayed[T]:
        """Iterate `make()` on this loop; its items reach the caller's loop (see `Relayed`).
        A consumer that stops early closes it (``aclose``): that cancels the producer here
        (vLLM then aborts the request) and waits until that has happened."""

        async def run(emit: Callable[[T], None]) -> None:
            async for item in make():
                emit(item)

        return Relayed(self, run)

    def pushed(self, run: Pushing[T]) -> Relayed[T]:
        """Run `run(emit)` on this loop; each item it emits reaches the caller's loop, as with
        `relayed`, without a task step per item here. Cancelling it is how it is stopped."""
        return Relayed(self, run)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def _uvloop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # vLLM's server depends on it; without it, asyncio's own loop
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
