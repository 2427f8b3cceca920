"""Job admission: the worker takes another job when its engine could start it now.

The signals are the engine's own, after each of its steps (``EngineLoad``: running and waiting
requests, KV-cache usage, the sizes of the requests in flight and of those that finished).
The worker asks the platform for more jobs while vLLM's scheduler has no request waiting and,
where the KV projection models the cache, while the cache will have room at every step until
the requests in flight end, for what they will hold then plus the next jobs as they grow
(``worker_vllm.queue.projection``: requests near their end free their blocks while new ones are
still small). Where it does not (no KV cache, as for encoder-only embedders and rerankers;
several KV-cache groups), the engine's counts alone decide: no request waiting and the cache
below ``KV_START_LIMIT``. Otherwise jobs stay in the platform's queue, where another worker can
take them and the autoscaler sees them.

Jobs, not requests: the requests in flight are grouped by the job whose id they carry (the
n children of one request share its id), jobs taken that have no request in the engine yet
count as pending at the expected size, and the next job is expected to hold as many requests
as the recent ones did.

What a request will hold when it ends: its prompt plus the share of its ``max_tokens`` that
requests generated before it (learned from the last finished ones; all of it before any has
finished), and never less than it holds already; in whole KV blocks. The next job is expected
to be like the recent ones or those in flight, whichever is larger.

The ramp (``RAMP``): a take brings at most as many jobs as the engine has shown it holds
(jobs in it, and those that ended since the last take, counted twice) and waits for an engine
step after the last take's jobs were taken; after a take that found fewer jobs than it asked
for (the platform's queue is empty, the next take waits for new jobs of unknown size) it asks
for one. Short jobs that end within a round trip therefore double each take, as long jobs do.
Room: ``KV_TARGET`` of the cache, or ``KV_TARGET_SHORT`` while the next job and every request
in flight are short in tokens (``worker_vllm.queue.tuning``).
Bounds: never more jobs than ``max_num_seqs`` (or ``MAX_CONCURRENCY`` when set, a cap); a
worker with no job in its engine takes one (a prompt too long for the cache then gets vLLM's
own error instead of waiting forever); a taken job is never given back.
Bookkeeping: the admission owns the set of jobs started (``JobBook``); each end removes a job
once, whatever order the SDK's callbacks run in.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from worker_vllm.engine_state import KV_START_LIMIT, EngineCapacity, EngineLoad, RequestSize
from worker_vllm.queue.projection import Projection, Shape
from worker_vllm.queue.tuning import (
    BUSY_LOG_S,
    HISTORY,
    KV_TARGET,
    KV_TARGET_SHORT,
    RAMP,
    RECENT_WEIGHT,
    REGIME_LOG_S,
    SHORT_JOB_SHARE,
)

log = logging.getLogger(__name__)

# max_tokens is learned in classes of powers of two (2**0 .. 2**39 tokens).
SIZE_CLASSES = 40


class RequestSizes:
    """What requests will hold in the KV cache, learned from those that ended. The share of
    ``max_tokens`` a request uses is learned per power of two of its ``max_tokens``: chat jobs
    without ``max_tokens`` (the rest of the context: tens of thousands) stop far earlier than
    their bound, jobs that ask for 16 tokens use them all."""

    def __init__(self) -> None:
        self.shares: deque[float] = deque(maxlen=HISTORY)  # generated / max_tokens
        self.share = 1.0  # their mean: all of max_tokens before any request finished
        self._by_size: dict[int, deque[float]] = {}  # the same, by log2(max_tokens)
        # Share by log2(max_tokens) for numpy lookups, where a finished request showed it.
        self._table = np.ones(SIZE_CLASSES)
        self._known = np.zeros(SIZE_CLASSES, dtype=bool)
        # The recent requests' prompt and final tokens, weighted towards the latest.
        self.recent: Shape | None = None
        # Requests per job (n > 1: n children), as last seen in the engine.
        self.per_job = 1.0

    def learn(self, r: RequestSize) -> None:
        if r.max_tokens:
            share = min(1.0, r.generated / r.max_tokens)
            self.shares.append(share)
            self.share = sum(self.shares) / len(self.shares)
            k = _size_class(r.max_tokens)
            size = self._by_size.setdefault(k, deque(maxlen=HISTORY))
            size.append(share)
            self._table[k], self._known[k] = sum(size) / len(size), True
        done = Shape(float(r.prompt), float(r.prompt + r.generated))
        self.recent = done if self.recent is None else Shape(
            *(RECENT_WEIGHT * new + (1 - RECENT_WEIGHT) * old
              for new, old in zip(done, self.recent, strict=True)))

    def columns(self, in_flight: tuple[RequestSize, ...]) -> Columns:
        """What each request holds now, and when it is expected to end: its prompt plus the
        share of its max_tokens that requests of its size used; one past that is expected to
        go half of the way it has left to its max_tokens (one numpy pass: hundreds of requests
        are sized at every engine step)."""
        sizes = np.fromiter(itertools.chain.from_iterable(in_flight), dtype=np.float64,
                            count=3 * len(in_flight)).reshape(-1, 3)
        prompt, generated, max_tokens = sizes.T
        classes = np.log2(np.maximum(max_tokens, 1)).astype(np.int64)
        classes = np.minimum(classes, SIZE_CLASSES - 1)
        expected = np.where(self._known[classes], self._table[classes], self.share) * max_tokens
        end = np.where(generated < expected, expected, (generated + max_tokens) / 2)
        return Columns(prompt, prompt + generated, prompt + np.maximum(generated, end))

    def next_job(self, requests: Columns) -> Shape | None:
        """One request of the next job, expected like the recent ones and the ones in flight
        (whichever is larger): its prompt and its end; None before anything ran."""
        if self.recent is None and not len(requests.prompt):
            return None
        current = Shape(float(requests.prompt.mean()), float(requests.end.mean())) \
            if len(requests.prompt) else Shape(0.0, 0.0)
        recent = self.recent or current
        prompt = max(current.held, recent.held)
        return Shape(prompt, max(current.end, recent.end, prompt + 1))


def _size_class(max_tokens: int) -> int:
    return min(SIZE_CLASSES - 1, int(math.log2(max(1, max_tokens))))


class Columns(NamedTuple):
    """Requests in flight as columns: their prompts, the tokens they hold, their expected
    ends."""

    prompt: np.ndarray
    held: np.ndarray
    end: np.ndarray


class InFlight(NamedTuple):
    """The requests in flight at one engine step, sized, the jobs they belong to, and the
    next job's request expected from them (None before anything ran)."""

    step: int
    requests: Columns
    jobs_in_engine: int  # the worker's started jobs with a request in the engine
    next_job: Shape | None


class JobBook:
    """The jobs the intake started and how each ended. Every end is counted once, whatever
    order its callbacks arrive in: a job's results may end after the job did (the SDK posts a
    failed job's error and ends it before the generator's ``finally`` runs) or never (a stop
    that lands during a stream POST)."""

    def __init__(self) -> None:
        self.started: dict[str, None] = {}  # insertion-ordered set
        # Started jobs whose results ended (their last messages are on their way): they hold
        # nothing in the engine and will not.
        self.tails: set[str] = set()
        # Jobs that left the engine since the last take was asked for.
        self.ended_since_take = 0
        self._owners: dict[str, str | None] = {}  # request id -> its job, as found

    @property
    def taken(self) -> int:
        return len(self.started)

    @property
    def active(self) -> int:
        """Jobs that hold, or will hold, requests in the engine."""
        return len(self.started) - len(self.tails)

    def start(self, job_id: str) -> None:
        self.started[job_id] = None

    def results_ended(self, job_id: str) -> None:
        if job_id in self.started and job_id not in self.tails:
            self.tails.add(job_id)
            self.ended_since_take += 1

    def ended(self, job_id: str) -> None:
        if self.started.pop(job_id, 0) is None and job_id not in self.tails:
            self.ended_since_take += 1
        self.tails.discard(job_id)

    def jobs_of(self, request_ids: set[str]) -> set[str]:
        """The started jobs these requests belong to (a request's job is found once and
        remembered: this runs at engine steps, over every request, in C but for new ones)."""
        owners = self._owners
        if len(owners) > 4 * len(self.started) + 1024:
            owners.clear()
        for request_id in request_ids - owners.keys():
            owners[request_id] = self.job_of(request_id)
        found = set(map(owners.__getitem__, request_ids))
        found.discard(None)
        # Membership, not a pass over ``started``: the intake's thread changes it meanwhile.
        return {job for job in found if job in self.started}

    def job_of(self, request_id: str) -> str | None:
        """The started job a request id names: the worker's request ids are its job's id,
        `<job>-<line>` for a batch's lines, under vLLM's route prefix (`chatcmpl-<job>`) and
        its index of a request's several prompts (`-<i>`)."""
        for head in (request_id, request_id.partition("-")[2]):
            for _ in range(3):
                if head in self.started:
                    return head
                head = head.rpartition("-")[0]
                if not head:
                    break
        return None


def size_in_flight(step: int, load: EngineLoad, sizes: RequestSizes, jobs: JobBook) -> InFlight:
    """The step's requests in flight, sized, and how many of the started jobs they belong
    to (learning the requests per job)."""
    requests = sizes.columns(load.in_flight or ())
    ids = load.in_flight_ids
    if ids is None:  # one job per request
        return InFlight(step, requests, len(requests.prompt), sizes.next_job(requests))
    distinct = set(ids)
    if distinct:
        sizes.per_job = len(ids) / len(distinct)
    return InFlight(step, requests, len(jobs.jobs_of(distinct)), sizes.next_job(requests))


class KvRoom:
    """The KV cache's side: what the requests in flight will hold step by step (their
    projection, built once per step that read them) and how many jobs fit beside them."""

    def __init__(self, capacity: EngineCapacity) -> None:
        self.kv_tokens, self.block_tokens = capacity.kv_tokens, capacity.block_tokens
        self.short_tokens = min(SHORT_JOB_SHARE * self.kv_tokens,
                                capacity.max_num_batched_tokens)
        self._projected: tuple[int, Projection] | None = None

    def target(self, job: Shape, ends: np.ndarray) -> float:
        """The share of the KV cache the projection may fill: KV_TARGET_SHORT while the next
        job and every request in flight (`ends`) are short in tokens, KV_TARGET otherwise."""
        short = job.end <= self.short_tokens and (
            not len(ends) or ends.max() <= self.short_tokens)
        return KV_TARGET_SHORT if short else KV_TARGET

    def projection(self, sized: InFlight, kv_usage: float) -> Projection:
        """The KV tokens the requests in flight (as last read) will hold until they end."""
        if self._projected is None or self._projected[0] != sized.step:
            requests = sized.requests
            self._projected = (sized.step, Projection(requests.held, requests.end,
                                                      self.block_tokens,
                                                      kv_usage * self.kv_tokens))
        return self._projected[1]

    def empty(self) -> Projection:
        return Projection(np.zeros(0), np.zeros(0), self.block_tokens)

    def fits(self, projection: Projection, job: Shape, pending: int, per_job: float,
             ends: np.ndarray) -> int:
        """Jobs of `per_job` requests of `job`'s shape that fit beside what the requests in
        flight and the `pending` jobs not in the engine yet will hold from now on."""
        return projection.room(job, pending, self.kv_tokens * self.target(job, ends), per_job)


class Ramp:
    """How many jobs one take may bring: RAMP times what the engine has shown it holds (its
    jobs and those that ended since the last take was asked for), less what it holds now.
    After a take that emptied the platform's queue, the next one waits for new jobs (a
    long-poll) of unknown size, sized by a load they may not resemble: then no more than the
    cache holds if each were as long as the context (one when that is unknown)."""

    def __init__(self, capacity: EngineCapacity, jobs: JobBook) -> None:
        self.capacity, self.jobs = capacity, jobs
        self.queue_emptied = False

    def asking(self) -> None:
        """A take is asked for: jobs that end from now on count for the next one (many end
        during its round trip when they are short)."""
        self.jobs.ended_since_take = 0

    def took(self, asked: int, brought: int) -> None:
        self.queue_emptied = brought < asked

    def most(self, active: int) -> int:
        shown = active + self.jobs.ended_since_take
        most = max(1, RAMP * shown - active)
        return min(most, self._blind_take()) if self.queue_emptied else most

    def _blind_take(self) -> int:
        capacity = self.capacity
        if not capacity.kv_tokens:
            return capacity.max_num_seqs  # no KV cache to over-fill
        if not capacity.max_model_len:
            return 1
        return max(1, int(capacity.kv_tokens * KV_TARGET // capacity.max_model_len))


class Decision(NamedTuple):
    free: int  # jobs to take now
    regime: str  # why: what the intake's log shows


class Admission:
    """How many more jobs to take now. The intake asks ``room`` (a question: it changes
    nothing), tells ``took`` what a take brought and ``jobs`` of each start and end;
    ``observe`` is told of every engine step (the engine's thread) and calls the intake's
    wake-up (``wake_when_room``) when room opens for an intake that found none."""

    def __init__(self, capacity: EngineCapacity, cap: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.kv = KvRoom(capacity)
        self.sizes = RequestSizes()
        seqs = capacity.max_num_seqs
        self.limit = seqs if cap is None else min(cap, seqs)
        self.limit_reason = "MAX_CONCURRENCY" if self.limit < seqs else "MAX_NUM_SEQS"
        self.jobs = JobBook()
        self.ramp = Ramp(capacity, self.jobs)
        self.load = EngineLoad()
        self._wake: Callable[[], None] | None = None
        self._armed = self._asking = False
        # Engine steps seen, and how many had been seen at the latest take that brought
        # jobs: a take waits for a step after it, so it never sizes jobs by a load that
        # predates them.
        self._steps = self._steps_at_take = 0
        # The requests in flight at the latest step that read them (``wants_sizes``).
        self.sized = InFlight(-1, self.sizes.columns(()), 0, None)
        self._log = IntakeLog(clock)

    def wants_sizes(self, load: EngineLoad) -> bool:
        """Whether this step's requests in flight can matter: a pass over all of them, so
        only while the intake waits for room (armed: not while a take it asked for is in
        flight, which at high concurrency is most steps), and not while requests wait in the
        engine, the jobs are at the limit or nothing models the cache."""
        return (self._armed and load.waiting == 0 and self.jobs.taken < self.limit
                and self.capacity.unmodelled is None)

    def observe(self, load: EngineLoad) -> None:
        self.load = load
        self._steps += 1
        for r in load.finished:
            self.sizes.learn(r)
        if load.in_flight is not None:
            self.sized = size_in_flight(self._steps, load, self.sizes, self.jobs)
        if self._armed and self._wake is not None and self._decide().free > 0:
            self._armed = False
            self._wake()
        if load.running or self.jobs.taken:
            self._log.busy(lambda: describe(self, self._decide().regime))

    def wake_when_room(self, wake: Callable[[], None]) -> None:
        """`wake` (thread-safe) is called once room opens after ``arm``."""
        self._wake = wake

    def arm(self, armed: bool = True) -> None:
        """The intake may find no room and wait: the next step that opens room wakes it. Armed
        before it asks, so a step seen meanwhile is not missed; disarmed when it found room
        (the steps during its take then decide nothing)."""
        self._armed = armed

    def room(self) -> int:
        """Jobs to take now (a question: it changes nothing but the log)."""
        decision = self._decide()
        self._log.regime(decision.regime, lambda: describe(self, decision.regime))
        return decision.free

    def asking(self) -> None:
        self._asking = True
        self.ramp.asking()

    def took(self, asked: int, brought: int) -> None:
        """A take asked for `asked` jobs and brought `brought`."""
        self._asking = False
        self.ramp.took(asked, brought)
        if brought:
            self._steps_at_take = self._steps

    def _decide(self) -> Decision:
        jobs = self.jobs
        if jobs.taken >= self.limit:
            return Decision(0, "at the limit")
        if self._asking:  # what the log says meanwhile (the intake asks nothing then)
            return Decision(0, "a job-take is in flight")
        active = jobs.active
        if active <= 0:
            return self._idle()
        if self.load.waiting > 0:
            return Decision(0, "requests wait in the engine")
        # A take waits for a step after the last one's jobs were taken (without a KV cache
        # nothing can over-fill: requests waiting in the engine stop the intake, the ramp
        # bounds each take, and the next take's round trip overlaps these jobs' work).
        if self._steps == self._steps_at_take and self.kv.kv_tokens:
            return Decision(0, "waiting for the engine's next step")
        most = min(self.limit - jobs.taken, self.ramp.most(active))
        if self.capacity.unmodelled is not None:
            if self.kv.kv_tokens and self.load.kv_usage >= KV_START_LIMIT:
                return Decision(0, "the KV cache is full")
            return Decision(most, "taking (engine counts)")
        if self.sized.step != self._steps:
            return Decision(0, "waiting for the engine's next step")
        job = self.sized.next_job
        if job is None:
            return Decision(0, "waiting for the first job to reach the engine")
        pending = max(0, active - self.sized.jobs_in_engine)
        free = min(most, self.kv.fits(self.kv.projection(self.sized, self.load.kv_usage), job,
                                      pending, self.sizes.per_job, self.sized.requests.end))
        return Decision(free, "taking") if free > 0 else Decision(0, "the KV cache is full")

    def _idle(self) -> Decision:
        """No job of the worker's holds anything in the engine (the last step's figures may
        still show the requests that ended in it). Right after jobs that ended since the last
        take, the ramp and the next job's size in an empty cache bound the take; otherwise
        one job, sized by what reaches the engine."""
        if not self.jobs.ended_since_take:
            return Decision(1, "taking")
        most = min(self.limit - self.jobs.taken, self.ramp.most(0))
        job = self.sizes.next_job(self.sizes.columns(()))
        if self.capacity.unmodelled is not None or job is None:
            return Decision(most, "taking")
        fits = self.kv.fits(self.kv.empty(), job, 0, self.sizes.per_job, np.zeros(0))
        return Decision(max(1, min(most, fits)), "taking")


def rule(admission: Admission) -> str:
    """The rule in force, for the log."""
    capacity = admission.capacity
    if capacity.unmodelled is not None:
        return (f"no request waiting in it, its KV cache under {KV_START_LIMIT:.0%}: the "
                f"engine's counts decide, without a KV projection ({capacity.unmodelled})")
    return (f"no request waiting in it, room in its KV cache of {capacity.kv_tokens} tokens "
            f"until the requests in flight end")


def describe(admission: Admission, regime: str) -> str:
    """The intake's state, for the log."""
    self = admission
    load = self.load
    head = (f"{regime}: {self.jobs.taken} job(s) taken of at most {self.limit} "
            f"({self.limit_reason}); engine: {load.running} running, {load.waiting} "
            f"waiting, ")
    tail = f"{load.preempted} preempted so far"
    if self.capacity.unmodelled is not None:
        kv = f"KV cache {load.kv_usage:.0%}, " if self.kv.kv_tokens else ""
        return f"{head}{kv}{tail} ({self.capacity.unmodelled})"
    job = self.sized.next_job
    expected = "-" if job is None else \
        f"{self.sizes.per_job:.3g} x {job.held:.0f}+{job.end - job.held:.0f}"
    peak = self.kv.projection(self.sized, load.kv_usage).peak()
    return (f"{head}KV cache {load.kv_usage:.0%} of {self.kv.kv_tokens} tokens, at most "
            f"{peak / self.kv.kv_tokens:.0%} ahead, {expected} tokens "
            f"expected per job, {tail}")


class IntakeLog:
    """The intake's state in the log: at each change of regime (at most once per
    REGIME_LOG_S) and once per BUSY_LOG_S while jobs run."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._regime = ""
        self._regime_logged = self._busy_logged = -math.inf

    def regime(self, regime: str, describe: Callable[[], str]) -> None:
        now = self._clock()
        if regime != self._regime and now - self._regime_logged >= REGIME_LOG_S:
            self._regime, self._regime_logged = regime, now
            log.info("Job intake: %s", describe())

    def busy(self, describe: Callable[[], str]) -> None:
        now = self._clock()
        if now - self._busy_logged >= BUSY_LOG_S:
            self._busy_logged = now
            log.info("Job intake: %s", describe())


class FixedAdmission:
    """A constant number of jobs at once (JOB_ADMISSION=fixed, or a worker without an engine
    to follow)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.jobs = JobBook()

    def wake_when_room(self, wake: Callable[[], None]) -> None:
        pass  # only a job's end frees room, and the intake hears of that itself

    def arm(self, armed: bool = True) -> None:
        pass

    def room(self) -> int:
        return self.limit - self.jobs.taken

    def asking(self) -> None:
        pass

    def took(self, asked: int, brought: int) -> None:
        pass
