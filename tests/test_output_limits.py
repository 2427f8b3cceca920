"""A job's output within RunPod's limits (1 MB per stream message, 20 MB per result), as
deployed: the local endpoint refuses posts over them as the platform does (413), the SDK in
production mode, the MiniLM embedding model, whose lines are large (a 384-dimension
embedding is about 8 KB of JSON)."""

from __future__ import annotations

import json
import time

import pytest
from processes import FINAL, Endpoint, embedding_endpoint

pytestmark = pytest.mark.slow

MB = 1_000_000


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    ep = embedding_endpoint(tmp_path_factory.mktemp("limits"))
    yield ep
    ep.close()


def embedding_line(custom_id: str, inputs: int) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "minilm",
                     "input": [f"sentence {i} of {custom_id}" for i in range(inputs)]}}


# 60 lines of 48 embeddings (~0.4 MB each: over 20 MB in all) and, 5th, one of 160 (~1.3 MB:
# over one stream message).
LINES = [embedding_line(f"l{i}", 160 if i == 5 else 48) for i in range(60)]


def read_stream(ep: Endpoint, job_id: str, timeout: float = 600) -> tuple[list, dict]:
    """Every stream message the client reads from /stream, and the job's final status."""
    messages: list = []
    deadline = time.time() + timeout
    while True:
        polled = ep.get(f"stream/{job_id}")
        messages += [m["output"] for m in polled["stream"]]
        if polled["status"] in FINAL and not polled["stream"]:
            return messages, ep.get(f"status/{job_id}")
        assert time.time() < deadline, ep.log.read_text()[-3000:]


def test_a_streamed_batch_over_the_result_limit_streams_every_line_once(embedder):
    job_id = embedder.run({"batch": LINES, "stream": True})
    messages, status = read_stream(embedder, job_id)
    assert status["status"] == "COMPLETED", status
    assert "refusedPosts" not in status, status["refusedPosts"]
    # Every message within one stream message; the result within one result.
    sizes = [len(json.dumps({"output": m}, ensure_ascii=False).encode()) for m in messages]
    assert max(sizes) <= MB, sizes
    lines = [line for m in messages[:-1] for line in m["lines"]]
    assert sum(sizes) > 20 * MB, sum(sizes)
    assert sorted(line["custom_id"] for line in lines) == sorted(x["custom_id"] for x in LINES)
    by_id = {line["custom_id"]: line for line in lines}
    # The line too large for a message is an error line naming the limit; the rest answered.
    big = by_id.pop("l5")
    assert big["response"]["status_code"] == 413, big
    assert "1,000,000 bytes" in big["error"]["message"], big
    assert all(line["error"] is None for line in by_id.values())
    assert all(len(line["response"]["body"]["data"]) == 48 for line in by_id.values())
    summary = messages[-1]
    assert summary["request_counts"] == {"total": 60, "completed": 59, "failed": 1}
    # The result does not repeat 20 MB of lines: the counts and usage, as the last message.
    assert status["output"] == [summary]


def test_the_same_batch_without_stream_fails_saying_to_stream(embedder):
    job_id = embedder.run({"batch": LINES})
    status = embedder.wait(job_id, timeout=600)
    assert status["status"] == "FAILED", str(status)[:2000]
    assert "refusedPosts" not in status, status["refusedPosts"]
    error = json.loads(status["error"])
    assert (error["code"], error["type"], error["param"]) == (413, "output_too_large", "stream")
    assert '"stream": true' in error["message"] and "20,000,000" in error["message"]


def test_a_non_streamed_job_over_the_result_limit_fails_saying_to_stream(embedder):
    # One OpenAI embeddings request whose answer alone passes 20 MB (3,000 embeddings).
    job_id = embedder.run({"openai_route": "/v1/embeddings",
                           "openai_input": {"model": "minilm",
                                            "input": [f"s {i}" for i in range(3000)]}})
    status = embedder.wait(job_id, timeout=600)
    assert status["status"] == "FAILED", str(status)[:2000]
    assert "refusedPosts" not in status, status["refusedPosts"]
    error = json.loads(status["error"])
    assert (error["code"], error["type"]) == (413, "output_too_large")
    assert '"stream": true' in error["message"]


def test_an_answer_over_one_stream_message_still_reaches_the_client(embedder):
    # 160 embeddings (~1.3 MB): too large for a stream message, well within a result.
    job_id = embedder.run({"openai_route": "/v1/embeddings",
                           "openai_input": {"model": "minilm",
                                            "input": [f"s {i}" for i in range(160)]}})
    messages, status = read_stream(embedder, job_id)
    assert status["status"] == "COMPLETED", str(status)[:2000]
    assert "refusedPosts" not in status, status["refusedPosts"]
    assert messages == []
    (answer,) = status["output"]
    assert len(answer["data"]) == 160
