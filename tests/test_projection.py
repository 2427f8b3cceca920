"""The KV cache's future, step by step (fast: plain data, no engine)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_vllm.queue.projection import MAX_POINTS, Projection, Shape


def projection_of(requests: list[Shape], block: int, held_now: float = 0.0) -> Projection:
    return Projection(np.array([r.held for r in requests], dtype=np.float64),
                      np.array([r.end for r in requests], dtype=np.float64), block, held_now)


def blocks(tokens: float, block: int) -> int:
    return max(1, math.ceil(tokens / block)) * block


def held_at(k: int, requests: list[Shape], job: Shape, jobs: int, block: int) -> int:
    """What the cache holds k steps from now when every request ends as expected and `jobs`
    jobs of `job`'s shape start now (each ends after its end - prompt steps)."""
    old = sum(blocks(r.held + k, block) for r in requests
              if k < max(1, math.ceil(r.end - r.held)))
    new = jobs * blocks(job.held + k, block) if k < job.end - job.held else 0
    return old + new


requests = st.lists(st.builds(lambda held, grow: Shape(held, held + grow),
                              st.integers(1, 900), st.integers(0, 400)), max_size=60)
job_shapes = st.builds(lambda prompt, grow: Shape(prompt, prompt + grow),
                       st.integers(1, 600), st.integers(1, 400))


@settings(max_examples=300, deadline=None)
@given(requests, job_shapes, st.sampled_from([1, 16, 32, 128]), st.integers(0, 3),
       st.integers(2_000, 40_000))
def test_what_fits_never_overfills_the_cache_and_one_more_would(requests, job, block,
                                                               pending, budget):
    projection = projection_of(requests, block)
    room = projection.room(job, pending, budget)
    horizon = range(int(max([r.end for r in requests] + [job.end])) + 2)
    peak = max(held_at(k, requests, job, pending + room, block) for k in horizon)
    if room:
        assert peak <= budget
    distinct = len({max(1, math.ceil(r.end - r.held)) for r in requests})
    if distinct < MAX_POINTS:  # exact, not rounded to a coarser grid: one more job over-fills
        one_more = max(held_at(k, requests, job, pending + room + 1, block) for k in horizon)
        # A new job is assumed to hold its final size to the horizon's end (it may start late).
        held_to_end = max(held_at(k, requests, job, 0, block)
                          + (pending + room + 1) * blocks(min(job.end, job.held + k), block)
                          for k in horizon)
        assert max(one_more, held_to_end) > budget


def test_an_empty_engine_fits_what_the_cache_holds_of_the_job_at_its_end():
    projection = projection_of([], 16, held_now=0.0)
    assert projection.room(Shape(100, 612), 0, 4096) == 4096 // 624
    assert projection.room(Shape(100, 612), 2, 4096) == 4096 // 624 - 2


def test_what_the_engine_reports_it_holds_now_counts():
    """Blocks the requests do not show (held by the engine for other reasons) still fill it."""
    projection = projection_of([Shape(10, 20)], 16, held_now=4000.0)
    assert projection.room(Shape(8, 30), 0, 4096) == (4096 - 4000) // 16


@settings(max_examples=200, deadline=None)
@given(requests, st.sampled_from([1, 16, 32]))
def test_every_request_holds_its_blocks_until_its_expected_end(requests, block):
    """The profile is what the requests hold at each point: each its tokens so far plus one
    per step, in whole blocks, while it runs (a request at or past its expected end runs one
    more step); and the peak is the most of those."""
    projection = projection_of(requests, block)
    distinct = len({max(1, math.ceil(r.end - r.held)) for r in requests})
    for k, held in projection.points:
        expected = sum(blocks(r.held + k, block) for r in requests
                       if k < max(1, math.ceil(r.end - r.held)))
        if distinct < MAX_POINTS:
            assert held == expected, k
        else:  # lifetimes rounded up to a coarser grid: never less
            assert held >= expected, k
    assert projection.peak() == max(t for _, t in projection.points)


def test_many_lifetimes_are_rounded_up_to_a_coarser_grid():
    requests = [Shape(10, 10 + life) for life in range(1, 500)]
    projection = projection_of(requests, 16)
    assert len(projection.points) <= MAX_POINTS + 1
