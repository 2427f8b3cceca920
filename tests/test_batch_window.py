"""How many of a batch job's lines run at once (fast: plain data, no engine)."""

from __future__ import annotations

from worker_vllm.engine.load import EngineLoad
from worker_vllm.jobs.batch.window import KV_START_LIMIT, LineWindow


def test_an_idle_engine_gets_as_many_lines_as_it_runs_at_once():
    """As `vllm run-batch` hands the engine every line: no ramp from one line step by step."""
    window = LineWindow(128)
    assert window.room(0, EngineLoad()) == 128
    # Until the engine shows them, no more: lines not yet in it do not show in its counts.
    assert window.room(128, EngineLoad()) == 0
    assert window.room(128, EngineLoad(running=100, waiting=28)) == 128


def test_one_line_always_runs_then_the_lines_at_most_double_the_engines_requests():
    window = LineWindow(128)
    assert window.room(0, EngineLoad(running=3)) == 1
    assert window.room(1, EngineLoad(running=1)) == 1
    assert window.room(2, EngineLoad(running=2)) == 2
    assert window.room(0, EngineLoad(running=40, waiting=9, kv_usage=1.0)) == 1


def test_alone_in_the_engine_a_wave_of_lines_waits_in_its_scheduler():
    """As `vllm run-batch` does, lines wait in the scheduler so that one that ends is replaced
    within the engine's next step; at most max_num_seqs of them beyond what can run."""
    window = LineWindow(128)
    assert window.room(128, EngineLoad(running=128)) == 128
    assert window.room(200, EngineLoad(running=128, waiting=72, kv_usage=0.95)) == 56
    assert window.room(256, EngineLoad(running=128, waiting=128)) == 0


def test_beside_other_jobs_requests_a_line_starts_only_while_none_waits_and_the_cache_has_room():
    window = LineWindow(128)
    others = 3
    assert window.room(10, EngineLoad(running=10 + others, waiting=1)) == 0
    assert window.room(10, EngineLoad(running=10 + others, kv_usage=KV_START_LIMIT)) == 0
    assert window.room(10, EngineLoad(running=10 + others, kv_usage=0.5)) == 16
    assert window.room(120, EngineLoad(running=120 + others, kv_usage=0.5)) == 8  # max_num_seqs
