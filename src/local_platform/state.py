"""The platform's side of one endpoint: its job queue and job states."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger("local_platform")

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
DEFAULT_EXECUTION_TIMEOUT_MS = 600_000
DEFAULT_TTL_MS = 24 * 3600 * 1000
WEEK_MS = 7 * 24 * 3600 * 1000
# RunPod's bounds for a job's policy (ms): executionTimeout at least 5 s, ttl at least 10 s,
# both at most a week.
MIN_EXECUTION_TIMEOUT_MS = 5_000
MIN_TTL_MS = 10_000
# Results are kept this long after the job ends: 30 min for /run, 1 min for /runsync.
RUN_RETENTION_S = 30 * 60
RUNSYNC_RETENTION_S = 60
# A job whose worker exits while running it goes back to the queue this many times.
MAX_WORKER_RETRIES = 1
WEBHOOK_ATTEMPTS = 3  # the first call and 2 retries, 10 s apart
LONG_POLL_S = 5.0  # job-take / job-stop hold time (the SDK's HTTP timeouts are longer)


class PolicyError(ValueError):
    """A job's policy outside what the platform accepts (the API answers 400)."""


def _policy_ms(policy: dict[str, Any], name: str, default: int, minimum: int) -> float:
    value = policy.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise PolicyError(f"policy.{name} must be a number of milliseconds")
    if not minimum <= value <= WEEK_MS:
        raise PolicyError(f"policy.{name} must be between {minimum} and {WEEK_MS} ms")
    return float(value) / 1000


@dataclass
class Job:
    id: str
    input: Any
    execution_timeout: float  # seconds
    ttl: float  # seconds
    webhook: str | None = None
    sync: bool = False  # submitted with /runsync (shorter result retention)
    low_priority: bool = False
    status: str = "IN_QUEUE"
    worker_id: str | None = None
    attempts: int = 0  # times a worker took it
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    output: Any = None
    error: Any = None
    chunks: list[Any] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each (monotonic)
    streamed: int = 0  # chunks already returned by /stream
    refused: list[str] = field(default_factory=list)  # worker posts over the limits
    # The worker's heartbeats: those that listed the job while it ran, those after it ended,
    # and of those, the ones that still listed it.
    heartbeats: dict[str, int] = field(default_factory=lambda: {
        "listedWhileRunning": 0, "afterItEnded": 0, "listedAfterItEnded": 0})
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def change(self) -> asyncio.Event:
        """The next change, to wait on later (``wait_change(..., change)``) without missing
        one that happens in between."""
        return self._changed

    async def wait_change(self, timeout: float, change: asyncio.Event | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await (change or self._changed).wait()

    def view(self) -> dict[str, Any]:
        now = time.monotonic()
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.worker_id is not None:
            body["workerId"] = self.worker_id
        if self.started is not None:
            body["delayTime"] = round((self.started - self.created) * 1000)
            body["executionTime"] = round(((self.finished or now) - self.started) * 1000)
        if self.status == "COMPLETED":
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        if self.refused:
            # Not the platform's: what it refused of the worker's posts, shown locally.
            body["refusedPosts"] = self.refused
        if any(self.heartbeats.values()):
            body["heartbeats"] = self.heartbeats  # not the platform's either
        return body

    def heard_heartbeat(self, listed: bool) -> None:
        """A heartbeat of the worker after the job was taken: whether it listed the job."""
        if self.status == "IN_PROGRESS":
            self.heartbeats["listedWhileRunning"] += listed
        elif self.finished is not None:
            self.heartbeats["afterItEnded"] += 1
            self.heartbeats["listedAfterItEnded"] += listed

    def removal_time(self) -> float | None:
        """When an ended job's data goes: after its result retention, or at the end of its
        ttl (which counts from submission), whichever is first; a job that ended by its ttl
        keeps its TIMED_OUT status for the retention (the platform deletes it at once; kept
        here so that a client sees why)."""
        if self.finished is None:
            return None
        kept = self.finished + (RUNSYNC_RETENTION_S if self.sync else RUN_RETENTION_S)
        ttl_end = self.created + self.ttl
        return min(kept, ttl_end) if self.finished < ttl_end else kept

    def requeue(self) -> None:
        """Back to the queue, its earlier output gone."""
        self.status, self.started, self.finished = "IN_QUEUE", None, None
        self.output = self.error = self.worker_id = None
        self.chunks, self.chunk_times, self.streamed = [], [], 0
        self.refused = []
        self.notify()


def new_job(body: dict[str, Any], sync: bool, short_policies: bool) -> Job:
    """The job a /run or /runsync body asks for; PolicyError for a policy the platform
    refuses (`short_policies`: timeouts below the platform's minimums are accepted)."""
    policy = body.get("policy") or {}
    if not isinstance(policy, dict):
        raise PolicyError("policy must be an object")
    low_priority = policy.get("lowPriority", False)
    if not isinstance(low_priority, bool):
        raise PolicyError("policy.lowPriority must be true or false")
    return Job(
        id=f"{uuid.uuid4()}-local",
        input=body.get("input"),
        execution_timeout=_policy_ms(policy, "executionTimeout", DEFAULT_EXECUTION_TIMEOUT_MS,
                                     1 if short_policies else MIN_EXECUTION_TIMEOUT_MS),
        ttl=_policy_ms(policy, "ttl", DEFAULT_TTL_MS, 1 if short_policies else MIN_TTL_MS),
        webhook=body.get("webhook"),
        sync=sync,
        # One worker here: lowPriority (no scale-up for this job) changes nothing.
        low_priority=low_priority,
    )


async def post_webhook(job: Job, retry_delay: float) -> None:
    """POST the final status; a non-2xx answer or a failed call is retried twice."""
    body = job.view()
    for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.post(job.webhook, json=body)  # type: ignore[arg-type]
            if response.is_success:
                return
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            problem = str(exc) or type(exc).__name__
        log.warning("webhook for job %s failed (attempt %d of %d): %s", job.id, attempt,
                    WEBHOOK_ATTEMPTS, problem)
        if attempt < WEBHOOK_ATTEMPTS:
            await asyncio.sleep(retry_delay)


class WorkerSide:
    """The endpoint as the worker's job loop sees it: job-take (a long-poll), the stop
    channel, timeouts. Mixed into ``Endpoint``, which holds the state."""

    queue: collections.deque[str]
    jobs: dict[str, Job]
    queued: asyncio.Event
    to_stop: set[str]
    stop_requested: asyncio.Event
    take_delay: float
    last_seen: float
    _requeue: Callable[..., None]
    stop: Callable[..., None]

    async def take(self, batch_size: int, worker_id: str = "local-worker",
                   gone: Callable[[], Awaitable[bool]] | None = None) -> list[Job]:
        """Up to `batch_size` queued jobs for a worker's job-take (a long-poll). `gone` says
        whether the worker hung up meanwhile: a killed worker's long-poll outlives it, and
        must not take the jobs its death put back in the queue."""
        self.last_seen = time.monotonic()
        if not self.queue:
            self.queued.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LONG_POLL_S):
                    await self.queued.wait()
        if gone is not None and await gone():
            return []
        taken = []
        while self.queue and len(taken) < batch_size:
            job = self.jobs.get(self.queue.popleft())
            if job is None or job.status != "IN_QUEUE":
                continue
            job.status, job.started = "IN_PROGRESS", time.monotonic()
            job.worker_id = worker_id
            job.attempts += 1
            job.notify()
            asyncio.get_running_loop().create_task(self._enforce_timeout(job))
            taken.append(job)
        if taken and self.take_delay:
            await asyncio.sleep(self.take_delay)  # the answer on its way to the worker
            if gone is not None and await gone():
                self._give_back(taken)
                return []
        return taken

    def _give_back(self, jobs: list[Job]) -> None:
        """Jobs assigned to a worker that hung up before it got them: first in line again."""
        assigned = [job for job in jobs if job.status == "IN_PROGRESS"]
        for job in assigned:
            job.attempts -= 1  # never reached a worker: not an attempt
        self._requeue(assigned, front=True)

    async def _enforce_timeout(self, job: Job) -> None:
        attempt = job.attempts
        await asyncio.sleep(job.execution_timeout)
        if job.status == "IN_PROGRESS" and job.attempts == attempt:
            self.stop(job, "TIMED_OUT", error="The job ran longer than its executionTimeout")

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


class Endpoint(WorkerSide):
    """Job queue and state: the part of the platform one worker sees."""

    def __init__(self, max_queue: int, stream_post_delay: float = 0.0, take_delay: float = 0.0,
                 short_policies: bool = False, webhook_retry_delay: float = 10.0) -> None:
        # Seconds each job-stream POST is held before it is answered: the platform's round
        # trip, which the worker's SDK awaits before it takes the next yield.
        self.stream_post_delay = stream_post_delay
        # Seconds a job-take answer takes to reach the worker after its jobs were assigned.
        self.take_delay = take_delay
        # Accept policies below the platform's minimums (for tests of timeouts in ms).
        self.short_policies = short_policies
        self.webhook_retry_delay = webhook_retry_delay
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[str] = collections.deque()
        self.max_queue = max_queue
        self.queued = asyncio.Event()
        self.to_stop: set[str] = set()
        self.stop_requested = asyncio.Event()
        self.counts = collections.Counter[str]()
        self.last_seen = 0.0  # last time the worker called in

    # ----- client side ---------------------------------------------------------------
    def submit(self, body: dict[str, Any], sync: bool = False) -> Job:
        """Queue a job; PolicyError for a policy the platform refuses."""
        job = new_job(body, sync, self.short_policies)
        self.jobs[job.id] = job
        self.queue.append(job.id)
        self.queued.set()
        return job

    def retry(self, job: Job) -> None:
        """/retry: a FAILED or TIMED_OUT job runs again under its id."""
        if job.status not in ("FAILED", "TIMED_OUT"):
            raise PolicyError(f"Only FAILED or TIMED_OUT jobs can be retried; this one is "
                              f"{job.status}")
        self.counts["retried"] += 1
        self._requeue([job], front=False)

    def worker_exited(self, code: int | None) -> None:
        """The in-progress jobs of a worker that exited go back to the queue (first in line),
        up to MAX_WORKER_RETRIES times each; then they fail."""
        retried = []
        for job in self.in_progress():
            if job.attempts > MAX_WORKER_RETRIES:
                self.finish(job, "FAILED", error=f"The worker exited with code {code} while "
                            f"running this job ({job.attempts} times)")
                continue
            log.warning("Job %s goes back to the queue: its worker exited", job.id)
            retried.append(job)
        self.counts["retried"] += len(retried)
        self._requeue(retried, front=True)

    def _requeue(self, jobs: list[Job], *, front: bool) -> None:
        """Jobs back in the queue, their earlier output gone: first in line (in their order)
        or last."""
        for job in reversed(jobs) if front else jobs:
            job.requeue()
            if front:
                self.queue.appendleft(job.id)
            else:
                self.queue.append(job.id)
        self.queued.set()

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
            asyncio.get_running_loop().create_task(post_webhook(job, self.webhook_retry_delay))

    def stop(self, job: Job, status: str, error: Any = None) -> None:
        was_running = job.status == "IN_PROGRESS"
        self.finish(job, status, error=error)
        if was_running:
            self.to_stop.add(job.id)
            self.stop_requested.set()

    def expire(self) -> None:
        """A job's ttl covers its whole life from submission: queued or running, it ends
        TIMED_OUT; ended jobs go once their results are no longer kept."""
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.status not in FINAL and now - job.created > job.ttl:
                self.stop(job, "TIMED_OUT", error="The job's ttl expired")
            removal = job.removal_time()
            if removal is not None and now >= removal:
                del self.jobs[job.id]
