"""Job admission in a real worker process: the engine's load decides how many jobs it takes
(real engine with a small KV cache, the local endpoint, the SDK in production mode)."""

from __future__ import annotations

import pytest
from processes import FINAL, Endpoint

pytestmark = pytest.mark.slow

# A KV cache of 4 sequences of MAX_MODEL_LEN tokens (the demo model: 1 KiB per token), so the
# earlier rule ("jobs = full contexts the cache holds") would take 4 jobs at once.
SMALL_CACHE = {"KV_CACHE_MEMORY_BYTES": str(4 * 1024 * 1024), "MAX_MODEL_LEN": "1024",
               "BLOCK_SIZE": "32"}
FULL_CONTEXTS = 4
LONG_PROMPT = "value = compute(item)\n" * 75  # 600 tokens of the demo tokenizer


def run_all(ep: Endpoint, inputs: list[dict]) -> tuple[list[dict], list[tuple[int, int]]]:
    """Submit every job at once; (their records, the /health samples meanwhile)."""
    ids, _, samples = ep.run_all(inputs)
    return [ep.record(job_id) for job_id in ids], samples


def assert_none_preempted(records: list[dict], before: int) -> None:
    assert {r["engine_preemptions"] for r in records} == {before}, records


def short_job(i: int) -> dict:
    return {"prompt": f"def job_{i}():", "sampling_params": {
        "max_tokens": 64, "ignore_eos": True, "temperature": 1.0, "seed": i}}


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, demo_model_dir):
    ep = Endpoint(tmp_path_factory.mktemp("admission"), **SMALL_CACHE)
    yield ep
    ep.close()


def test_short_jobs_run_many_more_at_once_than_full_contexts(small_cache):
    records, samples = run_all(small_cache, [short_job(i) for i in range(24)])
    assert max(p for p, _ in samples) > 2 * FULL_CONTEXTS, samples
    for record in records:
        assert record["output_tokens"] == 64
        assert isinstance(record["engine_requests_waiting"], int)
        assert 0.0 <= record["kv_cache_usage"] <= 1.0
        assert record["engine_requests_waiting_max"] >= record["engine_requests_waiting"]
    # The engine ran far more of them at once than the full contexts it holds.
    assert max(r["engine_requests_running_max"] for r in records) > 2 * FULL_CONTEXTS, records
    assert "Job intake: jobs are taken while the engine can start them" in \
        small_cache.log.read_text()


def test_long_jobs_wait_on_the_platform_not_in_the_engine(small_cache):
    """Prompts of 600 tokens and 300 generated: 4 such jobs fill the cache (~900 tokens each,
    in blocks of 32) when they run side by side, and a new one holds its 600-token prompt at
    once. A fifth fits only beside requests that started far apart (the oldest near its end
    while the youngest is still small: test_admission.py shows the arithmetic), which happens
    when the machine is slow to hand the jobs over; a sixth never does (just before the oldest
    of six ends it holds 29 blocks and the others at least their 19-block prompts: 124 of the
    127 blocks, past the share of the cache the intake fills). The rest waits in the
    platform's queue; inside the engine at most a couple of requests wait at any step, and none
    is preempted. (The platform counts a job in progress until its result is posted: jobs whose
    requests ended are still counted there while the next ones start.)"""
    assert_long_jobs_wait_on_the_platform(small_cache)


def assert_long_jobs_wait_on_the_platform(ep: Endpoint) -> None:
    jobs = [{"prompt": LONG_PROMPT, "sampling_params": {
        "max_tokens": 300, "ignore_eos": True, "temperature": 1.0, "seed": i}}
        for i in range(8)]
    before = ep.preempted_so_far()
    records, samples = run_all(ep, jobs)
    assert all(r["prompt_tokens"] == 600 and r["output_tokens"] == 300 for r in records)
    assert max(r["engine_requests_running_max"] for r in records) <= FULL_CONTEXTS + 1, records
    assert max(p for p, _ in samples) <= 2 * FULL_CONTEXTS, samples
    assert any(p >= 1 and q >= 1 for p, q in samples), samples  # queued on the platform
    assert max(r["engine_requests_waiting_max"] for r in records) <= 2, records
    assert_none_preempted(records, before)


def test_failed_and_cancelled_jobs_leave_the_books(small_cache):
    """Jobs that fail after they were taken (a prompt over MAX_MODEL_LEN, a vLLM refusal) and
    jobs cancelled while they stream: each leaves the worker's count of its jobs once. Were
    they counted as gone twice, the worker would take every long job at once afterwards
    (they would wait in the engine and be preempted)."""
    failing = [{"prompt": LONG_PROMPT * 2, "sampling_params": {"max_tokens": 8}}] * 6 + [
        {"prompt": "x", "sampling_params": {"max_tokens": 4, "logprobs": 50}}] * 4
    ids = [small_cache.run(i) for i in failing]
    assert {small_cache.wait(i, FINAL)["status"] for i in ids} == {"FAILED"}
    streams = [small_cache.run({"prompt": "def f():", "stream": True, "sampling_params": {
        "max_tokens": 1000, "ignore_eos": True}}) for _ in range(4)]
    for job_id in streams:
        small_cache.wait(job_id, ("IN_PROGRESS",), timeout=120)
        small_cache.post(f"cancel/{job_id}")
    assert {small_cache.wait(i, FINAL)["status"] for i in streams} == {"CANCELLED"}
    assert_long_jobs_wait_on_the_platform(small_cache)


def test_jobs_of_n_requests_are_sized_as_all_of_them(small_cache):
    """n = 4: each job runs four requests of ~300 tokens (40 of the cache's 127 blocks per
    job): three such jobs fit at once. Sized as one request each, twelve would be taken and
    their requests preempted."""
    jobs = [{"prompt": f"def job_{i}():", "sampling_params": {
        "n": 4, "max_tokens": 300, "ignore_eos": True, "temperature": 1.0}} for i in range(8)]
    before = small_cache.preempted_so_far()
    records, _ = run_all(small_cache, jobs)
    assert all(r["output_tokens"] == 1200 for r in records), records
    assert max(r["engine_requests_waiting_max"] for r in records) <= 4, records
    assert_none_preempted(records, before)


def test_max_concurrency_caps_the_jobs_taken(tmp_path, demo_model_dir):
    ep = Endpoint(tmp_path, MAX_CONCURRENCY="3", **SMALL_CACHE)
    try:
        _, samples = run_all(ep, [short_job(i) for i in range(12)])
    finally:
        ep.close()
    assert max(p for p, _ in samples) == 3, samples
    assert "up to 3 at once (MAX_CONCURRENCY)" in ep.log.read_text()


def test_prompts_sharing_a_long_prefix_run_and_are_not_preempted(small_cache):
    """Prefix caching (vLLM's default): jobs whose 600-token prompts share all but their last
    line hold one copy of the shared blocks; the projection counts each prompt whole (more
    than they hold: fewer jobs at once, never more), so nothing is preempted."""
    jobs = [{"prompt": LONG_PROMPT + f"job_{i} = {i}\n", "sampling_params": {
        "max_tokens": 200, "ignore_eos": True, "temperature": 1.0}} for i in range(8)]
    before = small_cache.preempted_so_far()
    records, _ = run_all(small_cache, jobs)
    assert all(r["output_tokens"] == 200 for r in records), records
    assert_none_preempted(records, before)
