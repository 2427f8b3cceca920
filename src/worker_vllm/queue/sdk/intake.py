"""Job intake driven by events: the runpod SDK's job loop without its idle waits.

runpod 1.10.0's ``JobScaler`` sleeps 1 s whenever its slots are full and starts taken jobs from
a loop that wakes every 0.1 s, so a freed slot stays empty for up to a second and a taken job
waits before it starts. ``EventIntake`` replaces those loops: a freed slot triggers the next
job-take at once, a taken job starts at once, the engine's own load decides how many jobs to
take (``worker_vllm.queue.admission``: an engine step that frees room wakes the intake), a stop
signal that arrives before its job is remembered so the job never starts, and a closed intake
(the engine died) takes nothing more.
Everything else stays the SDK's: job-take and its batch sizes, stream and done posts, the stop
channel, the heartbeat's job list, SIGTERM handling.

The SDK builds its scaler inside ``runpod.serverless.start`` (``rp_scale.JobScaler(config)``),
with no hook for another; ``install`` swaps the class there. ``tests/test_sdk_intake.py`` checks
every SDK name and signature this relies on, so an SDK upgrade fails CI instead of silently
dropping the override.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from runpod.http_client import AsyncClientSession, TooManyRequests
from runpod.serverless.modules import rp_scale

from worker_vllm.queue.admission import Admission, FixedAdmission
from worker_vllm.queue.sdk.job_state import JobIds
from worker_vllm.queue.sdk.poster import Poster
from worker_vllm.queue.sdk.results import handle_job
from worker_vllm.queue.sdk.start import StartOnLoop
from worker_vllm.queue.sdk.stops import TOO_MANY_REQUESTS_S, StopChannel

log = logging.getLogger(__name__)

# Back-off after a failed job-take (the SDK retries those at once, a busy loop while the
# platform is unreachable); a 429 backs off TOO_MANY_REQUESTS_S, the SDK's own figure.
TAKE_ERROR_S = 1.0


class IntakeGate:
    """Closes the intake from outside the job loop (any thread): once closed, no job is taken
    or started. ``closed`` holds the reason."""

    def __init__(self) -> None:
        self.closed: str | None = None
        self._intake: EventIntake | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, intake: EventIntake, loop: asyncio.AbstractEventLoop) -> None:
        self._intake, self._loop = intake, loop

    def close(self, reason: str) -> None:
        if self.closed is not None:
            return
        self.closed = reason
        log.error("Job intake closed: %s", reason)
        if self._intake is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._intake.stop_taking)


class EventIntake(StopChannel, StartOnLoop, rp_scale.JobScaler):
    """The SDK's JobScaler with its polling replaced by waits on events (see the module doc).

    Its extra config keys: ``intake_gate`` (an IntakeGate), ``admission`` (an Admission: how
    many jobs to take, from the engine's load; without it, the constant concurrency),
    ``drain_timeout`` (seconds to let running jobs end after the gate closed) and
    ``job_loop`` (see ``StartOnLoop``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        # The SDK reads config["jobs_handler"] in local test mode only; in production too here.
        self.jobs_handler = config.get("jobs_handler") or handle_job
        # The SDK's concurrency is a constant: read once, never resized.
        self.admission: Admission | FixedAdmission = (
            config.get("admission") or FixedAdmission(int(self.concurrency_modifier(1))))
        self.current_concurrency = self.admission.limit
        self.jobs = self.admission.jobs  # the jobs started, and how each ended
        self.gate: IntakeGate = config.get("intake_gate") or IntakeGate()
        self.drain_timeout: float = float(config.get("drain_timeout", 1.0))
        self.stopped_early = {}  # job id -> when its stop arrived (see StopChannel)
        self._changed = asyncio.Event()  # a slot freed, or the intake closed
        self._taking: asyncio.Future[list[dict[str, Any]]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.job_ids = JobIds(self.job_progress)  # the SDK's tracker, for the heartbeat

    async def run(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self.gate.bind(self, loop)
        self.admission.wake_when_room(lambda: loop.call_soon_threadsafe(self._changed.set))
        async with AsyncClientSession() as session:
            self.poster = Poster(session.headers)  # results; job-takes on the SDK's session
            stops = asyncio.create_task(self.monitor_stop_signals(session))
            try:
                await self.get_jobs(session)
                await _drain(list(self.jobs_tasks.values()),
                             None if self.gate.closed is None else self.drain_timeout)
            finally:
                stops.cancel()
                await asyncio.gather(stops, return_exceptions=True)
                self.poster.close()

    def kill_worker(self) -> None:
        """SIGTERM: take no more jobs; the jobs running (and any a job-take in flight brings)
        finish. Called from a signal handler, hence the thread-safe wake-up."""
        super().kill_worker()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._changed.set)

    async def set_scale(self) -> None:
        """Concurrency is constant (see ``__init__``)."""

    def current_occupancy(self) -> int:
        return len(self.jobs_tasks)

    def stop_taking(self) -> None:
        """The gate closed: abandon a job-take in flight (the engine is gone; what it would
        bring is left to the platform) and stop waiting for slots."""
        self._changed.set()
        if self._taking is not None:
            self._taking.cancel()

    def _open(self) -> bool:
        return self.is_alive() and self.gate.closed is None

    async def get_jobs(self, session: Any) -> None:
        """Take jobs whenever there is room, as many as there is room for; wait on a freed
        slot or (with an admission) an engine step that opens room."""
        while self._open():
            self._changed.clear()
            self.admission.arm()
            free = self.admission.room()
            if free <= 0:
                await self._changed.wait()
                continue
            self.admission.arm(False)
            self.admission.asking()
            self._taking = asyncio.ensure_future(_take(
                self.jobs_fetcher, session, free, self.jobs_fetcher_timeout))
            jobs: list[dict[str, Any]] = []
            try:
                jobs = await self._taking
            except asyncio.CancelledError:
                if self.gate.closed is None:
                    raise
                return
            finally:
                self._taking = None
                self.admission.took(free, len(jobs))  # an abandoned take ended too
            for job in jobs:
                self._start(job)

    def _start(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        if self.stopped_early.pop(job_id, None) is not None:
            log.info("Job %s was stopped before it started: not run", job_id)
            return
        if self.gate.closed is not None:
            # Taken as the intake closed: not started, not answered; the platform gives the
            # in-progress jobs of a worker that exits to another worker.
            log.warning("Job %s taken as the intake closed: left to the platform", job_id)
            return
        self.job_ids.add(job_id)  # the heartbeat reports these ids
        self.jobs.start(job_id)
        self.jobs_tasks[job_id] = asyncio.create_task(self.handle_job(self.poster, job))

    async def handle_job(self, poster: Poster, job: dict[str, Any]) -> None:
        try:
            await self.jobs_handler(poster, self.config, job)
        except asyncio.CancelledError:
            log.info("Job %s stopped", job["id"])
        except Exception as exc:
            log.error("Job %s: the SDK failed to run or post it (%s: %s)", job["id"],
                      type(exc).__name__, exc)
        finally:
            self.job_ids.remove(job["id"])
            self.jobs_tasks.pop(job["id"], None)
            self.jobs.ended(job["id"])
            self._changed.set()


async def _drain(tasks: list[asyncio.Task[None]], timeout: float | None) -> None:
    """Let running jobs end: all of them on SIGTERM (`timeout` None); for `timeout` seconds
    once the intake's gate closed (they fail fast when the engine is gone)."""
    if tasks:
        log.info("Waiting for %d running job(s) to end", len(tasks))
        await asyncio.wait(tasks, timeout=timeout)


async def _take(fetch: Any, session: Any, count: int, timeout: float
                ) -> list[dict[str, Any]]:
    """One job-take for up to `count` jobs: the jobs, or none once it ended without any."""
    try:
        async with asyncio.timeout(timeout):
            return list(await fetch(session, count) or [])
    except TooManyRequests:
        await asyncio.sleep(TOO_MANY_REQUESTS_S)
    except TimeoutError:
        pass  # the long-poll ended without a job
    except Exception as exc:
        log.error("Job-take failed (%s: %s); retrying in %.0f s", type(exc).__name__, exc,
                  TAKE_ERROR_S)
        await asyncio.sleep(TAKE_ERROR_S)
    return []


def install() -> None:
    """Make ``runpod.serverless.start`` build an EventIntake instead of its JobScaler."""
    rp_scale.JobScaler = EventIntake  # type: ignore[misc]
