"""One policy for grouping streamed items (deltas, SSE events, batch lines) into stream
messages, used by every route.

Each message is one awaited HTTP POST to the platform, so single tokens are too many; flushing
by count alone makes slow streams choppy. A chunk is flushed when it reaches the current size
(min -> x growth -> max) OR when its oldest item has waited `flush_interval` seconds; the very
first item leaves at once, so time-to-first-token is not delayed. With many streams open in the
process, the interval stretches so that together they send at most `messages_per_s` messages a
second: each message costs the worker's one process a POST (18-26 us of CPU for the POST alone
on a 2-core x86-64 CPU: `benchmarks/run.py --posts`; more with the message's encoding and
weighing), a cost that grows with the number of streams while the tokens per second do not. A
stream that fell behind (its consumer, one platform round trip per message, was slower than the
generation) sends its whole backlog in one message. Every item is weighed as it joins a chunk:
an item that would take the chunk past one stream message starts the next one (an item heavier
than a whole message is the route's to refuse before it gets here: it leaves alone).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from worker_vllm.jobs.output_limits import STREAM_MESSAGE_BUDGET

T = TypeVar("T")

# The waits of a job's flushed chunks (seconds the oldest delta of each waited), collected
# for the job's summary line when the job sets a list here.
flush_waits: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "flush_waits", default=None)


@dataclass(frozen=True)
class FlushPolicy:
    max_size: int = 50
    min_size: int = 1
    growth: float = 3.0
    flush_interval: float = 0.05  # seconds
    # Bound of every chunk: the summed weight (serialised bytes) of its items.
    max_bytes: int = STREAM_MESSAGE_BUDGET
    # Messages a second of all the process's open streams together (0: no bound).
    messages_per_s: float = 0.0

    def __post_init__(self) -> None:
        if self.min_size < 1 or self.max_size < 1:
            raise ValueError("batch sizes must be at least 1")
        if self.growth < 1:
            raise ValueError("batch_size_growth_factor must be at least 1")
        if self.flush_interval < 0:
            raise ValueError("flush interval must not be negative")
        if self.messages_per_s < 0:
            raise ValueError("messages per second must not be negative")

    def interval(self, open_streams: int) -> float:
        """Seconds the oldest item of a chunk may wait, with `open_streams` streams open."""
        if not self.messages_per_s:
            return self.flush_interval
        return max(self.flush_interval, open_streams / self.messages_per_s)

    def next_size(self, size: int) -> int:
        return min(self.max_size, max(size + 1 if self.growth > 1 else size,
                                      math.ceil(size * self.growth)))

    @property
    def first_size(self) -> int:
        return min(self.min_size, self.max_size)


class _End:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


@dataclass
class Chunk(Generic[T]):
    items: list[T]
    # Seconds the oldest item waited in the batch before the flush (for tests and metrics).
    oldest_wait: float

    def __post_init__(self) -> None:
        waits = flush_waits.get()
        if waits is not None:
            waits.append(self.oldest_wait)


class _OpenStreams:
    """How many `chunked` streams are open in this process (they all run on its job loop)."""

    count = 0


def open_streams() -> int:
    return _OpenStreams.count


def _one(_item: object) -> int:
    return 1


# What an item adds to a message beyond its own weight: the separator between items.
_SEPARATOR = 2


class _Inbox(Generic[T]):
    """The items a source has put (each with its arrival time), then its end. The consumer
    waits for a number of them (or the end), so a source that puts an item wakes no task
    unless that item completes what the consumer waits for: one wake-up per chunk, not one
    per item (an SSE event, a delta)."""

    def __init__(self) -> None:
        self._entries: collections.deque[tuple[T, float] | _End] = collections.deque()
        self._wanted = 1
        self._waiter: asyncio.Future[None] | None = None

    def put(self, entry: tuple[T, float] | _End) -> None:
        self._entries.append(entry)
        if self._waiter is not None and not self._waiter.done() and (
                len(self._entries) >= self._wanted or isinstance(entry, _End)):
            self._waiter.set_result(None)

    def qsize(self) -> int:
        return len(self._entries)

    def empty(self) -> bool:
        return not self._entries

    def get_nowait(self) -> tuple[T, float] | _End:
        return self._entries.popleft()

    async def wait_for(self, wanted: int) -> None:
        """Until `wanted` entries are in, or the end. Cancelling it loses no entry."""
        if len(self._entries) >= wanted or (self._entries
                                             and isinstance(self._entries[-1], _End)):
            return
        self._wanted = wanted
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class _Pending(Generic[T]):
    """The batch being filled from the source's inbox."""

    def __init__(self, queue: _Inbox[T], policy: FlushPolicy, clock: Callable[[], float],
                 weigh: Callable[[T], int]) -> None:
        self.queue, self.policy, self.clock, self.weigh = queue, policy, clock, weigh
        self.items: list[T] = []
        self.weight = 0
        self.oldest = 0.0
        self.ended: _End | None = None
        # An item that did not fit in the chunk being filled: it starts the next one.
        self.carry: tuple[T, float, int] | None = None

    def take(self, entry: tuple[T, float] | _End) -> None:
        if isinstance(entry, _End):
            self.ended = entry
            return
        item, arrived = entry
        weight = self.weigh(item) + _SEPARATOR
        if self.items and self.weight + weight > self.policy.max_bytes:
            self.carry = (item, arrived, weight)  # the first item of the next chunk
            return
        self._add(item, arrived, weight)

    def _add(self, item: T, arrived: float, weight: int) -> None:
        if not self.items:
            self.oldest = arrived
        self.items.append(item)
        self.weight += weight

    @property
    def full(self) -> bool:
        """No further item fits in this chunk's message."""
        return self.carry is not None

    def take_queued(self, limit: int | None) -> None:
        """Move what is already queued into the chunk, without waiting: up to `limit` items
        (None: the whole backlog), and never past one stream message."""
        while (self.ended is None and self.carry is None and not self.queue.empty()
               and (limit is None or len(self.items) < limit)):
            self.take(self.queue.get_nowait())

    async def wait(self, size: int) -> None:
        """Wait for an item: as long as it takes for an empty batch, else until the batch has
        `size` items with those queued or the oldest item's flush interval is over."""
        if self.carry is not None:
            return
        if not self.items:
            await self.queue.wait_for(1)
            self.take(self.queue.get_nowait())
        elif (remaining := self.oldest + self._interval() - self.clock()) > 0:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that races with a result, and a cancelled job must stop.
                async with asyncio.timeout(remaining):
                    await self.queue.wait_for(max(1, size - len(self.items)))
            except TimeoutError:
                pass

    def _interval(self) -> float:
        return self.policy.interval(_OpenStreams.count)

    def due(self) -> bool:
        return bool(self.items) and self.clock() - self.oldest >= self._interval()

    def flush(self) -> Chunk[T]:
        chunk = Chunk(self.items, self.clock() - self.oldest)
        self.items, self.weight = [], 0
        if self.carry is not None:
            carry, self.carry = self.carry, None
            self._add(*carry)
        return chunk


class Pushed(Protocol[T]):
    """A source that hands its items to callbacks as they arrive, on the consumer's loop
    (vLLM's app's response body, relayed from the engine's loop): chunked then needs no task
    of its own to read it, and no task wakes up per item."""

    def push_to(self, put: Callable[[T], None],
                end: Callable[[BaseException | None], None]) -> None: ...

    async def aclose(self) -> None: ...


async def _feed(source: AsyncIterator[T], queue: _Inbox[T], clock: Callable[[], float]
                ) -> None:
    """Move `source`'s items (with their arrival time) into `queue`, then its end."""
    try:
        async for item in source:
            queue.put((item, clock()))
    except Exception as exc:
        queue.put(_End(exc))
    else:
        queue.put(_End())


async def chunked(
    source: AsyncIterator[T] | Pushed[T],
    policy: FlushPolicy,
    clock: Callable[[], float] = time.monotonic,
    weigh: Callable[[T], int] = _one,
) -> AsyncIterator[Chunk[T]]:
    """Group the items of `source` into chunks under `policy`; `weigh` gives an item's size
    in a stream message (bytes), which bounds every chunk.

    An iterated source is consumed by its own task, so a flush timeout never cancels the
    source's pending step (which for vLLM would abort the request); a pushed one puts its
    items in the queue itself. Closing or cancelling this generator stops the source (cancels
    that task, or closes the pushed source) and waits for it.
    """
    queue: _Inbox[T] = _Inbox()
    stop = _start(source, queue, clock)
    pending: _Pending[T] = _Pending(queue, policy, clock, weigh)
    size, first, behind = policy.first_size, True, False
    _OpenStreams.count += 1
    try:
        while True:
            await pending.wait(size)
            by_time = pending.due()
            # A flush takes what is already queued when the consumer (one platform round trip
            # per yield) let a backlog build up (items arrived while it held the last chunk)
            # or the time bound triggered it: the backlog leaves whole (up to one stream
            # message) instead of a chunk per round trip. The first item leaves alone.
            pending.take_queued(1 if first else None if by_time or behind else size)
            if pending.ended is not None:
                if pending.items:
                    yield pending.flush()
                if pending.ended.error is not None:
                    raise pending.ended.error
                return
            if not (first or by_time or pending.full or len(pending.items) >= size):
                continue
            full = len(pending.items) >= size
            queued = queue.qsize()
            yield pending.flush()
            behind = queue.qsize() > queued
            if first:
                first = False
            elif full:
                size = policy.next_size(size)
    finally:
        _OpenStreams.count -= 1
        await stop()


def _start(source: AsyncIterator[T] | Pushed[T], queue: _Inbox[T],
           clock: Callable[[], float]) -> Callable[[], Awaitable[None]]:
    """Start moving `source`'s items into `queue`; returns how to stop it."""
    if hasattr(source, "push_to"):
        source.push_to(lambda item: queue.put((item, clock())),
                       lambda error: queue.put(_End(error)))
        return source.aclose
    task = asyncio.ensure_future(_feed(source, queue, clock))  # type: ignore[arg-type]

    async def stop() -> None:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return stop
