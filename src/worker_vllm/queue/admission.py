"""Job admission: the worker takes another job when its engine could start it now.

The signals are the engine's own, after each of its steps (``EngineLoad``: running and waiting
requests, KV-cache usage, the sizes of the requests in flight and of those that finished). The
worker asks the platform for more jobs while vLLM's scheduler has no request waiting and its KV
cache will have room, at every step until the requests in flight end, for what they will hold
then plus the next job as it grows (``worker_vllm.kv_projection``: requests near their end free
their blocks while new ones are still small); otherwise jobs stay in the platform's queue,
where another worker can take them and the autoscaler sees them.

What a request will hold when it ends: its prompt plus the share of its ``max_tokens`` that
requests generated before it (learned from the last finished ones; all of it before any has
finished), and never less than it holds already; in whole KV blocks. The next job is expected
to be like the recent ones or those in flight, whichever is larger. After a take, the next one
waits for an engine step (so jobs are never sized by a load that predates the last ones
taken), and one take at most doubles the requests in the engine (a change to longer jobs shows
before it can over-fill the cache).
Room: 95% of the cache (``KV_TARGET``), or 130% while the next job and every request in flight
are short, each within 1/16 of the cache (``KV_TARGET_SHORT``): short requests taken together
grow together, and when they outgrow the cache vLLM preempts the newest and recomputes its few
tokens later, cheaper than leaving the batch smaller. Long jobs are never projected past the
cache, so they are not preempted.
Bounds: never more jobs than ``max_num_seqs`` (or ``MAX_CONCURRENCY`` when set, a cap); a
worker with no job in its engine (none, or only jobs whose results have ended and whose last
messages are on their way) takes one job and sizes the next ones by what reaches its engine (a
prompt too long for the cache then gets vLLM's own error instead of waiting forever); a taken
job is never given back.
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

from worker_vllm.engine.load import EngineLoad, RequestSize
from worker_vllm.kv_projection import Projection, Shape

log = logging.getLogger("worker_vllm.admission")

# Finished requests the share of max_tokens is averaged over.
HISTORY = 64
# Weight of the latest finished request in the expected size of the next job.
RECENT_WEIGHT = 0.25
# Share of the KV cache the projection may fill: the rest absorbs requests that grow past
# their expected size.
KV_TARGET = 0.95
# Short jobs may fill more than the cache: requests taken together grow together, and when
# they outgrow the cache vLLM preempts the newest and later recomputes it from its tokens, a
# small cost when each holds a small share of the cache (a long job's recomputation costs
# about what it ran, so long jobs never overcommit). Short: the next job and every request in
# flight expected to end within SHORT_JOB_SHARE of the cache.
KV_TARGET_SHORT = 1.3
SHORT_JOB_SHARE = 1 / 16
# The intake's state is logged at each change, at most once per REGIME_LOG_S, and once per
# BUSY_LOG_S while jobs run.
REGIME_LOG_S = 10.0
BUSY_LOG_S = 60.0


class RequestSizes:
    """What requests will hold in the KV cache, learned from those that ended."""

    def __init__(self) -> None:
        self.shares: deque[float] = deque(maxlen=HISTORY)  # generated / max_tokens
        self.share = 1.0  # their mean: all of max_tokens before any request finished
        # The recent requests' prompt and final tokens, weighted towards the latest.
        self.recent: Shape | None = None

    def learn(self, r: RequestSize) -> None:
        if r.max_tokens:
            self.shares.append(min(1.0, r.generated / r.max_tokens))
            self.share = sum(self.shares) / len(self.shares)
        done = Shape(float(r.prompt), float(r.prompt + r.generated))
        self.recent = done if self.recent is None else Shape(
            *(RECENT_WEIGHT * new + (1 - RECENT_WEIGHT) * old
              for new, old in zip(done, self.recent, strict=True)))

    def columns(self, in_flight: tuple[RequestSize, ...]) -> Columns:
        """What each request holds now, and when it is expected to end: its prompt plus the
        learned share of its max_tokens, never less than it holds (one numpy pass: hundreds
        of requests are sized at every engine step)."""
        sizes = np.fromiter(itertools.chain.from_iterable(in_flight), dtype=np.float64,
                            count=3 * len(in_flight)).reshape(-1, 3)
        prompt, generated, max_tokens = sizes.T
        return Columns(prompt, prompt + generated,
                       prompt + np.maximum(generated, self.share * max_tokens))

    def next_job(self, requests: Columns) -> Shape | None:
        """The next job's request, expected like the recent ones and the ones in flight
        (whichever is larger): its prompt and its end; None before anything ran."""
        if self.recent is None and not len(requests.prompt):
            return None
        current = Shape(float(requests.prompt.mean()), float(requests.end.mean())) \
            if len(requests.prompt) else Shape(0.0, 0.0)
        recent = self.recent or current
        prompt = max(current.held, recent.held)
        return Shape(prompt, max(current.end, recent.end, prompt + 1))


class Columns(NamedTuple):
    """Requests in flight as columns: their prompts, the tokens they hold, their expected
    ends."""

    prompt: np.ndarray
    held: np.ndarray
    end: np.ndarray


class Admission:
    """How many more jobs to take now. ``room`` is asked by the job intake (its loop);
    ``observe`` is told of every engine step (the engine's thread) and calls ``wake`` when room
    opens for an intake that found none."""

    def __init__(self, max_num_seqs: int, kv_tokens: int, block_tokens: int,
                 cap: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.kv_tokens, self.block_tokens = kv_tokens, block_tokens
        self.sizes = RequestSizes()
        self.limit = min(cap, max_num_seqs) if cap is not None else max_num_seqs
        self.limit_reason = "MAX_CONCURRENCY" if cap is not None and cap < max_num_seqs \
            else "MAX_NUM_SEQS"
        self.load = EngineLoad()
        self.wake: Callable[[], None] | None = None
        self.taken = 0
        # Jobs taken whose results have ended (their last messages are on their way): they
        # hold nothing in the engine and will not.
        self.tails: set[str] = set()
        self._blocked = False
        # Engine steps seen, and how many had been seen at the latest take: a take waits for
        # a step after the one before, so it never sizes jobs by a load that predates them.
        self._steps = self._steps_at_take = 0
        # The requests in flight at the latest step that read them (``wants_sizes``), sized, and
        # their projection (built once, when asked).
        self._sized: tuple[int, Columns] = (-1, self.sizes.columns(()))
        self._projected: tuple[int, Projection] | None = None
        self._log = IntakeLog(clock)

    # ----- the engine's side (its thread) -------------------------------------------------
    def wants_sizes(self, load: EngineLoad) -> bool:
        """Whether this step's requests in flight can matter: a pass over all of them, so
        not while requests wait in the engine or the jobs are at the limit."""
        return load.waiting == 0 and self.taken < self.limit

    def observe(self, load: EngineLoad) -> None:
        self.load = load
        self._steps += 1
        for r in load.finished:
            self.sizes.learn(r)
        if load.in_flight is not None:
            self._sized = (self._steps, self.sizes.columns(load.in_flight))
        if self._blocked and self.wake is not None and self._room(self.taken)[0] > 0:
            self._blocked = False
            self.wake()
        if load.running or self.taken:
            self._log.busy(lambda: self.describe(self._room(self.taken)[1]))

    # ----- the jobs' side (the intake's loop) -------------------------------------------
    def results_ended(self, job_id: str) -> None:
        self.tails.add(job_id)

    def job_ended(self, job_id: str) -> None:
        self.tails.discard(job_id)

    # ----- the intake's side ----------------------------------------------------------------
    def room(self, taken: int) -> int:
        """Jobs to take now, with `taken` jobs running; 0 arms ``wake`` for when it opens."""
        self.taken = taken
        self._blocked = True  # before the check: a step seen meanwhile then wakes the intake
        free, regime = self._room(taken)
        if free > 0:
            self._blocked = False
            self._steps_at_take = self._steps
        self._log.regime(regime, lambda: self.describe(regime))
        return free

    def _room(self, taken: int) -> tuple[int, str]:
        """(jobs to take, the intake's regime)."""
        if taken >= self.limit:
            return 0, "at the limit"
        active = taken - len(self.tails)
        if active <= 0:
            return 1, "taking"  # the next ones are sized by what reaches the engine
        if self.load.waiting > 0:
            return 0, "requests wait in the engine"
        # A take waits for a step after it, one that read the requests in flight.
        if self._steps == self._steps_at_take or self._sized[0] != self._steps:
            return 0, "waiting for the engine's next step"
        job = self.sizes.next_job(self._sized[1])
        if job is None:
            return 0, "waiting for the first job to reach the engine"
        free = self._fits(taken, active, job)
        return (free, "taking") if free > 0 else (0, "the KV cache is full")

    def _fits(self, taken: int, active: int, job: Shape) -> int:
        """Jobs of `job`'s shape that fit beside what the requests in flight and the `active`
        jobs that have not reached the engine yet will hold at every step from now on; at
        most as many as are in the engine (a take at most doubles them: a change of job
        sizes shows before it can over-fill the cache)."""
        in_flight = len(self._sized[1].prompt)
        pending = max(0, active - in_flight)  # taken, not in the engine yet
        fits = self.projection().room(job, pending, self.kv_tokens * self.target(job))
        return max(0, min(fits, self.limit - taken, max(1, in_flight)))

    def target(self, job: Shape) -> float:
        """The share of the KV cache the projection may fill: KV_TARGET_SHORT while the next
        job and every request in flight are short, KV_TARGET otherwise."""
        short = SHORT_JOB_SHARE * self.kv_tokens
        ends = self._sized[1].end
        return KV_TARGET_SHORT if job.end <= short and (not len(ends) or ends.max() <= short) \
            else KV_TARGET

    def projection(self) -> Projection:
        """The KV tokens the requests in flight (as last read) will hold until they end."""
        (step, requests), load = self._sized, self.load
        if self._projected is None or self._projected[0] != step:
            self._projected = (step, Projection(requests.held, requests.end,
                                                self.block_tokens,
                                                load.kv_usage * self.kv_tokens))
        return self._projected[1]

    # ----- what the log shows -----------------------------------------------------------
    def describe(self, regime: str) -> str:
        load, job = self.load, self.sizes.next_job(self._sized[1])
        expected = "-" if job is None else f"{job.held:.0f}+{job.end - job.held:.0f}"
        return (f"{regime}: {self.taken} job(s) taken of at most {self.limit} "
                f"({self.limit_reason}); engine: {load.running} running, {load.waiting} "
                f"waiting, KV cache {load.kv_usage:.0%} of {self.kv_tokens} tokens, at most "
                f"{self.projection().peak() / self.kv_tokens:.0%} ahead, "
                f"{expected} tokens expected per job, {load.preempted} preempted so far")



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
    """A constant number of jobs at once (a worker without an engine to follow)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.wake: Callable[[], None] | None = None

    def room(self, taken: int) -> int:
        return self.limit - taken

    def results_ended(self, job_id: str) -> None:
        pass

    def job_ended(self, job_id: str) -> None:
        pass
