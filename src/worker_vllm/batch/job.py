"""A batch job: its lines run through vLLM's app in-process, many in the engine at once
(``LineWindow``), and come back as Batch API output lines in the order they finish.

Output: with ``"stream": true`` the finished lines are streamed as they come (each message
``{"lines": [...]}``, within one stream message's size), then ``{"request_counts", "usage",
"seconds"}``; without, one output holds all of it. Stopping the job (cancel, timeout) aborts
every line in the engine at once; an engine death ends the job as it ends any job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from worker_vllm.batch.lines import (
    LineError,
    RequestLine,
    error_line,
    output_line,
    raw_lines,
    request_line,
)
from worker_vllm.batch.window import LineWindow
from worker_vllm.config.settings import WorkerSettings
from worker_vllm.engine import VLLMApp
from worker_vllm.jobs.batching import BatchPolicy, batched
from worker_vllm.jobs.shapes import BatchInput
from worker_vllm.jobs.vllm_app import app_error


class BatchTally:
    """The batch's counts and tokens, from its output lines."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.completed = self.failed = 0
        self.prompt_tokens = self.completion_tokens = 0

    def took(self, line: dict[str, Any]) -> dict[str, Any]:
        if line["error"] is not None:
            self.failed += 1
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


def _tokens(usage: dict[str, Any], *names: str) -> int:
    return next((usage[n] for n in names if isinstance(usage.get(n), int)), 0)


async def run_line(app: VLLMApp, line: RequestLine, job_id: str) -> dict[str, Any]:
    """One line's answer from vLLM's app as its output line. A server error with the engine
    dead is raised (it ends the batch); any other error is the line's."""
    request_id = f"{job_id}-{line.number}"
    data = json.dumps(line.body, ensure_ascii=False).encode()
    response = await app.request("POST", line.path, data, request_id)
    async with contextlib.aclosing(response.body) as chunks:
        raw = b"".join([chunk async for chunk in chunks])
    if response.status < 400:
        return output_line(job_id, line.number, line.custom_id, response.status, request_id,
                           json.loads(raw))
    error = app_error(app, "POST", line.path, line.body, response.status, raw)
    if response.status >= 500 and app.runner.errored:
        raise error
    return output_line(job_id, line.number, line.custom_id, response.status, request_id,
                       None, error)


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


async def finished_lines(app: VLLMApp, inp: BatchInput, settings: WorkerSettings,
                         job_id: str) -> AsyncIterator[dict[str, Any]]:
    """The batch's output lines as they finish; lines start as the engine makes room."""
    window = LineWindow(app.runner.capacity().max_num_seqs)
    lines, source, seen = _Lines(), raw_lines(inp), set[str]()
    loop = asyncio.get_running_loop()
    # An engine step can open room: wake the batch (on this loop) when it waits for one.
    waiting_for_room = False

    def on_step() -> None:
        if waiting_for_room:
            loop.call_soon_threadsafe(lines.wake.set)

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


async def run_batch(app: VLLMApp, inp: BatchInput, settings: WorkerSettings, job_id: str,
                    policy: BatchPolicy) -> AsyncIterator[dict[str, Any]]:
    tally = BatchTally()
    lines = finished_lines(app, inp, settings, job_id)
    async with contextlib.aclosing(lines):
        if not inp.stream:
            done = [tally.took(line) async for line in lines]
            yield {"lines": done, **tally.summary()}
            return
        async with contextlib.aclosing(batched(lines, policy, weigh=_weight)) as batches:
            async for batch in batches:
                yield {"lines": [tally.took(line) for line in batch.items]}
    yield tally.summary()
