"""Which stream message of a batch job carries its counts (fast: plain data, no engine)."""

from __future__ import annotations

from worker_vllm.jobs.batch.job import SUMMARY_ROOM, BatchTally, _ends_the_batch
from worker_vllm.jobs.output_limits import RESULT_BUDGET


def tally(completed: int, failed: int = 0, max_failed: int | None = None) -> BatchTally:
    counts = BatchTally(max_failed)
    counts.completed, counts.failed = completed, failed
    return counts


def test_the_last_lines_carry_the_counts_unless_the_result_must_be_the_counts_alone():
    within = RESULT_BUDGET - SUMMARY_ROOM
    assert _ends_the_batch(tally(9, 1), 10, within)
    assert not _ends_the_batch(tally(8, 1), 10, within)  # a line still to come
    # Past the result's limit the result is the last message alone: the counts alone.
    assert not _ends_the_batch(tally(10), 10, within + 1)
    # A batch that fails on its failed lines sends them, then fails: no counts.
    assert not _ends_the_batch(tally(8, 2, max_failed=1), 10, within)
    assert _ends_the_batch(tally(8, 2, max_failed=2), 10, within)
