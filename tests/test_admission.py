"""Job admission from the engine's load (fast: plain data, no engine)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_vllm.admission import KV_TARGET, KV_TARGET_SHORT, SHORT_JOB_SHARE, Admission
from worker_vllm.engine.load import EngineLoad, RequestSize
from worker_vllm.kv_projection import Shape

KV_TOKENS, BLOCK = 4096, 16  # a cache of 4 full contexts of 1,024 tokens
TARGET = KV_TOKENS * KV_TARGET
TARGET_SHORT = KV_TOKENS * KV_TARGET_SHORT  # jobs within SHORT_JOB_SHARE of the cache


def admission(cap: int | None = None, max_num_seqs: int = 128) -> Admission:
    return Admission(max_num_seqs, KV_TOKENS, BLOCK, cap)


def step(a: Admission, running: list[RequestSize] = (), waiting: int = 0,
         finished: list[RequestSize] = ()) -> None:
    """One engine step: `running` in flight (all scheduled), `waiting` more queued in it."""
    held = sum(r.prompt + r.generated for r in running)
    a.observe(EngineLoad(running=len(running), waiting=waiting, kv_usage=held / a.kv_tokens,
                         in_flight=tuple(running), finished=tuple(finished)))


SHORT = RequestSize(8, 64, 64)  # 72 tokens: 80 in blocks of 16
LONG = RequestSize(600, 300, 300)  # 900 tokens: 912 in blocks


def shape(a: Admission, r: RequestSize) -> Shape:
    """What the admission expects of one request: the tokens it holds, and when it ends."""
    sized = a.sizes.columns((r,))
    return Shape(float(sized.held[0]), float(sized.end[0]))


def in_blocks(tokens: int) -> int:
    return -(-tokens // BLOCK) * BLOCK


def assert_never_over_target(old: list[RequestSize], free: int, job: RequestSize,
                             target: float = TARGET) -> None:
    """`free` new jobs shaped like `job`, started now beside `old`: at no later step (until
    the longest ends) does the cache hold more than `target`."""
    for k in range(max(r.max_tokens - r.generated for r in old) + job.max_tokens):
        held = sum(in_blocks(r.prompt + r.generated + k) for r in old
                   if r.generated + k < r.max_tokens)
        new = in_blocks(job.prompt + min(job.max_tokens, k))
        assert held + free * new <= target, k


def test_an_idle_worker_takes_one_job_then_doubles_what_reaches_the_engine():
    a = admission()
    assert a.sizes.next_job(a.sizes.columns(())) is None
    assert a.room(0) == 1
    assert a.room(1) == 0  # taken, not in the engine yet: its size is unknown
    step(a, [RequestSize(8, 0, 64)])
    # Before anything finished, a request is expected to use all of its max_tokens.
    assert shape(a, RequestSize(8, 0, 64)) == Shape(8, 72)
    assert a.room(1) == 1  # one take at most doubles the requests in the engine
    step(a, [RequestSize(8, 1, 64)] * 2)
    assert a.room(2) == 2


def test_short_jobs_fill_the_cache_far_beyond_its_full_contexts():
    a = admission()
    step(a, [SHORT._replace(generated=10)] * 40, finished=[SHORT] * 10)
    free = a.room(40)
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
    free = a.room(40)
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
    assert_never_over_target(mixed, a.room(37), SHORT._replace(generated=0))
    a = admission()
    step(a, in_flight[:8], finished=[LONG])  # the next job is expected long
    assert_never_over_target(in_flight[:8], a.room(8), LONG._replace(generated=0))


def test_long_jobs_stop_the_intake_when_what_they_will_hold_fills_the_cache():
    a = admission()
    step(a, [LONG._replace(generated=5)] * 4)  # 4 x 912 expected: 3648 of 3891
    assert a.room(4) == 0
    step(a, [LONG._replace(generated=300)] * 3, finished=[LONG])
    assert a.room(3) == 1


def test_long_jobs_that_started_apart_leave_room_for_one_more_than_full_contexts():
    """Four long requests started far apart never hold their final sizes together: a fifth
    fits beside them (4 x 912 is the target's limit only when they peak at once), and the
    cache still never holds more than the target at any later step."""
    a = admission()
    old = [LONG._replace(generated=g) for g in (295, 150, 80, 20)]
    step(a, old)
    free = a.room(4)
    assert free >= 1
    assert_never_over_target(old, free, LONG._replace(generated=0))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 299), min_size=5, max_size=5))
def test_five_long_requests_leave_no_room_for_a_sixth_whatever_their_ages(ages):
    """The worker test's bound (test_admission_worker.py): its cache of 127 blocks of 32, five
    requests of 600 + 300 tokens in flight at any stage: no sixth is taken."""
    a = Admission(128, 127 * 32, 32)
    step(a, [LONG._replace(generated=g) for g in ages])
    assert a.room(5) == 0


def test_the_share_of_max_tokens_used_is_learned_from_finished_requests():
    a = admission()
    chat = RequestSize(100, 0, 924)  # no max_tokens in the body: the rest of the context
    assert shape(a, chat) == Shape(100, 1024)
    step(a, [chat], finished=[RequestSize(100, 92, 924)] * 8)  # they stop after ~10%
    assert shape(a, chat) == Shape(100, 192)
    # A request past its expected share is expected to hold at least what it holds.
    assert shape(a, chat._replace(generated=400)) == Shape(500, 500)


request_sizes = st.builds(lambda prompt, max_tokens, done: RequestSize(
    prompt, round(done * max_tokens), max_tokens), st.integers(0, 5000), st.integers(0, 4000),
    st.floats(0, 1.2))


@settings(max_examples=200, deadline=None)
@given(st.lists(request_sizes, max_size=40), st.lists(request_sizes, max_size=8))
def test_requests_are_sized_by_the_share_learned_and_the_next_job_by_their_mean(in_flight,
                                                                               finished):
    """Each request in flight (one numpy pass over them all) holds its prompt and what it
    generated, and ends at its prompt plus the learned share of its max_tokens, never below
    what it holds; the next job is expected like their mean or the recent ones, whichever is
    larger."""
    sizes = admission().sizes
    for r in finished:
        sizes.learn(r)
    columns = sizes.columns(tuple(in_flight))
    assert columns.prompt.tolist() == [r.prompt for r in in_flight]
    assert columns.held.tolist() == [r.prompt + r.generated for r in in_flight]
    ends = [r.prompt + max(r.generated, sizes.share * r.max_tokens) for r in in_flight]
    assert columns.end.tolist() == pytest.approx(ends)
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
    assert a.room(0) == 1  # idle: one job, whatever the history says
    step(a, [LONG._replace(generated=0)])
    assert a.sizes.next_job(a.sizes.columns(a.load.in_flight)) == Shape(600, 900)
    assert a.room(1) == 1
    step(a, [LONG._replace(generated=1)] * 2)
    assert a.room(2) == 2  # 4 x 912 fit in the target share, 5 do not
    step(a, [LONG._replace(generated=2)] * 4)
    assert a.room(4) == 0


def test_jobs_whose_results_ended_count_as_gone_from_the_engine():
    """Jobs still posting their last messages hold nothing in the engine: with only those,
    the worker is as idle as an empty one (one job, sized by what reaches the engine), and
    the history of short jobs cannot size a burst of long ones."""
    a = admission()
    step(a, [], finished=[SHORT] * 20)
    for job in "abcdef":
        a.results_ended(job)
    assert a.room(6) == 1
    step(a, [LONG._replace(generated=0)])
    assert a.room(7) == 1
    for job in "abcdef":
        a.job_ended(job)
    assert not a.tails


def test_requests_waiting_in_the_engine_stop_the_intake():
    a = admission()
    step(a, [SHORT] * 8, waiting=1)
    assert a.room(9) == 0
    assert a.room(0) == 1  # but an idle worker always takes one


def test_a_job_larger_than_the_cache_still_starts_on_an_idle_worker():
    a = admission()
    step(a, [], finished=[RequestSize(5000, 10, 10)])
    assert a.room(0) == 1
    step(a, [RequestSize(5000, 0, 10)])
    assert a.room(1) == 0


@pytest.mark.parametrize("cap,max_num_seqs,limit,reason", [
    (3, 128, 3, "MAX_CONCURRENCY"), (30, 8, 8, "MAX_NUM_SEQS"), (None, 16, 16, "MAX_NUM_SEQS")])
def test_max_concurrency_caps_and_max_num_seqs_bounds(cap, max_num_seqs, limit, reason):
    a = admission(cap, max_num_seqs)
    assert (a.limit, a.limit_reason) == (limit, reason)
    tiny = RequestSize(4, 0, 4)
    step(a, [tiny] * (limit - 1), finished=[tiny._replace(generated=4)])
    assert a.room(limit - 1) == 1
    assert a.room(limit) == 0


def test_a_step_that_opens_room_wakes_a_blocked_intake_once():
    a = admission()
    woken: list[int] = []
    a.wake = lambda: woken.append(1)
    step(a, [SHORT] * 2, waiting=2)
    assert a.room(4) == 0
    step(a, [SHORT] * 3, waiting=1)
    assert woken == []  # still no room
    step(a, [SHORT] * 4)
    assert woken == [1]
    step(a, [SHORT] * 4)
    assert woken == [1]  # not blocked any more: the intake asks by itself


def test_the_intake_state_is_logged_at_each_change(caplog):
    clock = [0.0]
    a = Admission(128, KV_TOKENS, BLOCK, None, clock=lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="worker_vllm.admission"):
        a.room(0)
        step(a, [SHORT], waiting=3)
        a.room(1)
        a.room(1)  # no change: no line
        clock[0] = 11.0
        a.room(1)  # the change of 0 s ago is shown once REGIME_LOG_S has passed
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("Job intake: taking: 0 job(s) taken of at most 128")
    assert any("requests wait in the engine: 1 job(s) taken" in line
               and "1 running, 3 waiting, KV cache 2%" in line for line in lines), lines


def test_a_take_waits_for_an_engine_step_after_the_one_before():
    """Jobs just taken may not have reached the engine: the load seen before them would size
    them by the past (a change to longer jobs would over-fill the cache)."""
    a = admission()
    step(a, [SHORT] * 2, finished=[SHORT] * 4)
    assert a.room(2) > 0
    assert a.room(3) == 0
    step(a, [SHORT] * 3)
    assert a.room(3) > 0


@pytest.mark.parametrize("env,fixed,limit", [
    ({}, False, 128), ({"MAX_CONCURRENCY": "30"}, False, 30),
    ({"JOB_ADMISSION": "fixed", "MAX_CONCURRENCY": "32"}, True, 32),
    ({"JOB_ADMISSION": "fixed"}, True, 128), ({"JOB_INTAKE": "sdk"}, True, 128)])
def test_the_queue_front_end_picks_the_admission_its_settings_name(env, fixed, limit):
    from worker_vllm.admission import FixedAdmission
    from worker_vllm.config.settings import load_worker_settings
    from worker_vllm.engine.load import EngineLoads
    from worker_vllm.serve_queue import job_admission

    class Runner:  # the engine's figures the front-end reads
        loads = EngineLoads()

        def capacity(self) -> tuple[int, int, int]:
            return 128, KV_TOKENS, BLOCK

    chosen = job_admission(load_worker_settings(env), Runner())
    assert isinstance(chosen, FixedAdmission) == fixed and chosen.limit == limit
    if fixed:  # a fixed count: every free slot is taken, whatever the engine's load
        assert chosen.room(limit - 5) == 5


def test_the_requests_in_flight_are_read_only_at_steps_where_they_can_matter():
    """Reading them is a pass over every request in the engine, on its thread: not while
    requests wait in it or the jobs are at the limit. A take after such a step waits for the
    next step that reads them."""
    a = admission(cap=4)
    woken: list[int] = []
    a.wake = lambda: woken.append(1)
    step(a, [SHORT] * 2, finished=[SHORT])
    a.room(4)  # at the limit
    assert not a.wants_sizes(EngineLoad(running=2))
    a.room(2)
    assert a.wants_sizes(EngineLoad(running=2))
    assert not a.wants_sizes(EngineLoad(running=2, waiting=1))
    a.observe(EngineLoad(running=2, kv_usage=0.04))  # sizes not read at this step
    assert a.room(2) == 0 and woken == []
    step(a, [SHORT] * 2)
    assert woken == [1] and a.room(2) == 2
