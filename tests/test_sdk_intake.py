"""The job intake that replaces the runpod SDK's polling scaler: the SDK names it relies on, and
its behaviour against a stand-in platform (job-take and stop channel as functions; the worker
process tests drive the real SDK against the local endpoint)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import pickle
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import runpod
from runpod.serverless import worker as sdk_worker
from runpod.serverless.modules import rp_job, rp_scale
from runpod.serverless.modules.worker_state import Job, JobsProgress

from worker_vllm.engine_state import EngineCapacity, EngineLoad, RequestSize
from worker_vllm.queue.admission import Admission, Decision, FixedAdmission
from worker_vllm.queue.sdk import job_state
from worker_vllm.queue.sdk.intake import EventIntake, IntakeGate
from worker_vllm.queue.sdk.job_state import JobIds, use_private_job_state

ROOT = Path(__file__).resolve().parents[1]
SDK_SCALER = (rp_scale.JobScaler if rp_scale.JobScaler is not EventIntake
              else EventIntake.__bases__[-1])


# ----- the SDK's shape ---------------------------------------------------------------------
def test_runpod_version_is_the_pinned_one():
    pins = re.findall(r"^runpod==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert pins == [runpod.__version__]


def test_the_sdk_builds_its_scaler_where_install_replaces_it():
    assert "rp_scale.JobScaler(config)" in inspect.getsource(sdk_worker.run_worker)
    start = inspect.getsource(SDK_SCALER.start)
    assert "asyncio.run(self.run())" in start
    # What EventIntake.start keeps of the SDK's when it runs the loop on the engine's loop.
    for kept in ("sys.excepthook = _handle_uncaught_exception",
                 "signal.signal(signal.SIGTERM, self.handle_shutdown)",
                 "signal.signal(signal.SIGINT, self.handle_shutdown)"):
        assert kept in start, kept
    assert callable(rp_scale._handle_uncaught_exception)
    assert EventIntake.__bases__[-1] is SDK_SCALER
    assert SDK_SCALER.__module__ == "runpod.serverless.modules.rp_scale"


@pytest.mark.parametrize("name,params", [
    ("__init__", ["self", "config"]),
    ("run", ["self"]),
    ("get_jobs", ["self", "session"]),
    ("handle_job", ["self", "session", "job"]),
    ("monitor_stop_signals", ["self", "session"]),
    ("stop_job", ["self", "job_id"]),
    ("kill_worker", ["self"]),
    ("is_alive", ["self"]),
    ("handle_shutdown", ["self", "signum", "frame"]),
    ("current_occupancy", ["self"]),
    ("set_scale", ["self"]),
    ("start", ["self"]),
])
def test_scaler_methods_the_intake_overrides_or_calls(name, params):
    assert list(inspect.signature(getattr(SDK_SCALER, name)).parameters) == params


def test_scaler_state_the_intake_uses(tmp_path, monkeypatch):
    monkeypatch.setattr(JobsProgress, "_STATE_DIR", str(tmp_path))
    scaler = SDK_SCALER({"concurrency_modifier": lambda c: 3})
    for attr in ("concurrency_modifier", "jobs_fetcher", "jobs_fetcher_timeout", "jobs_handler",
                 "stop_signals_fetcher", "stop_signals_fetcher_timeout", "job_progress",
                 "jobs_tasks", "_shutdown_event", "config"):
        assert hasattr(scaler, attr), attr
    assert scaler.concurrency_modifier(1) == 3
    # In production (webhooks set) the SDK's own functions are used: the intake calls them.
    assert list(inspect.signature(rp_job.get_job).parameters) == ["session", "num_jobs"]
    assert list(inspect.signature(rp_job.handle_job).parameters) == ["session", "config", "job"]
    assert list(inspect.signature(rp_job.get_stop_signals).parameters) == ["session"]
    assert callable(rp_job._job_stop_url)
    for name in ("add", "remove", "clear", "get_job_list", "_save_state", "_load_state"):
        assert callable(getattr(JobsProgress, name))
    # JobIds keeps the tracker by id: the SDK's Job is equal and hashed by its id alone.
    assert Job(id="a", input={"x": 1}) == Job(id="a") and hash(Job(id="a")) == hash("a")
    assert issubclass(JobsProgress, set)
    from runpod.http_client import AsyncClientSession, TooManyRequests  # noqa: F401


def test_the_workers_results_handler_is_used_in_production_by_either_intake(tmp_path,
                                                                          monkeypatch):
    """The SDK takes config["jobs_handler"] in local test mode only; in production (webhooks
    set) its scaler uses rp_scale's handle_job, which the "sdk" intake replaces."""
    monkeypatch.setattr(JobsProgress, "_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(rp_scale, "IS_LOCAL_TEST", False)
    init = inspect.getsource(SDK_SCALER.__init__)
    assert "self.jobs_handler = handle_job" in init
    assert init.index("if not IS_LOCAL_TEST") < init.index('config.get("jobs_handler")')
    assert SDK_SCALER({}).jobs_handler is rp_job.handle_job

    async def mine(session, config, job):
        pass

    intake = EventIntake({"concurrency_modifier": lambda c: 2, "jobs_handler": mine})
    assert intake.jobs_handler is mine
    assert rp_scale.handle_job is rp_job.handle_job


# ----- behaviour against a stand-in platform ---------------------------------------------------
class Platform:
    """Job-take and the stop channel as the intake sees them: a queue of jobs and of stops."""

    def __init__(self, jobs: int, take_delay: float = 0.0) -> None:
        self.queue = [{"id": f"job-{i}", "input": {}} for i in range(jobs)]
        self.take_delay = take_delay
        self.asked: list[int] = []
        self.stops: asyncio.Queue[list[str]] = asyncio.Queue()

    async def take(self, _session: Any, count: int) -> list[dict[str, Any]] | None:
        self.asked.append(count)
        if not self.queue:
            await asyncio.sleep(0.05)  # a short long-poll
            return None
        taken, self.queue = self.queue[:count], self.queue[count:]
        await asyncio.sleep(self.take_delay)  # the response on its way to the worker
        return taken

    async def stop_signals(self, _session: Any) -> list[str]:
        try:  # a short long-poll
            async with asyncio.timeout(0.05):
                return await self.stops.get()
        except TimeoutError:
            return []


class Jobs:
    """The job handler: records concurrency and which jobs ran."""

    def __init__(self, seconds: float = 0.01) -> None:
        self.seconds = seconds
        self.running = 0
        self.peak = 0
        self.ran: list[str] = []

    async def handle(self, _session: Any, _config: Any, job: dict[str, Any]) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.ran.append(job["id"])
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.running -= 1


@pytest.fixture(autouse=True)
def private_job_state():
    use_private_job_state()


def make(scaler: type, platform: Platform, jobs: Jobs, concurrency: int, **extra: Any) -> Any:
    return scaler({"concurrency_modifier": lambda _c: concurrency, "jobs_fetcher": platform.take,
                   "jobs_handler": jobs.handle, "stop_signals_fetcher": platform.stop_signals,
                   **extra})


async def run_until_done(intake: Any, jobs: Jobs, count: int, timeout: float = 60) -> float:
    started = time.monotonic()
    task = asyncio.ensure_future(intake.run())
    async with asyncio.timeout(timeout):
        while len(jobs.ran) < count or jobs.running:
            await asyncio.sleep(0.005)
    wall = time.monotonic() - started
    intake.kill_worker()
    await asyncio.wait_for(task, 10)
    return wall


async def test_never_more_jobs_than_the_concurrency_and_takes_only_free_slots():
    platform, jobs = Platform(40), Jobs(seconds=0.02)
    intake = make(EventIntake, platform, jobs, concurrency=3)
    await run_until_done(intake, jobs, 40)
    assert sorted(jobs.ran) == sorted(f"job-{i}" for i in range(40))
    assert jobs.peak == 3
    assert max(platform.asked) == 3 and min(platform.asked) >= 1


async def test_a_freed_slot_is_filled_without_the_sdks_idle_waits():
    """The same 10 short jobs through the SDK's scaler and through the intake: the SDK idles
    a full slot for a second, the intake refills it as the job ends."""
    walls = {}
    for scaler in (SDK_SCALER, EventIntake):
        platform, jobs = Platform(10), Jobs(seconds=0.01)
        walls[scaler] = await run_until_done(make(scaler, platform, jobs, concurrency=2), jobs,
                                             10)
    assert walls[EventIntake] * 4 < walls[SDK_SCALER], walls


async def test_a_stop_that_arrives_before_its_job_means_the_job_never_starts():
    platform, jobs = Platform(4, take_delay=0.2), Jobs(seconds=0.01)
    intake = make(EventIntake, platform, jobs, concurrency=4)
    task = asyncio.ensure_future(intake.run())
    await asyncio.sleep(0.05)  # the take is on its way; the platform cancels two of its jobs
    platform.stops.put_nowait(["job-1", "job-3"])
    async with asyncio.timeout(10):
        while len(jobs.ran) < 2 or jobs.running:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    intake.kill_worker()
    await asyncio.wait_for(task, 10)
    assert sorted(jobs.ran) == ["job-0", "job-2"]
    assert not intake.stopped_early  # each remembered stop was used up


async def test_a_running_job_is_cancelled_by_its_stop():
    platform, jobs = Platform(1), Jobs(seconds=30)
    intake = make(EventIntake, platform, jobs, concurrency=2)
    task = asyncio.ensure_future(intake.run())
    async with asyncio.timeout(5):
        while not jobs.running:
            await asyncio.sleep(0.01)
    platform.stops.put_nowait(["job-0"])
    async with asyncio.timeout(5):
        while jobs.running:
            await asyncio.sleep(0.01)
    intake.kill_worker()
    await asyncio.wait_for(task, 10)
    assert not intake.jobs_tasks


async def test_a_closed_gate_takes_nothing_more_and_ends_within_the_drain_timeout():
    gate = IntakeGate()
    platform, jobs = Platform(10), Jobs(seconds=30)  # jobs that would never end by themselves
    intake = make(EventIntake, platform, jobs, concurrency=2, intake_gate=gate,
                  drain_timeout=0.3)
    task = asyncio.ensure_future(intake.run())
    async with asyncio.timeout(5):
        while jobs.running < 2:
            await asyncio.sleep(0.01)
    closed = time.monotonic()
    gate.close("the engine died")
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - closed < 2
    assert jobs.ran == ["job-0", "job-1"]
    assert len(platform.queue) == 8  # the rest stays with the platform


async def test_shutdown_lets_running_jobs_finish():
    platform, jobs = Platform(3), Jobs(seconds=0.3)
    intake = make(EventIntake, platform, jobs, concurrency=3)
    task = asyncio.ensure_future(intake.run())
    async with asyncio.timeout(5):
        while jobs.running < 3:
            await asyncio.sleep(0.01)
    intake.kill_worker()
    await asyncio.wait_for(task, 10)
    assert jobs.running == 0 and len(jobs.ran) == 3
    assert not intake.jobs_tasks


async def until(condition: Any, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_with_an_admission_the_engines_steps_decide_and_wake_the_intake():
    """Idle: one job; then nothing until the engine's step shows it; a step with room wakes the
    intake from the engine's thread; requests waiting in the engine stop it."""
    admission, gate = Admission(EngineCapacity(128, 4096, 16)), IntakeGate()
    platform, jobs = Platform(20), Jobs(seconds=30)
    intake = make(EventIntake, platform, jobs, concurrency=1, admission=admission,
                  intake_gate=gate, drain_timeout=0.1)
    task = asyncio.ensure_future(intake.run())

    def engine_step(load: EngineLoad) -> None:
        thread = threading.Thread(target=admission.observe, args=(load,))
        thread.start()
        thread.join()

    await until(lambda: jobs.running == 1 and admission._armed)
    assert platform.asked == [1]
    # The job's request: 600 prompt tokens, up to 300 more (912 in blocks); one take at most
    # doubles the requests in the engine.
    long = RequestSize(600, 0, 300)
    engine_step(EngineLoad(running=1, kv_usage=608 / 4096, in_flight=(long,)))
    await until(lambda: jobs.running == 2 and admission._armed)
    assert platform.asked == [1, 1]
    engine_step(EngineLoad(running=2, kv_usage=1216 / 4096, in_flight=(long,) * 2))
    await until(lambda: jobs.running == 4 and admission._armed)
    assert platform.asked == [1, 1, 2]  # 4 x 912 fit in 95% of the cache, 5 would not
    for load in (EngineLoad(running=3, waiting=1, in_flight=(long,) * 4),
                 EngineLoad(running=4, in_flight=(long,) * 4)):
        engine_step(load)
        assert admission._armed  # no room: no wake-up was sent
    await asyncio.sleep(0)
    assert platform.asked == [1, 1, 2] and jobs.running == 4
    gate.close("end of test")
    await asyncio.wait_for(task, 5)


async def test_while_the_engine_decides_a_take_after_the_queue_emptied_asks_for_one():
    """A take waits while the platform's queue is empty and brings what it asked for when
    jobs come, sized by the engine's load when it asked (short jobs then, maybe long ones now):
    after a take that brought less than it asked for, the next asks for one job; otherwise a
    take at most doubles the jobs held."""
    class Ramping(Admission):  # room for many, whatever runs: only the ramp bounds a take
        def _decide(self) -> Decision:
            return Decision(min(50, self.ramp.most(self.jobs.active)), "taking")

    admission = Ramping(EngineCapacity(128, 4096, 16))
    platform, jobs = Platform(11), Jobs(seconds=30)
    intake = make(EventIntake, platform, jobs, concurrency=1, admission=admission)
    task = asyncio.ensure_future(intake.run())
    async with asyncio.timeout(10):
        while len(platform.asked) < 8:  # 1, 1, 2, 4 brought in full; 8 asked, 3 brought; waits
            await asyncio.sleep(0.005)
        refilled = len(platform.asked)
        platform.queue += [{"id": f"later-{i}", "input": {}} for i in range(7)]
        while jobs.running < 18:
            await asyncio.sleep(0.005)
    intake.gate.close("end of test")
    await asyncio.wait_for(task, 5)
    assert platform.asked[:6] == [1, 1, 2, 4, 8, 1], platform.asked
    assert set(platform.asked[5:refilled]) == {1}, platform.asked  # the queue stayed empty
    after = platform.asked[refilled:]
    while after and after[0] == 1:  # the take that brought the first later job
        after.pop(0)
    assert after[0] == 12, platform.asked  # 12 jobs held: a take may double them
    assert jobs.running == 18


class ReadingPlatform(Platform):
    """A platform whose job-take first lists the SDK's tracker, as ``rp_job.get_job`` does
    (``rp_job.job_progress.get_job_list``), and records what it listed beside the intake's
    running jobs."""

    def __init__(self, jobs: int, take_delay: float = 0.0) -> None:
        super().__init__(jobs, take_delay)
        self.intake: EventIntake | None = None
        self.seen: list[tuple[set[str], set[str]]] = []  # (listed, running)

    async def take(self, session: Any, count: int) -> list[dict[str, Any]] | None:
        assert self.intake is not None
        listed = rp_job.job_progress.get_job_list()  # what rp_job.get_job does first
        self.seen.append((set(listed.split(",")) if listed else set(),
                          set(self.intake.jobs_tasks)))
        return await super().take(session, count)


def ids_in_the_file() -> set[str]:
    """The job ids as the SDK's heartbeat process reads them: from the tracker's file."""
    with open(JobsProgress._STATE_FILE, "rb") as f:
        return {job.id for job in pickle.load(f)}


async def test_job_ids_reach_the_file_at_most_once_per_interval_by_id_only(monkeypatch):
    """Jobs that come and go over several loop iterations cost one write of the file within
    its interval (the SDK wrote it at every change, each with every job's input); the
    heartbeat's reading sees them after it."""
    monkeypatch.setattr(job_state, "WRITE_INTERVAL_S", 0.05, raising=False)
    writes = []
    save = JobsProgress._save_state
    monkeypatch.setattr(JobsProgress, "_save_state",
                        lambda self: (writes.append(len(self)), save(self))[1])
    ids = JobIds(JobsProgress())
    for i in range(8):
        ids.add(f"job-{i}")
        await asyncio.sleep(0)  # each in an iteration of its own
    ids.remove("job-0")
    assert writes == [] and len(JobsProgress()) == 7  # in memory at once, on file later
    while not writes:  # the interval's end
        await asyncio.sleep(0.01)
    assert writes == [7] and ids_in_the_file() == {f"job-{i}" for i in range(1, 8)}
    with open(JobsProgress._STATE_FILE, "rb") as f:
        assert all(job.input is None for job in pickle.load(f))
    for i in range(1, 4):
        ids.remove(f"job-{i}")
    ids.flush()  # now, not at the interval's end
    assert writes == [7, 4] and ids_in_the_file() == {f"job-{i}" for i in range(4, 8)}
    ids.flush()
    assert writes == [7, 4]  # nothing new: nothing written


async def test_a_job_take_reads_the_jobs_in_flight_from_memory_not_the_file(monkeypatch):
    """The SDK's job-take says whether jobs are in flight (``_job_get_url``): from this
    process's tracker, without a file lock and a read of the file at every take."""
    loads = []
    monkeypatch.setattr(JobsProgress, "_load_state", lambda self: loads.append(1))
    monkeypatch.setattr(rp_job, "JOB_GET_URL", "http://platform/job-take/w?gpu=x")
    ids = JobIds(JobsProgress())
    assert rp_job._job_get_url().endswith("&job_in_progress=0")
    ids.add("job-a")  # not yet on file
    assert rp_job._job_get_url(4).endswith("&batch_size=4&job_in_progress=1")
    assert rp_job.job_progress.get_job_list() == "job-a"
    ids.remove("job-a")
    assert rp_job._job_get_url().endswith("&job_in_progress=0")
    assert loads == []


async def test_a_job_take_lists_every_job_in_flight():
    """The SDK's job-take lists the tracker (``get_job_list``): every job running, none that
    ended, while the file is written later."""
    class StaggeredJobs(Jobs):  # jobs of different lengths: slots free one by one
        async def handle(self, session: Any, config: Any, job: dict[str, Any]) -> None:
            self.seconds = 0.01 * (1 + int(job["id"].split("-")[1]) % 4)
            await super().handle(session, config, job)

    platform, jobs = ReadingPlatform(30), StaggeredJobs()
    platform.intake = intake = make(EventIntake, platform, jobs, concurrency=4)
    await run_until_done(intake, jobs, 30)
    assert sum(1 for _, running in platform.seen if running) >= 5, platform.seen
    for listed, running in platform.seen:
        assert listed == running
    intake.job_ids.flush()  # as at the end of its write interval
    assert ids_in_the_file() == set() and len(JobsProgress()) == 0


async def test_a_job_that_ends_as_a_take_starts_is_not_listed_by_it():
    """A job ends after the intake decided to take but before the take's first step (the
    SDK's own take then reloaded its tracker from the file, which brought ended jobs back for
    ever when the file was behind): the take lists the jobs still running."""
    zero_done, asked_after = False, False

    class Asking(FixedAdmission):
        def room(self) -> int:
            nonlocal asked_after
            asked_after = asked_after or zero_done  # the take after job-0 ended is decided
            return super().room()

    class Racing(Jobs):  # job-0 ends; job-1 ends right after the intake decides to take
        async def handle(self, session: Any, config: Any, job: dict[str, Any]) -> None:
            nonlocal zero_done
            if job["id"] == "job-0":
                await asyncio.sleep(0.01)
                zero_done = True
            elif job["id"] == "job-1":
                while not asked_after:
                    await asyncio.sleep(0)
            self.ran.append(job["id"])

    platform, jobs = ReadingPlatform(3, take_delay=0.01), Racing()
    platform.intake = intake = make(EventIntake, platform, jobs, concurrency=2,
                                    admission=Asking(2))
    await run_until_done(intake, jobs, 3)
    assert len(platform.seen) >= 2
    for listed, running in platform.seen:
        assert listed == running
    intake.job_ids.flush()  # as at the end of its write interval
    assert ids_in_the_file() == set() and len(JobsProgress()) == 0


def test_given_the_engines_loop_jobs_run_there_and_a_signal_to_another_thread_ends_it():
    """On the engine's loop (a thread of its own), the job loop's messages need no crossing
    between loops; the main thread, where Python runs signal handlers, waits in steps, so a
    SIGTERM the kernel hands to another thread still ends the loop."""
    from worker_vllm.loop_thread import LoopThread

    engine_loop = LoopThread("engine-loop", uvloop=True)
    platform, jobs = Platform(3), Jobs()
    threads: set[int] = set()

    async def handle(session: Any, config: Any, job: dict[str, Any]) -> None:
        threads.add(threading.get_ident())
        await jobs.handle(session, config, job)

    intake = make(EventIntake, platform, jobs, concurrency=2, job_loop=engine_loop.loop)
    intake.jobs_handler = handle

    def signal_when_done() -> None:
        while len(jobs.ran) < 3 or jobs.running:
            time.sleep(0.01)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # to this thread, not main

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signaller = threading.Thread(target=signal_when_done, daemon=True)
    try:
        signaller.start()
        started = time.monotonic()
        intake.start()
        assert time.monotonic() - started < 30
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        engine_loop.stop()
    assert sorted(jobs.ran) == ["job-0", "job-1", "job-2"]
    assert threads == {engine_loop._thread.ident}
    assert not intake.is_alive()


def test_the_production_worker_gives_the_intake_the_engines_loop(monkeypatch):
    """The wiring of the test above: queue/serve.py hands the engine's loop to the job loop
    (the worker-process tests run jobs through it; this names where it is chosen)."""
    from types import SimpleNamespace

    from worker_vllm.queue import serve

    given: dict[str, Any] = {}
    calls: list[str] = []
    monkeypatch.setattr(serve, "serve_jobs",
                        lambda handler, limit, **kw: (calls.append("jobs"), given.update(kw)))
    monkeypatch.setattr(serve, "freeze_vllm_env", lambda: calls.append("freeze"))
    monkeypatch.setattr(serve, "job_admission", lambda settings, runner: FixedAdmission(2))
    monkeypatch.setattr(serve, "JobHandler", lambda *args, **kw: SimpleNamespace())
    monkeypatch.setattr(serve, "on_engine_death", lambda *args, **kw: None)
    monkeypatch.setattr(serve, "end_children", lambda: None)
    engine_loop = asyncio.new_event_loop()
    try:
        core = SimpleNamespace(runner=SimpleNamespace(loop=SimpleNamespace(loop=engine_loop)),
                               settings=SimpleNamespace(job_intake="events"), app=None,
                               chat_template=None, close=lambda: None)
        assert serve.serve_until_stopped(core) == 0  # type: ignore[arg-type]
    finally:
        engine_loop.close()
    assert given["loop"] is engine_loop and given["intake"] == "events"
    assert calls == ["freeze", "jobs"]  # vLLM's settings read once before jobs run


def test_the_job_loop_starts_with_the_start_up_heap_frozen(monkeypatch):
    """A full garbage collection of the start-up heap, set off by decoding a large job input,
    would stop the job loop for a quarter of a second or more (a batch job's first message)."""
    from worker_vllm.queue.sdk import job_loop

    frozen_at_start: list[int] = []
    monkeypatch.setattr(runpod.serverless, "start",
                        lambda config: frozen_at_start.append(gc.get_freeze_count()))
    start_up_heap = [[] for _ in range(1000)]  # objects the collector tracks, not yet frozen
    before = gc.get_freeze_count()
    job_loop.serve_jobs(_nothing_handler, 1, intake="sdk")
    assert frozen_at_start and frozen_at_start[0] >= before + len(start_up_heap)


async def _nothing_handler(job: dict[str, Any]) -> Any:
    yield job["id"]


async def test_a_take_abandoned_as_the_gate_closes_is_not_left_in_flight():
    """The gate closes during a job-take (cancelled: the engine is gone): the admission hears
    that the take ended, as after any other, and answers as for an idle engine (one job), not
    'a job-take is in flight' for the rest of the process's life."""
    admission, gate = Admission(EngineCapacity(128, 4096, 16)), IntakeGate()
    platform, jobs = Platform(0), Jobs()  # an empty queue: every take waits
    intake = make(EventIntake, platform, jobs, concurrency=1, admission=admission,
                  intake_gate=gate, drain_timeout=0.1)
    task = asyncio.ensure_future(intake.run())
    await until(lambda: len(platform.asked) >= 2)
    gate.close("the engine died")  # the intake's one await is its take: cancelled
    await asyncio.wait_for(task, 5)
    assert admission.room() == 1
