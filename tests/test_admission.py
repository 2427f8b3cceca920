"""Job admission from the engine's load (fast: plain data, no engine)."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from worker_vllm.engine_state import EngineCapacity, EngineLoad, RequestSize
from worker_vllm.queue.admission import Admission, describe, rule
from worker_vllm.queue.projection import Shape
from worker_vllm.queue.tuning import KV_TARGET, KV_TARGET_SHORT, SHORT_JOB_SHARE

KV_TOKENS, BLOCK = 4096, 16  # a cache of 4 full contexts of 1,024 tokens
TARGET = KV_TOKENS * KV_TARGET
TARGET_SHORT = KV_TOKENS * KV_TARGET_SHORT  # jobs within SHORT_JOB_SHARE of the cache


def admission(cap: int | None = None, max_num_seqs: int = 128, **capacity) -> Admission:
    return Admission(EngineCapacity(max_num_seqs, KV_TOKENS, BLOCK, **capacity), cap)


def room(a: Admission, taken: int) -> int:
    """The intake's question with `taken` jobs started (jobs are started or ended to match, the
    oldest ending first); a take of what it answers brings all of it."""
    book = a.jobs
    while book.taken < taken:
        book.start(f"job-{next(_ids)}")
    while book.taken > taken:
        book.ended(next(iter(book.started)))
    a.arm()
    free = a.room()
    if free > 0:
        a.asking()
        a.took(free, free)
    return free


_ids = itertools.count()


def step(a: Admission, running: list[RequestSize] = (), waiting: int = 0,
         finished: list[RequestSize] = ()) -> None:
    """One engine step: `running` in flight (all scheduled), `waiting` more queued in it."""
    held = sum(r.prompt + r.generated for r in running)
    a.observe(EngineLoad(running=len(running), waiting=waiting,
                         kv_usage=held / a.kv.kv_tokens if a.kv.kv_tokens else 0.0,
                         in_flight=tuple(running), finished=tuple(finished)))


SHORT = RequestSize(8, 64, 64)  # 72 tokens: 80 in blocks of 16
LONG = RequestSize(600, 300, 300)  # 900 tokens: 912 in blocks


def shape(a: Admission, r: RequestSize) -> Shape:
    """What the admission expects of one request: the tokens it holds, and when it ends."""
    sized = a.sizes.columns((r,))
    return Shape(float(sized.held[0]), float(sized.end[0]))


def in_blocks(tokens: int) -> int:
    return -(-tokens // BLOCK) * BLOCK


def peak(old: list[RequestSize], free: int, job: RequestSize) -> int:
    """The most the cache holds at any later step (until the longest ends) with `free` new
    jobs shaped like `job`, started now beside `old`."""
    most = 0
    for k in range(max(r.max_tokens - r.generated for r in old) + job.max_tokens):
        held = sum(in_blocks(r.prompt + r.generated + k) for r in old
                   if r.generated + k < r.max_tokens)
        most = max(most, held + free * in_blocks(job.prompt + min(job.max_tokens, k)))
    return most


def assert_never_over_target(old: list[RequestSize], free: int, job: RequestSize,
                             target: float = TARGET) -> None:
    """`free` new jobs shaped like `job`, started now beside `old`: at no later step (until
    the longest ends) does the cache hold more than `target`."""
    assert peak(old, free, job) <= target, (free, peak(old, free, job))


def test_an_idle_worker_takes_one_job_then_doubles_what_reaches_the_engine():
    a = admission()
    assert a.sizes.next_job(a.sizes.columns(())) is None
    assert room(a, 0) == 1
    assert room(a, 1) == 0  # taken, not in the engine yet: its size is unknown
    step(a, [RequestSize(8, 0, 64)])
    # Before anything finished, a request is expected to use all of its max_tokens.
    assert shape(a, RequestSize(8, 0, 64)) == Shape(8, 72)
    assert room(a, 1) == 1  # one take at most doubles the requests in the engine
    step(a, [RequestSize(8, 1, 64)] * 2)
    assert room(a, 2) == 2


def test_short_jobs_fill_the_cache_far_beyond_its_full_contexts():
    a = admission()
    step(a, [SHORT._replace(generated=10)] * 40, finished=[SHORT] * 10)
    free = room(a, 40)
    # The 40 hold 80 tokens each (in blocks of 16) just before they end, 53 steps from now;
    # a job started now holds 8 + 53 = 61 tokens (64 in blocks) then: the cache (short jobs
    # may overcommit it), not the doubling, bounds it.
    assert free == int((TARGET_SHORT - 40 * 80) // 64) > int((TARGET - 40 * 80) // 64)
    assert 40 + free > 10 * KV_TOKENS // 1024  # ten times the 4 "full contexts"


def test_requests_near_their_end_make_room_for_jobs_that_start_small():
    """Staggered requests never all hold their final size at once: while the old ones end,
    new ones are still short. The sum of final sizes would allow 4 more jobs; the step-by-step
    projection allows what fits at the worst step."""
    a = admission()
    old = [SHORT._replace(generated=g) for g in (0, 16, 32, 48, 56, 60, 62, 63)] * 5
    step(a, old, finished=[SHORT] * 8)
    sum_of_finals = int((TARGET_SHORT - 40 * 80) // 80)
    free = room(a, 40)
    assert free > sum_of_finals
    # Whatever was taken, the cache never holds more than the target at any later step.
    assert_never_over_target(old, free, SHORT._replace(generated=0), TARGET_SHORT)


def test_only_short_jobs_overcommit_the_cache():
    """Short jobs (every request in flight and the next job within SHORT_JOB_SHARE of the
    cache) may be projected past the cache: vLLM preempts the newest and recomputes its few
    tokens. One long request in flight, or a long next job, and the target is the cache's
    KV_TARGET again: recomputing a long request costs about what it ran."""
    assert SHORT.prompt + SHORT.max_tokens <= SHORT_JOB_SHARE * KV_TOKENS < LONG.prompt
    in_flight = [SHORT._replace(generated=10)] * 40  # overcommits: the test above
    mixed = in_flight[:36] + [LONG._replace(generated=290)]
    a = admission()
    step(a, mixed, finished=[SHORT] * 10)
    assert_never_over_target(mixed, room(a, 37), SHORT._replace(generated=0))
    a = admission()
    step(a, in_flight[:8], finished=[LONG])  # the next job is expected long
    assert_never_over_target(in_flight[:8], room(a, 8), LONG._replace(generated=0))


def test_long_jobs_stop_the_intake_when_what_they_will_hold_fills_the_cache():
    a = admission()
    step(a, [LONG._replace(generated=5)] * 4)  # 4 x 912 expected: 3648 of 3891
    assert room(a, 4) == 0
    step(a, [LONG._replace(generated=300)] * 3, finished=[LONG])
    assert room(a, 3) == 1


def test_long_jobs_that_started_apart_leave_room_for_one_more_than_full_contexts():
    """Four long requests started far apart never hold their final sizes together: a fifth
    fits beside them (4 x 912 is the target's limit only when they peak at once), and the
    cache still never holds more than the target at any later step."""
    a = admission()
    old = [LONG._replace(generated=g) for g in (295, 150, 80, 20)]
    step(a, old)
    free = room(a, 4)
    assert free >= 1
    assert_never_over_target(old, free, LONG._replace(generated=0))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 299), min_size=5, max_size=5))
def test_five_long_requests_leave_no_room_for_a_sixth_whatever_their_ages(ages):
    """The worker test's bound (test_admission_worker.py): its cache of 127 blocks of 32, five
    requests of 600 + 300 tokens in flight at any stage: no sixth is taken."""
    a = Admission(EngineCapacity(128, 127 * 32, 32))
    step(a, [LONG._replace(generated=g) for g in ages])
    assert room(a, 5) == 0


def test_the_share_of_max_tokens_used_is_learned_from_finished_requests():
    a = admission()
    chat = RequestSize(100, 0, 924)  # no max_tokens in the body: the rest of the context
    assert shape(a, chat) == Shape(100, 1024)
    step(a, [chat], finished=[RequestSize(100, 92, 924)] * 8)  # they stop after ~10%
    assert shape(a, chat) == Shape(100, 192)
    # A request past its expected share is expected to go half of the way it has left: not
    # to end at the next step (a request in the tail of its size's shares goes on).
    assert shape(a, chat._replace(generated=400)) == Shape(500, 100 + (400 + 924) / 2)


def test_the_share_is_learned_by_size_of_max_tokens():
    """Jobs that ask for 16 tokens use them all; chat jobs without max_tokens (the rest of a
    long context) stop after ~100: one mean over both would expect every chat request to run
    to half its context and every short one to stop half-way."""
    a = admission()
    step(a, [], finished=[RequestSize(10, 16, 16)] * 8 + [RequestSize(10, 100, 4000)] * 8)
    assert shape(a, RequestSize(10, 0, 4000)) == pytest.approx(Shape(10, 110))
    assert shape(a, RequestSize(10, 0, 16)) == pytest.approx(Shape(10, 26))
    # The same class (2,048-4,095) as the 4,000s; a class none finished in: the mean of all.
    assert shape(a, RequestSize(10, 0, 3000)) == pytest.approx(Shape(10, 10 + 3000 * 0.025))
    assert shape(a, RequestSize(10, 0, 300)) == pytest.approx(
        Shape(10, 10 + 300 * (1 + 0.025) / 2))


request_sizes = st.builds(lambda prompt, max_tokens, done: RequestSize(
    prompt, round(done * max_tokens), max_tokens), st.integers(0, 5000), st.integers(0, 4000),
    st.floats(0, 1.2))


@settings(max_examples=200, deadline=None)
@given(st.lists(request_sizes, max_size=40), st.lists(request_sizes, max_size=8))
def test_requests_are_sized_by_the_share_learned_and_the_next_job_by_their_mean(in_flight,
                                                                               finished):
    """Each request in flight (one numpy pass over them all) holds its prompt and what it
    generated, and ends at its prompt plus the share of its max_tokens learned from finished
    requests of its size class (half of its way left once past it), never below what it
    holds; the next job is expected like their mean or the recent ones, whichever is
    larger."""
    sizes = admission().sizes
    for r in finished:
        sizes.learn(r)
    columns = sizes.columns(tuple(in_flight))
    assert columns.prompt.tolist() == [r.prompt for r in in_flight]
    assert columns.held.tolist() == [r.prompt + r.generated for r in in_flight]
    def share(max_tokens: int) -> float:  # the mean share of finished ones of its class
        same = [min(1.0, f.generated / f.max_tokens) for f in finished if f.max_tokens
                and int(math.log2(f.max_tokens)) == int(math.log2(max(1, max_tokens)))]
        return sum(same) / len(same) if same else sizes.share

    def end(r: RequestSize) -> float:
        expected = share(r.max_tokens) * r.max_tokens
        return r.prompt + max(r.generated, expected if r.generated < expected
                              else (r.generated + r.max_tokens) / 2)

    ends = [end(r) for r in in_flight]
    assert columns.end.tolist() == pytest.approx(ends)
    assert all(e >= r.prompt + r.generated for e, r in zip(ends, in_flight, strict=True))
    expected = sizes.next_job(columns)
    if not in_flight and not finished:
        assert expected is None
        return
    prompts, ends = [r.prompt for r in in_flight] or [0], ends or [0]
    recent = sizes.recent or Shape(sum(prompts) / len(prompts), sum(ends) / len(ends))
    prompt = max(sum(prompts) / len(prompts), recent.held)
    assert expected == pytest.approx(Shape(prompt, max(sum(ends) / len(ends), recent.end,
                                                       prompt + 1)))


def test_a_change_to_longer_jobs_is_seen_before_it_over_fills_the_cache():
    a = admission()
    step(a, [], finished=[SHORT] * 20)
    assert room(a, 0) == 1  # idle: one job, whatever the history says
    step(a, [LONG._replace(generated=0)])
    assert a.sizes.next_job(a.sizes.columns(a.load.in_flight)) == Shape(600, 900)
    assert room(a, 1) == 1
    step(a, [LONG._replace(generated=1)] * 2)
    assert room(a, 2) == 2  # 4 x 912 fit in the target share, 5 do not
    step(a, [LONG._replace(generated=2)] * 4)
    assert room(a, 4) == 0


def test_jobs_whose_results_ended_count_as_gone_from_the_engine():
    """Jobs still posting their last messages hold nothing in the engine: with only those,
    the worker is as idle as an empty one, and a take is bounded by the ramp (twice the jobs
    that just ended) and by the next job's size in an empty cache."""
    a = admission()
    step(a, [], finished=[SHORT] * 20)
    room(a, 6)
    for job in list(a.jobs.started):
        a.jobs.results_ended(job)
    assert a.jobs.active == 0
    assert room(a, 6) == 2 * 6  # the ramp: short jobs in an empty cache fit many more
    for job in list(a.jobs.started):
        a.jobs.ended(job)
    assert not a.jobs.started and not a.jobs.tails


@pytest.mark.parametrize("order", ["results first", "job first", "no results end"])
def test_every_end_of_a_job_is_counted_once_whatever_the_order(order):
    """The SDK ends a failed job (its error posted) before the generator's ``finally`` reports
    its results' end; a stop during a stream POST never reports it. Either way the job leaves
    the books once: 50 such jobs leave none behind, and the next take is sized as for an idle
    worker, not one that counts 50 jobs gone while they still run."""
    a = admission()
    for i in range(50):
        job = f"failed-{i}"
        a.jobs.start(job)
        if order == "results first":
            a.jobs.results_ended(job)
            a.jobs.ended(job)
        elif order == "job first":
            a.jobs.ended(job)
            a.jobs.results_ended(job)
        else:
            a.jobs.ended(job)
    assert not a.jobs.started and not a.jobs.tails
    assert a.jobs.ended_since_take == 50
    # Four long jobs then run: the worker counts them as four, not as none.
    a.asking()
    a.took(4, 4)
    for i in range(4):
        a.jobs.start(f"long-{i}")
    step(a, [LONG._replace(generated=5)] * 4)
    assert a.jobs.active == 4 and a.room() == 0  # 4 x 912 expected: the cache is full


def test_short_jobs_that_end_within_a_round_trip_do_not_fall_to_one_job_per_take():
    """Requests that live shorter than a job-take round trip (embeddings, a few tokens) have
    ended by the time the next take is asked: each take may still double what the last one
    brought, up to the limit, instead of one job per round trip."""
    a = admission(max_num_seqs=64)
    tiny = RequestSize(4, 2, 2)
    sizes = []
    for _ in range(8):
        free = a.room()
        sizes.append(free)
        a.asking()
        a.took(free, free)
        ids = [f"job-{next(_ids)}" for _ in range(free)]
        for job in ids:
            a.jobs.start(job)
        step(a, [tiny._replace(generated=0)] * free)
        step(a, [], finished=[tiny] * free)
        for job in ids:
            a.jobs.results_ended(job)
            a.jobs.ended(job)
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 64], sizes


def test_jobs_that_end_while_the_next_take_is_on_its_way_count_for_the_one_after():
    """A take's round trip (100 ms on the platform) outlasts short jobs: those of the take
    before end while it is on its way. They showed what the engine holds, so the take after
    it may double them; counted from the take's return they would be lost, and every take
    would ask for one job."""
    a = admission(max_num_seqs=128)
    tiny = RequestSize(4, 2, 2)
    sizes, running = [], []
    for _ in range(8):
        free = a.room()
        sizes.append(free)
        a.asking()
        step(a, [], finished=[tiny] * len(running))
        for job in running:  # the last take's jobs end during this one's round trip
            a.jobs.results_ended(job)
            a.jobs.ended(job)
        a.took(free, free)
        running = [f"job-{next(_ids)}" for _ in range(free)]
        for job in running:
            a.jobs.start(job)
        step(a, [tiny._replace(generated=0)] * free)
    assert sizes == sorted(sizes) and sizes[-1] >= 32, sizes


def test_without_a_kv_cache_the_engines_counts_decide_and_nothing_divides_by_it(caplog):
    """Encoder-only models (MiniLM, bge, rerankers) have no KV cache in vLLM: the worker
    reads 0 tokens. The engine's counts then decide (no request waiting), the ramp bounds each
    take, and the log says which rule is in force."""
    a = Admission(EngineCapacity(128, 0, 16, unmodelled="no KV cache"))
    with caplog.at_level(logging.INFO, logger="worker_vllm.queue.admission"):
        assert room(a, 0) == 1
        step(a, [RequestSize(8, 0, 0)])
        assert room(a, 1) == 1
        step(a, [RequestSize(8, 0, 0)] * 2)
        assert room(a, 2) == 2
        step(a, [RequestSize(8, 0, 0)] * 4, waiting=1)
        assert room(a, 4) == 0
        describe(a, "taking")
    assert not a.wants_sizes(EngineLoad(running=1))  # no projection: nothing to size
    # Nothing to over-fill: the next take need not wait for a step to show the last one's
    # jobs (its round trip overlaps their work); with a KV cache it does.
    for kv_tokens, after_a_take in ((0, 1), (KV_TOKENS, 0)):
        b = Admission(EngineCapacity(128, kv_tokens, 16, unmodelled="not modelled"))
        assert room(b, 0) == 1
        assert room(b, 1) == after_a_take
    assert "no KV cache" in caplog.text
    assert "no KV cache" in rule(a) and "engine's counts decide" in rule(a)


def test_several_kv_cache_groups_fall_back_to_the_engines_counts_and_kv_usage():
    a = admission(unmodelled="several KV-cache groups")
    room(a, 0)
    step(a, [SHORT] * 1)
    assert room(a, 1) == 1
    a.observe(EngineLoad(running=2, kv_usage=0.95))
    assert room(a, 2) == 0  # the cache is full by the engine's own figure
    a.observe(EngineLoad(running=2, kv_usage=0.5))
    assert room(a, 2) == 2


def test_a_job_of_n_requests_is_sized_as_all_of_them():
    """n > 1: vLLM runs n child requests for one job, all under the job's request id. Two
    jobs of n = 4 are two jobs in the engine (none pending), and the next job is expected to
    hold four requests: a quarter of the jobs of one request fit."""
    requests = [RequestSize(50, 5, 50)] * 8  # 112 tokens in blocks at their end
    fits = {}
    for n in (4, 1):
        a = admission(max_num_seqs=1024)
        jobs = 8 // n
        for i in range(jobs):
            a.jobs.start(f"job-{i}")
        a.took(jobs, jobs)
        a.jobs.ended_since_take = 100  # many jobs just ended: the ramp bounds nothing here
        a.observe(EngineLoad(running=8, kv_usage=8 * 64 / KV_TOKENS, in_flight=tuple(requests),
                             in_flight_ids=tuple(f"chatcmpl-job-{i // n}" for i in range(8))))
        assert a.sizes.per_job == n
        fits[n] = a.room()
        # Never over the target: the n requests of every job taken grow together.
        assert_never_over_target(requests, fits[n] * n, requests[0]._replace(generated=0),
                                 TARGET_SHORT)
    assert fits[4] == fits[1] // 4 > 0, fits


def test_a_request_id_names_its_job_under_vllms_prefixes_and_suffixes():
    a = admission()
    for job in ("sync-1f2e-u1", "7", "a-b"):
        a.jobs.start(job)
    assert a.jobs.job_of("sync-1f2e-u1") == "sync-1f2e-u1"  # native
    assert a.jobs.job_of("chatcmpl-sync-1f2e-u1") == "sync-1f2e-u1"  # a route job
    assert a.jobs.job_of("embd-7-3") == "7"  # the 4th input of an embedding job
    assert a.jobs.job_of("cmpl-a-b-12") == "a-b"  # a batch job's 12th line
    assert a.jobs.job_of("warmup-0") is None and a.jobs.job_of("") is None


def test_short_is_a_size_in_tokens_not_a_share_of_the_cache():
    """On an H100's cache (~440,000 tokens for Llama 3.1 8B) a sixteenth is 27,500 tokens:
    jobs of 20,000 tokens are long (recomputing one costs more than an engine step's prefill)
    and never overcommit the cache; jobs within max_num_batched_tokens may."""
    a = Admission(EngineCapacity(1024, 440_000, 16, max_num_batched_tokens=8192))
    step(a, [RequestSize(2000, 0, 18000)] * 4)
    assert a.kv.target(Shape(2000, 20000), a.sized.requests.end) == KV_TARGET
    a = Admission(EngineCapacity(1024, 440_000, 16, max_num_batched_tokens=8192))
    step(a, [RequestSize(100, 0, 500)] * 4)
    assert a.kv.target(Shape(100, 600), a.sized.requests.end) == KV_TARGET_SHORT


def test_the_ramp_from_idle_reaches_n_jobs_in_log2_n_plus_one_takes():
    """A take's jobs reach the engine a round trip later; the engine steps only while it holds
    requests. Each take is sized by the jobs taken (in the engine and on their way, counted
    as pending), so the jobs double per take: N jobs in log2(N) + 1 takes."""
    for target in (32, 128):
        # A cache with room for all: only the ramp bounds the takes.
        a = Admission(EngineCapacity(1024, 10**6, BLOCK))
        r = RequestSize(8, 0, 64)
        arrived, taken, takes = 0, 0, []
        while taken < target:
            if arrived:
                step(a, [r] * arrived)
            free = room(a, taken)
            arrived, taken = taken, taken + free
            if free:
                takes.append(free)
            assert len(takes) < 50
        assert len(takes) <= math.log2(target) + 1, (target, takes)


def test_requests_waiting_in_the_engine_stop_the_intake():
    a = admission()
    step(a, [SHORT] * 8, waiting=1)
    assert room(a, 9) == 0
    assert room(a, 0) >= 1  # but an idle worker always takes one


def test_a_job_larger_than_the_cache_still_starts_on_an_idle_worker():
    a = admission()
    step(a, [], finished=[RequestSize(5000, 10, 10)])
    assert room(a, 0) == 1
    step(a, [RequestSize(5000, 0, 10)])
    assert room(a, 1) == 0


@pytest.mark.parametrize("cap,max_num_seqs,limit,reason", [
    (3, 128, 3, "MAX_CONCURRENCY"), (30, 8, 8, "MAX_NUM_SEQS"), (None, 16, 16, "MAX_NUM_SEQS")])
def test_max_concurrency_caps_and_max_num_seqs_bounds(cap, max_num_seqs, limit, reason):
    a = admission(cap, max_num_seqs)
    assert (a.limit, a.limit_reason) == (limit, reason)
    tiny = RequestSize(4, 0, 4)
    step(a, [tiny] * (limit - 1), finished=[tiny._replace(generated=4)])
    assert room(a, limit - 1) == 1
    assert room(a, limit) == 0


def test_a_step_that_opens_room_wakes_a_blocked_intake_once():
    a = admission()
    woken: list[int] = []
    a.wake_when_room(lambda: woken.append(1))
    step(a, [SHORT] * 2, waiting=2)
    assert room(a, 4) == 0
    step(a, [SHORT] * 3, waiting=1)
    assert woken == []  # still no room
    step(a, [SHORT] * 4)
    assert woken == [1]
    step(a, [SHORT] * 4)
    assert woken == [1]  # not blocked any more: the intake asks by itself


def test_the_intake_state_is_logged_at_each_change(caplog):
    clock = [0.0]
    a = Admission(EngineCapacity(128, KV_TOKENS, BLOCK), clock=lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="worker_vllm.queue.admission"):
        room(a, 0)
        step(a, [SHORT], waiting=3)
        room(a, 1)
        room(a, 1)  # no change: no line
        clock[0] = 11.0
        room(a, 1)  # the change of 0 s ago is shown once REGIME_LOG_S has passed
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("Job intake: taking: 0 job(s) taken of at most 128")
    assert any("requests wait in the engine: 1 job(s) taken" in line
               and "1 running, 3 waiting, KV cache 2%" in line for line in lines), lines


@settings(max_examples=150, deadline=None)
@given(prompt=st.integers(1, 400), max_tokens=st.integers(1, 600), data=st.data())
def test_jobs_taken_but_not_yet_in_the_engine_are_never_booked_twice(prompt, max_tokens, data):
    """A take's jobs reach the engine a round trip later: asked again before then, the intake
    must count them, or it books their room a second time. Whatever the requests in flight,
    all the jobs the takes bring before the next engine step, shaped like the jobs seen, fit
    beside them at every later step."""
    job = RequestSize(prompt, 0, max_tokens)
    old = [job._replace(generated=g) for g in data.draw(
        st.lists(st.integers(0, max_tokens - 1), min_size=1, max_size=40), label="generated")]
    assume(peak(old, 0, job) <= TARGET)  # what the engine holds already fits
    a = admission()
    step(a, old, finished=[job._replace(generated=max_tokens)] * data.draw(
        st.integers(1, 20), label="finished"))
    taken = len(old)
    for _ in range(3):  # takes, and no engine step between them
        taken += room(a, taken)
    assert_never_over_target(old, taken - len(old), job, TARGET_SHORT)


@pytest.mark.parametrize("env,fixed,limit", [
    ({}, False, 128), ({"MAX_CONCURRENCY": "30"}, False, 30),
    ({"JOB_ADMISSION": "fixed", "MAX_CONCURRENCY": "32"}, True, 32),
    ({"JOB_ADMISSION": "fixed"}, True, 128), ({"JOB_INTAKE": "sdk"}, True, 128)])
def test_the_queue_front_end_picks_the_admission_its_settings_name(env, fixed, limit):
    from worker_vllm.config.settings import load_worker_settings
    from worker_vllm.engine.load import EngineLoads
    from worker_vllm.queue.admission import FixedAdmission
    from worker_vllm.queue.serve import job_admission

    class Runner:  # the engine's figures the front-end reads
        loads = EngineLoads()

        def capacity(self) -> EngineCapacity:
            return EngineCapacity(128, KV_TOKENS, BLOCK)

    chosen = job_admission(load_worker_settings(env), Runner())
    assert isinstance(chosen, FixedAdmission) == fixed and chosen.limit == limit
    if fixed:  # a fixed count: every free slot is taken, whatever the engine's load
        for i in range(limit - 5):
            chosen.jobs.start(str(i))
        assert chosen.room() == 5


def test_the_requests_in_flight_are_read_only_at_steps_where_they_can_matter():
    """Reading them is a pass over every request in the engine, on its thread: not while
    requests wait in it or the jobs are at the limit. A take after such a step waits for the
    next step that reads them."""
    a = admission(cap=4)
    woken: list[int] = []
    a.wake_when_room(lambda: woken.append(1))
    step(a, [SHORT] * 2, finished=[SHORT])
    room(a, 4)  # at the limit
    assert not a.wants_sizes(EngineLoad(running=2))
    room(a, 2)
    assert a.wants_sizes(EngineLoad(running=2))
    assert not a.wants_sizes(EngineLoad(running=2, waiting=1))
    a.observe(EngineLoad(running=2, kv_usage=0.04))  # sizes not read at this step
    assert room(a, 2) == 0 and woken == []
    step(a, [SHORT] * 2)
    assert woken == [1] and room(a, 2) == 2


@pytest.mark.parametrize("env,limit,warned", [
    ({"JOB_ADMISSION": "fixed", "MAX_CONCURRENCY": "32"}, 32, "wait inside the engine"),
    ({"JOB_INTAKE": "sdk", "MAX_CONCURRENCY": "32"}, 32, "wait inside the engine"),
    ({"MAX_CONCURRENCY": "32"}, 8, "which bounds the jobs taken"),
    ({"JOB_ADMISSION": "fixed"}, 8, None)])
def test_a_fixed_count_is_kept_as_set_and_the_log_says_what_bounds_it(env, limit, warned,
                                                                      caplog):
    """JOB_ADMISSION=fixed with MAX_CONCURRENCY above MAX_NUM_SEQS keeps that many jobs (the
    rest of their requests wait in the engine), with a warning; the engine-decided rule is
    bounded by MAX_NUM_SEQS, and says so."""
    from worker_vllm.config.settings import load_worker_settings
    from worker_vllm.engine.load import EngineLoads
    from worker_vllm.queue.serve import job_admission

    class Runner:
        loads = EngineLoads()

        def capacity(self) -> EngineCapacity:
            return EngineCapacity(8, KV_TOKENS, BLOCK)

    with caplog.at_level(logging.INFO, logger="worker_vllm.handler"):
        chosen = job_admission(load_worker_settings(env), Runner())
    assert chosen.limit == limit
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned is None:
        assert not warnings
    else:
        assert any(warned in w for w in warnings), caplog.text


@pytest.mark.parametrize("kv_tokens,max_model_len,blind", [
    (4096, 1024, 3), (4096, 0, 1), (0, 256, 20)])
def test_after_a_take_that_emptied_the_queue_the_next_fits_jobs_as_long_as_the_context(
        kv_tokens, max_model_len, blind):
    """The next take waits for jobs that have not come yet (a long-poll): they are sized by
    nothing seen, so it asks for no more than the cache holds of jobs as long as the context
    (95% of 4,096 tokens: 3 of 1,024), one when the context is unknown, and what the ramp
    allows where there is no KV cache to over-fill. A take that found all it asked for
    leaves the ramp alone."""
    a = Admission(EngineCapacity(128, kv_tokens, BLOCK, max_model_len=max_model_len))
    for i in range(10):
        a.jobs.start(f"job-{i}")
    a.asking()
    for i in range(10):
        a.jobs.results_ended(f"job-{i}")
        a.jobs.ended(f"job-{i}")
    a.took(16, 10)
    assert a.ramp.most(0) == min(blind, 20)
    a.took(10, 10)
    assert a.ramp.most(0) == 20


def test_no_step_reads_the_requests_in_flight_while_a_job_take_is_in_flight():
    """The intake asked the platform for jobs (a long-poll that spans many engine steps at
    high concurrency): reading the requests in flight is a pass over all of them at every
    step, for a decision nobody asks for until the take returns. The step after it returns
    reads them again, and the log says what the intake does meanwhile."""
    a = admission()
    woken: list[int] = []
    a.wake_when_room(lambda: woken.append(1))
    a.jobs.start("job-a")
    a.jobs.start("job-b")
    step(a, [SHORT] * 2, finished=[SHORT])
    a.arm()
    free = a.room()
    assert free > 0
    a.arm(False)  # as the intake does when it found room
    a.asking()
    assert not a.wants_sizes(EngineLoad(running=2))
    a.observe(EngineLoad(running=2, kv_usage=0.04))  # a step during the take: sizes not read
    assert describe(a, a._decide().regime).startswith("a job-take is in flight")
    a.took(free, 0)  # the platform's queue was empty
    a.arm()
    assert a.wants_sizes(EngineLoad(running=2))
    assert a.room() == 0 and woken == []  # the last step's sizes are not this step's
    step(a, [SHORT] * 2)
    assert woken == [1] and a.room() > 0
