"""The platform's side of one endpoint: its job queue and job states."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger("local_platform")

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
DEFAULT_EXECUTION_TIMEOUT_MS = 600_000
DEFAULT_TTL_MS = 24 * 3600 * 1000
LONG_POLL_S = 5.0  # job-take / job-stop hold time (the SDK's HTTP timeouts are longer)


@dataclass
class Job:
    id: str
    input: Any
    execution_timeout: float  # seconds
    ttl: float  # seconds
    webhook: str | None = None
    status: str = "IN_QUEUE"
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    output: Any = None
    error: Any = None
    chunks: list[Any] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each (monotonic)
    streamed: int = 0  # chunks already returned by /stream
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    def view(self) -> dict[str, Any]:
        now = time.monotonic()
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            body["delayTime"] = round((self.started - self.created) * 1000)
            body["executionTime"] = round(((self.finished or now) - self.started) * 1000)
        if self.status == "COMPLETED":
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


class Endpoint:
    """Job queue and state: the part of the platform one worker sees."""

    def __init__(self, max_queue: int, stream_post_delay: float = 0.0) -> None:
        # Seconds each job-stream POST is held before it is answered: the platform's round
        # trip, which the worker's SDK awaits before it takes the next yield.
        self.stream_post_delay = stream_post_delay
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[str] = collections.deque()
        self.max_queue = max_queue
        self.queued = asyncio.Event()
        self.to_stop: set[str] = set()
        self.stop_requested = asyncio.Event()
        self.counts = collections.Counter[str]()
        self.last_seen = 0.0  # last time the worker called in

    # ----- client side ---------------------------------------------------------------
    def submit(self, body: dict[str, Any]) -> Job:
        policy = body.get("policy") or {}
        job = Job(
            id=f"{uuid.uuid4()}-local",
            input=body.get("input"),
            execution_timeout=float(policy.get("executionTimeout", DEFAULT_EXECUTION_TIMEOUT_MS))
            / 1000,
            ttl=float(policy.get("ttl", DEFAULT_TTL_MS)) / 1000,
            webhook=body.get("webhook"),
        )
        self.jobs[job.id] = job
        self.queue.append(job.id)
        self.queued.set()
        return job

    def finish(self, job: Job, status: str, *, output: Any = None, error: Any = None) -> None:
        if job.status in FINAL:
            return  # a late result of a cancelled or timed-out job is dropped
        job.status, job.output, job.error = status, output, error
        job.finished = time.monotonic()
        self.counts[status.lower()] += 1
        if job.id in self.queue:
            self.queue.remove(job.id)
        job.notify()
        if job.webhook:
            asyncio.get_running_loop().create_task(self._post_webhook(job))

    def stop(self, job: Job, status: str) -> None:
        was_running = job.status == "IN_PROGRESS"
        self.finish(job, status)
        if was_running:
            self.to_stop.add(job.id)
            self.stop_requested.set()

    async def _post_webhook(self, job: Job) -> None:
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                await client.post(job.webhook, json=job.view())  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            log.warning("webhook for job %s failed: %s", job.id, exc)

    def expire(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.status == "IN_QUEUE" and now - job.created > job.ttl:
                self.finish(job, "TIMED_OUT", error="The job's ttl expired before it started")
            if job.status in FINAL and now - (job.finished or now) > job.ttl:
                del self.jobs[job.id]

    # ----- worker side ---------------------------------------------------------------
    async def take(self, batch_size: int) -> list[Job]:
        self.last_seen = time.monotonic()
        if not self.queue:
            self.queued.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LONG_POLL_S):
                    await self.queued.wait()
        taken = []
        while self.queue and len(taken) < batch_size:
            job = self.jobs.get(self.queue.popleft())
            if job is None or job.status != "IN_QUEUE":
                continue
            job.status, job.started = "IN_PROGRESS", time.monotonic()
            job.notify()
            asyncio.get_running_loop().create_task(self._enforce_timeout(job))
            taken.append(job)
        return taken

    async def _enforce_timeout(self, job: Job) -> None:
        await asyncio.sleep(job.execution_timeout)
        if job.status == "IN_PROGRESS":
            self.stop(job, "TIMED_OUT")

    async def stops(self) -> list[str]:
        if not self.to_stop:
            self.stop_requested.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LONG_POLL_S):
                    await self.stop_requested.wait()
        ids, self.to_stop = sorted(self.to_stop), set()
        return ids

    def in_progress(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.status == "IN_PROGRESS"]
