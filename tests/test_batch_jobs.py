"""Batch jobs on the real engine, in-process: OpenAI Batch API request lines in one job, run
through vLLM's app, answered as Batch API output lines in the order they finish."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import collect

from worker_vllm.model.demo import DEMO_MODEL_ID

pytestmark = pytest.mark.slow

SEEDED = {"temperature": 1.0, "seed": 11, "max_tokens": 8}


def chat(custom_id: str, text: str, **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": DEMO_MODEL_ID, "messages": [{"role": "user", "content": text}],
                     **SEEDED, **body}}


def completion(custom_id: str, prompt: str, **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": DEMO_MODEL_ID, "prompt": prompt, **SEEDED, **body}}


@pytest.fixture()
def limited(worker, monkeypatch):
    """The session's worker with smaller per-job limits."""
    def set_limits(**limits: int) -> None:
        monkeypatch.setattr(worker, "settings", worker.settings.model_copy(update=limits))
    return set_limits


def by_id(output: dict) -> dict[str, dict]:
    return {line["custom_id"]: line for line in output["lines"]}


async def test_a_mixed_batch_gives_one_line_per_input_line(worker, limited):
    limited(job_max_tokens=50)
    lines = [
        chat("chat-1", "hello"),
        completion("comp-1", "def f():"),
        {"custom_id": "emb-1", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": DEMO_MODEL_ID, "input": "a"}},
        "not an object",
        {"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": DEMO_MODEL_ID, "messages": "not a list"}},
        chat("too-long", "x", max_tokens=51),
        {"custom_id": "get", "method": "GET", "url": "/v1/models", "body": {}},
        chat("streamed", "x", stream=True),
        {"custom_id": "tokenize", "method": "POST", "url": "/tokenize",
         "body": {"model": DEMO_MODEL_ID, "prompt": "x"}},
        completion("wrong-model", "x", model="nope"),
        chat("chat-1", "a second line with the same custom_id"),
    ]
    (output,) = await collect(worker, {"batch": lines}, job_id="mixed")
    assert len(output["lines"]) == len(lines)
    got = by_id(output)
    assert got["chat-1"]["response"]["status_code"] == 200
    assert got["chat-1"]["error"] is None
    body = got["chat-1"]["response"]["body"]
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 8
    assert got["comp-1"]["response"]["body"]["object"] == "text_completion"
    # The demo model generates; it serves no embeddings: an error line, not a failed batch.
    assert got["emb-1"]["response"]["status_code"] == 404
    assert "/v1/chat/completions" in got["emb-1"]["error"]["message"]
    # vLLM's own 400 for a body it refuses; the worker's limits per line.
    assert got["bad-body"]["response"]["status_code"] == 400
    assert got["bad-body"]["error"]["type"] != "internal_error"
    assert got["too-long"]["response"]["status_code"] == 400
    assert "JOB_MAX_TOKENS" in got["too-long"]["error"]["message"]
    assert got["too-long"]["error"]["param"] == "body.max_tokens"
    assert got["get"]["error"]["param"] == "method"
    assert got["streamed"]["error"]["param"] == "body.stream"
    assert got["tokenize"]["response"]["status_code"] == 404
    assert got["wrong-model"]["response"]["status_code"] == 404
    assert got["wrong-model"]["response"]["body"]["error"] == got["wrong-model"]["error"]
    unparsed = [line for line in output["lines"] if line["custom_id"] is None]
    assert len(unparsed) == 1 and "line 4" in unparsed[0]["error"]["message"]
    repeated = [line for line in output["lines"] if line["custom_id"] == "chat-1"]
    assert sorted(line["response"]["status_code"] for line in repeated) == [200, 400]
    assert output["request_counts"] == {"total": 11, "completed": 2, "failed": 9}
    assert output["usage"]["completion_tokens"] == 16
    assert len({line["id"] for line in output["lines"]}) == len(lines)


async def test_each_line_equals_the_same_request_alone(worker):
    lines = [chat(f"c{i}", f"tell me about {i}", seed=i) for i in range(6)]
    lines += [completion(f"p{i}", f"x = {i}", seed=100 + i) for i in range(6)]
    (output,) = await collect(worker, {"batch": lines}, job_id="same")
    got = by_id(output)
    for line in lines:
        (alone,) = await collect(worker, {"openai_route": line["url"],
                                          "openai_input": line["body"]})
        batched = got[line["custom_id"]]["response"]["body"]
        assert batched["choices"] == alone["choices"], line["custom_id"]
        assert batched["usage"] == alone["usage"]


async def test_jsonl_text_is_the_same_batch(worker):
    lines = [completion(f"j{i}", f"y = {i}", seed=i) for i in range(4)]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n{not json\n"
    (from_text,) = await collect(worker, {"batch_jsonl": text})
    (from_list,) = await collect(worker, {"batch": lines})
    assert len(from_text["lines"]) == 5
    bad = next(line for line in from_text["lines"] if line["custom_id"] is None)
    assert bad["error"]["message"].startswith("line 6: not JSON")
    for cid, line in by_id(from_list).items():
        assert by_id(from_text)[cid]["response"]["body"]["choices"] == \
            line["response"]["body"]["choices"]


async def test_line_limit(worker, limited):
    limited(job_max_batch_lines=40)
    lines = [completion(f"l{i}", "z", max_tokens=2) for i in range(40)]
    (output,) = await collect(worker, {"batch": lines})
    assert output["request_counts"]["completed"] == 40
    (over,) = await collect(worker, {"batch": [*lines, completion("l40", "z")]})
    error = over["error"]
    assert error["code"] == 413 and error["param"] == "batch"
    assert "41 request lines" in error["message"] and "JOB_MAX_BATCH_LINES" in error["message"]
    for bad, field in (({"batch": []}, "batch"), ({"batch": [], "batch_jsonl": "x"}, "batch")):
        (out,) = await collect(worker, bad)
        assert out["error"]["code"] == 400 and out["error"]["param"] == field


async def test_a_streamed_batch_sends_lines_as_they_finish(worker):
    # Short lines and long ones: the short ones are out while the long ones still run.
    lines = [completion(f"long{i}", "a", max_tokens=300, ignore_eos=True) for i in range(2)]
    lines += [completion(f"short{i}", "b", max_tokens=2) for i in range(8)]
    items = worker.handle({"id": "streamed", "input": {"batch": lines, "stream": True}})
    messages = []
    async for item in items:
        messages.append(item)
        if len(messages) == 1:
            # The first message leaves while the long lines are still in the engine.
            assert await worker.runner.num_unfinished_requests() >= 1
    streamed = [line for m in messages for line in m["lines"]]
    assert sorted(line["custom_id"] for line in streamed) == \
        sorted(sent["custom_id"] for sent in lines)
    assert streamed[-1]["custom_id"].startswith("long")
    # The message with the last lines carries the counts: no message (no platform round
    # trip) of its own for them.
    summary = messages[-1]
    assert summary["lines"] and summary["lines"][-1] is streamed[-1]
    assert all("request_counts" not in m for m in messages[:-1])
    assert summary["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    assert summary["usage"]["completion_tokens"] == 2 * 300 + 8 * 2


async def test_stopping_a_batch_aborts_every_line_at_once(worker):
    lines = [completion(f"c{i}", "a", max_tokens=1500, ignore_eos=True) for i in range(24)]
    lines += [completion(f"q{i}", "b", max_tokens=1) for i in range(4)]
    items = worker.handle({"id": "stopped", "input": {"batch": lines, "stream": True}})
    first = await anext(items)
    assert first["lines"]
    assert await worker.runner.num_unfinished_requests() > 1
    await items.aclose()  # what the platform's cancel or timeout ends in
    stopped = time.monotonic()
    while (running := await worker.runner.num_unfinished_requests()) and \
            time.monotonic() - stopped < 1.0:
        await asyncio.sleep(0.02)
    assert running == 0


async def test_more_failed_lines_than_max_failed_lines_fail_the_batch(worker):
    good = [completion(f"ok{i}", "z", max_tokens=2) for i in range(3)]
    bad = completion("bad", "z", model="not-served")
    # Within the limit: the batch completes with its error line.
    (output,) = await collect(worker, {"batch": [*good, bad], "max_failed_lines": 1})
    assert output["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    # Over it, streamed: the failed line reaches the client, then the job fails naming it.
    lines = [completion(f"long{i}", "a", max_tokens=300, ignore_eos=True) for i in range(2)]
    out = await collect(worker, {"batch": [bad, *lines], "stream": True,
                                 "max_failed_lines": 0})
    *streamed, end = out
    assert [line["custom_id"] for m in streamed for line in m["lines"]] == ["bad"]
    error = end["error"]
    assert (error["code"], error["param"]) == (422, "max_failed_lines")
    assert "'bad'" in error["message"] and "404" in error["message"]
    # The long lines were stopped, not run to their end.
    stopped = time.monotonic()
    while await worker.runner.num_unfinished_requests() and time.monotonic() - stopped < 5:
        await asyncio.sleep(0.02)
    assert await worker.runner.num_unfinished_requests() == 0
    (failed,) = await collect(worker, {"batch": [bad, *good], "max_failed_lines": 0})
    assert failed["error"]["type"] == "batch_lines_failed"


async def test_the_hubs_batch_test_fails_when_its_lines_fail(worker):
    """The Hub judges a test by the job's status: its batch test, sent as written to a
    worker that serves another model (every line 404), must fail."""
    from conftest import ROOT

    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())["tests"]
    (hub,) = [t["input"] for t in tests if t["name"] == "batch"]
    *_, end = await collect(worker, hub)
    assert end["error"]["type"] == "batch_lines_failed", end


async def test_a_batchs_lines_are_asked_and_answered_on_the_engines_loop(worker, monkeypatch):
    """No hop between the job's loop and the engine's per line (each is a wake-up of a loop
    and a hand-over of the GIL): the lines reach vLLM's app on its own loop, and only their
    output lines come back."""
    import threading

    from worker_vllm.engine.app import VLLMApp

    hops, threads = [], set()
    request, answered = VLLMApp.request, VLLMApp.answered

    async def hop(self, *args, **kwargs):
        hops.append(args[1])
        return await request(self, *args, **kwargs)

    async def here(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return await answered(self, *args, **kwargs)

    monkeypatch.setattr(VLLMApp, "request", hop)
    monkeypatch.setattr(VLLMApp, "answered", here)
    lines = [chat(f"c{i}", f"line {i}") for i in range(8)]
    (output,) = await collect(worker, {"batch": lines})
    assert output["request_counts"] == {"total": 8, "completed": 8, "failed": 0}
    assert hops == []
    assert threads == {"vllm-engine-loop"}
