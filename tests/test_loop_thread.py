"""LoopThread.relayed: items cross from the engine's loop to the caller's in order, with one
wake-up of the caller's loop per run of items (not one per item), and a consumer that leaves
cancels its producer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from worker_vllm.loop_thread import LoopThread


@pytest.fixture
def loop_thread():
    thread = LoopThread("test-loop")
    yield thread
    thread.stop()


def count_wakeups(loop: asyncio.AbstractEventLoop) -> list[tuple]:
    """Records every `call_soon_threadsafe` on `loop` from now on (a wake-up of it)."""
    calls: list[tuple] = []
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    return calls


def test_items_of_many_streams_arrive_in_order_with_few_wakeups(loop_thread) -> None:
    streams, items = 16, 50
    # Every producer waits for this, then yields all its items in one iteration of the
    # engine's loop: 800 items that a relay can hand over together.
    go = asyncio.Event()

    async def produce(n: int) -> AsyncIterator[tuple[int, int]]:
        await go.wait()
        for i in range(items):
            yield n, i

    async def main() -> tuple[list[list[tuple[int, int]]], int]:
        loop = asyncio.get_running_loop()
        wakeups = count_wakeups(loop)

        async def consume(n: int) -> list[tuple[int, int]]:
            return [item async for item in loop_thread.relayed(lambda: produce(n))]

        tasks = [asyncio.ensure_future(consume(n)) for n in range(streams)]
        await asyncio.sleep(0)  # every consumer submitted its producer
        await loop_thread.call(lambda: _wait_then_set(go))
        results = await asyncio.gather(*tasks)
        return results, len(wakeups)

    results, wakeups = asyncio.run(main())
    for n, got in enumerate(results):
        assert got == [(n, i) for i in range(items)]
    # One wake-up per item (and end marker) would be 816; the producers ran in a handful of
    # iterations of the engine's loop.
    assert wakeups < streams * (items + 1) / 10, wakeups


async def _wait_then_set(event: asyncio.Event) -> None:
    await asyncio.sleep(0.05)  # the producers are waiting on it
    event.set()


async def _endless(stopped: asyncio.Event) -> AsyncIterator[int]:
    """0, 1, 2, ... until cancelled; sets `stopped` when it ends."""
    try:
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(0)
    finally:
        stopped.set()


def test_a_consumer_that_leaves_cancels_its_producer(loop_thread) -> None:
    cancelled = asyncio.Event()

    def produce() -> AsyncIterator[int]:
        return _endless(cancelled)

    async def main() -> list[int]:
        got = []
        stream = loop_thread.relayed(produce)
        async for item in stream:
            got.append(item)
            if len(got) == 5:
                break
        await stream.aclose()
        return got

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
    assert loop_thread.submit(_is_set(cancelled)).result(timeout=10)


async def _is_set(event: asyncio.Event) -> bool:
    return event.is_set()


def test_a_producer_error_reaches_the_consumer_after_its_items(loop_thread) -> None:
    async def produce() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise ValueError("boom")

    async def main() -> list[int]:
        got = []
        with pytest.raises(ValueError, match="boom"):
            async for item in loop_thread.relayed(produce):
                got.append(item)
        return got

    assert asyncio.run(main()) == [1, 2]


def test_pushed_items_follow_those_already_queued_and_end_once(loop_thread) -> None:
    async def produce() -> AsyncIterator[int]:
        for i in range(100):
            yield i
            if i % 10 == 0:
                await asyncio.sleep(0)

    async def main() -> tuple[int, list[int], list[BaseException | None]]:
        items = loop_thread.relayed(produce)
        first = await anext(items)
        await asyncio.sleep(0.05)  # more items reach this loop's queue before the switch
        got: list[int] = []
        ends: list[BaseException | None] = []
        done = asyncio.Event()

        def end(error: BaseException | None) -> None:
            ends.append(error)
            done.set()

        items.push_to(got.append, end)
        await done.wait()
        await items.aclose()
        return first, got, ends

    first, got, ends = asyncio.run(main())
    assert [first, *got] == list(range(100))
    assert ends == [None]


def test_a_push_callback_that_fails_ends_the_stream_and_stops_the_producer(loop_thread) -> None:
    stopped = asyncio.Event()

    def produce() -> AsyncIterator[int]:
        return _endless(stopped)

    async def main() -> list[BaseException | None]:
        items = loop_thread.relayed(produce)
        ends: list[BaseException | None] = []
        done = asyncio.Event()

        def put(item: int) -> None:
            if item == 3:
                raise ValueError("bad item")

        def end(error: BaseException | None) -> None:
            ends.append(error)
            done.set()

        items.push_to(put, end)
        await done.wait()
        await items.aclose()
        return ends

    ends = asyncio.run(main())
    assert len(ends) == 1 and isinstance(ends[0], ValueError)
    assert loop_thread.submit(_is_set(stopped)).result(timeout=10)


@pytest.mark.parametrize("how", ["iterated", "pushed"])
def test_closing_returns_once_the_producer_has_ended(loop_thread, how) -> None:
    """vLLM's app ends a request a while after its client left (the disconnect, the abort):
    closing must wait for that, or the job's record would show the engine still running it."""
    import threading

    ended = threading.Event()

    async def produce() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.001)
        finally:
            await asyncio.sleep(0.2)  # the abort takes its time
            ended.set()

    async def main() -> bool:
        if how == "iterated":
            items = loop_thread.relayed(produce)
            await anext(items)
        else:
            items = loop_thread.relayed(produce)
            await anext(items)
            got = asyncio.Event()
            items.push_to(lambda item: got.set(), lambda error: None)
            await got.wait()
        await items.aclose()
        return ended.is_set()

    assert asyncio.run(main())


def test_a_pushing_producer_relays_its_items_its_error_and_its_end(loop_thread) -> None:
    """`pushed`: a producer that hands each item to a callback (how vLLM's app's ASGI `send`
    reaches route jobs) relays like an iterated one: items in order, then its error; closing
    cancels it and returns once it has ended. The error is the consumer's alone: the loop
    does not report it again as a task exception never retrieved."""
    import gc
    import threading

    ended = threading.Event()
    reported: list[dict] = []
    loop_thread.loop.set_exception_handler(lambda loop, context: reported.append(context))

    async def finite(emit) -> None:
        for i in range(100):
            emit(i)
            if i % 10 == 0:
                await asyncio.sleep(0)
        raise ValueError("the app failed")

    async def endless(emit) -> None:
        try:
            i = 0
            while True:
                emit(i)
                i += 1
                await asyncio.sleep(0.001)
        finally:
            await asyncio.sleep(0.2)  # the abort takes its time
            ended.set()

    async def main() -> tuple[list[int], BaseException | None, bool]:
        got: list[int] = []
        error: BaseException | None = None
        try:
            async for item in loop_thread.pushed(finite):
                got.append(item)
        except ValueError as exc:
            error = exc
        items = loop_thread.pushed(endless)
        assert await anext(items) == 0
        await items.aclose()
        return got, error, ended.is_set()

    got, error, closed_after_end = asyncio.run(main())
    assert got == list(range(100))
    assert str(error) == "the app failed"
    assert closed_after_end
    del error  # its traceback holds the producer's task
    gc.collect()  # a finished task reports an exception never retrieved when collected
    assert reported == []


def test_a_consumer_on_the_loop_thread_gets_its_items_without_wakeups(loop_thread) -> None:
    """The job loop runs on the engine's loop: its streams need no cross-thread wake-up."""
    cancelled = asyncio.Event()

    async def produce(n: int) -> AsyncIterator[tuple[int, int]]:
        for i in range(50):
            yield n, i
            if i % 10 == 0:
                await asyncio.sleep(0)

    async def main() -> tuple[list[list[tuple[int, int]]], list[int], int]:
        loop = asyncio.get_running_loop()
        wakeups = count_wakeups(loop)
        try:
            async def consume(n: int) -> list[tuple[int, int]]:
                return [item async for item in loop_thread.relayed(lambda: produce(n))]

            results = await asyncio.gather(*(consume(n) for n in range(8)))
            got: list[int] = []
            stream = loop_thread.relayed(lambda: _endless(cancelled))
            async for item in stream:
                got.append(item)
                if len(got) == 3:
                    break
            await stream.aclose()
            assert await loop_thread.call(lambda: _is_set(cancelled))
        finally:
            del loop.call_soon_threadsafe
        return results, got, len(wakeups)

    results, got, wakeups = loop_thread.submit(main()).result(timeout=30)
    for n, items in enumerate(results):
        assert items == [(n, i) for i in range(50)]
    assert got == [0, 1, 2]
    assert wakeups <= 1, wakeups  # the close asks its producer to stop (one call)
