"""A batch job: its lines run through vLLM's app in-process, on the engine's loop (a line's
request and answer, and the engine's step that makes room for the next lines, cross no thread),
many in the engine at once (``LineWindow``), and come back to the job's loop as Batch API output
lines in the order they finish.

Output: with ``"stream": true`` the finished lines are streamed as they come (each message
``{"lines": [...]}``, within one stream message's size; a line too large for a message is an
error line that says so), the last of them with ``{"request_counts", "usage", "seconds"}``
(alone in a message of its own where the batch fails on its failed lines or its messages pass
the platform's limit for a result); without, one output
holds all of it, and a batch whose output would pass the platform's limit for a result fails
with an error that says to stream it, as soon as that shows. Stopping the job (cancel,
timeout) aborts every line in the engine at once; an engine death ends the job as it ends any
job. With ``max_failed_lines``, more failed lines than that end the job (FAILED) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from worker_vllm.config.settings import WorkerSettings
from worker_vllm.engine import VLLMApp
from worker_vllm.errors import WorkerError
from worker_vllm.jobs.batch.lines import (
    LineError,
    RequestLine,
    error_line,
    line_count,
    output_line,
    raw_lines,
    request_line,
)
from worker_vllm.jobs.batch.window import LineWindow
from worker_vllm.jobs.flush import FlushPolicy, chunked
from worker_vllm.jobs.output_limits import (
    RESULT_BUDGET,
    STREAM_MESSAGE_BUDGET,
    too_large_for_a_message,
    too_large_for_a_result,
)
from worker_vllm.jobs.shapes import BatchInput
from worker_vllm.jobs.vllm_app import app_error, call_here
from worker_vllm.loop_thread import Relayed


class BatchTally:
    """The batch's counts and tokens, from its output lines."""

    def __init__(self, max_failed: int | None = None) -> None:
        self.started = time.monotonic()
        self.completed = self.failed = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.max_failed = max_failed
        self.first_failed: dict[str, Any] | None = None

    def took(self, line: dict[str, Any]) -> dict[str, Any]:
        if line["error"] is not None:
            self.failed += 1
            self.first_failed = self.first_failed or line
            return line
        self.completed += 1
        usage = (line["response"]["body"] or {}).get("usage") or {}
        self.prompt_tokens += _tokens(usage, "prompt_tokens", "input_tokens")
        self.completion_tokens += _tokens(usage, "completion_tokens", "output_tokens")
        return line

    def summary(self) -> dict[str, Any]:
        return {
            "request_counts": {"total": self.completed + self.failed,
                               "completed": self.completed, "failed": self.failed},
            "usage": {"prompt_tokens": self.prompt_tokens,
                      "completion_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens},
            "seconds": round(time.monotonic() - self.started, 3),
        }


    @property
    def too_many_failed(self) -> bool:
        return self.max_failed is not None and self.failed > self.max_failed

    def check_failed(self) -> None:
        """Raise once more lines failed than ``max_failed_lines`` allows."""
        if not self.too_many_failed:
            return
        line = self.first_failed or {}
        number = int(line.get("id", "_0").rsplit("_", 1)[1])
        error = line.get("error") or {}
        raise WorkerError(
            f"{self.failed} line(s) of the batch failed, more than max_failed_lines "
            f"({self.max_failed}); the lines still running were stopped. The first: line "
            f"{number} (custom_id {line.get('custom_id')!r}): {error.get('code')} "
            f"{error.get('message')}", code=422, type="batch_lines_failed",
            param="max_failed_lines")


def _tokens(usage: dict[str, Any], *names: str) -> int:
    return next((usage[n] for n in names if isinstance(usage.get(n), int)), 0)


async def run_line(app: VLLMApp, line: RequestLine, job_id: str) -> dict[str, Any]:
    """One line's answer from vLLM's app as its output line. A server error with the engine
    dead is raised (it ends the batch); any other error is the line's."""
    request_id = f"{job_id}-{line.number}"
    status, raw = await call_here(app, "POST", line.path, line.body, request_id)
    if status < 400:
        return output_line(job_id, line.number, line.custom_id, status, request_id,
                           json.loads(raw))
    error = app_error(app, "POST", line.path, line.body, status, raw)
    if status >= 500 and app.runner.errored:
        raise error
    return output_line(job_id, line.number, line.custom_id, status, request_id, None, error)


class _Lines:
    """The batch's lines in flight and those finished but not yet handed on."""

    def __init__(self) -> None:
        self.running: set[asyncio.Task[dict[str, Any]]] = set()
        self.done: deque[asyncio.Task[dict[str, Any]]] = deque()
        self.wake = asyncio.Event()

    def start(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self.running.discard(task)
        if not task.cancelled():
            self.done.append(task)
        self.wake.set()

    async def stop(self) -> None:
        """Cancel every line still running (each aborts its engine request) and wait."""
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def finished_lines(app: VLLMApp, inp: BatchInput, settings: WorkerSettings,
                   job_id: str) -> Relayed[dict[str, Any]]:
    """The batch's output lines as they finish, in the caller's loop; closing it stops every
    line still running."""
    return app.runner.loop.relayed(lambda: _lines_on_engine_loop(app, inp, settings, job_id))


async def _lines_on_engine_loop(app: VLLMApp, inp: BatchInput, settings: WorkerSettings,
                                job_id: str) -> AsyncIterator[dict[str, Any]]:
    """The batch's output lines as they finish; lines start as the engine makes room. Runs on
    the engine's loop, where vLLM reports each step (``on_step``) and answers each line."""
    window = LineWindow(app.runner.capacity().max_num_seqs)
    lines, source, seen = _Lines(), raw_lines(inp), set[str]()
    # An engine step can open room: wake the batch when it waits for one, once per wait.
    waiting_for_room = False

    def on_step() -> None:
        nonlocal waiting_for_room
        if waiting_for_room:
            waiting_for_room = False
            lines.wake.set()

    with app.runner.loads.watching(wake=on_step):
        try:
            exhausted = False
            while not exhausted or lines.running or lines.done:
                lines.wake.clear()
                while lines.done:
                    yield lines.done.popleft().result()  # raises what ends the batch
                room = 0 if exhausted else window.room(len(lines.running),
                                                       app.runner.loads.latest)
                for _ in range(room):
                    if (item := next(source, None)) is None:
                        exhausted = True
                        break
                    try:
                        line = request_line(*item, app, settings, seen)
                    except LineError as exc:
                        yield error_line(job_id, exc)
                        continue
                    lines.start(run_line(app, line, job_id))
                if room == 0 and lines.running:
                    waiting_for_room = not exhausted
                    await lines.wake.wait()
                    waiting_for_room = False
        finally:
            await lines.stop()


def _weight(line: dict[str, Any]) -> int:
    return len(json.dumps(line, ensure_ascii=False).encode())


def _over_a_message(job_id: str, line: dict[str, Any], weight: int) -> dict[str, Any]:
    """The error line that stands for a finished line too large for one stream message."""
    number = int(line["id"].rsplit("_", 1)[1])
    message = too_large_for_a_message(f"The output of line {number}", weight)
    return error_line(job_id, LineError(f"{message} (send it in a batch job without "
                                        "\"stream\", or in a job of its own)", number,
                                        line["custom_id"], code=413, type="output_too_large"))


async def _weighed(lines: AsyncIterator[dict[str, Any]], job_id: str
                   ) -> AsyncIterator[tuple[dict[str, Any], int]]:
    """Each finished line with its weight in a stream message; a line too large for one is
    an error line that says so, and the lines after it go on."""
    async for line in lines:
        weight = _weight(line)
        if weight > STREAM_MESSAGE_BUDGET:
            line = _over_a_message(job_id, line, weight)
            weight = _weight(line)
        yield line, weight


class ResultSize:
    """A batch's output without ``stream`` against the one result it must fit in: it stops at
    the limit, or as soon as its first lines show that all of them would pass it twice over."""

    # Lines finished before their mean size projects the whole batch.
    SAMPLE = 16

    def __init__(self, total_lines: int) -> None:
        self.total_lines = total_lines
        self.size = self.lines = 0

    def add(self, line: dict[str, Any]) -> None:
        self.size += _weight(line) + 1
        self.lines += 1
        projected = self.size / self.lines * self.total_lines
        if self.size > RESULT_BUDGET:
            raise self._error(f"The output of the batch's first {self.lines} lines",
                              self.size)
        if self.lines >= min(self.SAMPLE, self.total_lines) and projected > 2 * RESULT_BUDGET:
            raise self._error(f"The output of the batch's {self.total_lines} lines (projected "
                              f"from its first {self.lines})", int(projected))

    @staticmethod
    def _error(what: str, size: int) -> WorkerError:
        return WorkerError(too_large_for_a_result(what, size), code=413,
                           type="output_too_large", param="stream")


async def run_batch(app: VLLMApp, inp: BatchInput, settings: WorkerSettings, job_id: str,
                    policy: FlushPolicy) -> AsyncIterator[dict[str, Any]]:
    tally = BatchTally(inp.max_failed_lines)
    lines = finished_lines(app, inp, settings, job_id)
    # Closing the lines on an error aborts those still running.
    async with contextlib.aclosing(lines):
        if not inp.stream:
            size, done = ResultSize(line_count(inp)), []
            async for line in lines:
                size.add(line)
                done.append(tally.took(line))
                tally.check_failed()
            yield {"lines": done, **tally.summary()}
            return
        total, streamed = line_count(inp), 0
        weighed = _weighed(lines, job_id)
        async with contextlib.aclosing(chunked(weighed, policy, weigh=_second)) as chunks:
            async for chunk in chunks:
                message: dict[str, Any] = {"lines": [tally.took(line) for line, _ in
                                                     chunk.items]}
                streamed += sum(weight for _, weight in chunk.items) + MESSAGE_FRAMING
                if last := _ends_the_batch(tally, total, streamed):
                    message.update(tally.summary())
                yield message
                tally.check_failed()  # after the client has the failed lines
                if last:
                    return
    yield tally.summary()


def _ends_the_batch(tally: BatchTally, total: int, streamed: int) -> bool:
    """Whether the message with the batch's last lines carries its counts and usage too (one
    stream message, one platform round trip, fewer): not when the batch fails on its failed
    lines, nor when its messages pass the result's limit, where the result is the last
    message alone and must be the counts alone (docs/api.md)."""
    return (tally.completed + tally.failed == total and not tally.too_many_failed
            and streamed + SUMMARY_ROOM <= RESULT_BUDGET)


# Room left in the result for the summary (bytes), and what each message adds to it beyond
# its lines' weights (`{"lines": [...]}` and the separator between messages).
SUMMARY_ROOM = 64_000
MESSAGE_FRAMING = 16


def _second(item: tuple[Any, int]) -> int:
    return item[1]
