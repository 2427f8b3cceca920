"""A job's stream messages and result as the worker posts them (``queue/sdk/results.py``):
the SDK's ``handle_job`` with ``return_aggregate_stream`` where the platform's limits allow,
weighed where they do not."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest
from runpod.serverless.modules import rp_http, rp_job

from worker_vllm.jobs import output_limits
from worker_vllm.queue.sdk import results
from worker_vllm.queue.sdk.results import JobResult, encode, handle_job


class Session:
    """What the SDK's posts use of an aiohttp session: its headers."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}


@pytest.fixture
def posts(monkeypatch) -> list[tuple[str, Any, str]]:
    """Every POST the SDK's or the worker's ``handle_job`` makes: (url, JSON body, request id)."""
    sent: list[tuple[str, Any, str]] = []

    async def transmit(session, url, data):
        text = data.decode() if isinstance(data, bytes) else data
        sent.append((url, json.loads(text), session.headers["X-Request-ID"]))

    monkeypatch.setattr(rp_http, "_transmit", transmit)
    return sent


def run(job_handler, handler, job_id: str = "job-1") -> None:
    config = {"handler": handler, "return_aggregate_stream": True}
    asyncio.run(job_handler(Session(), config, {"id": job_id, "input": {}}))


def generator_of(*outputs: Any):
    async def handler(job):
        for output in outputs:
            yield output
    return handler


# ----- the SDK's names the worker relies on ------------------------------------------------
def test_the_sdk_names_the_results_rely_on():
    assert list(inspect.signature(rp_http._transmit).parameters) == [
        "client_session", "url", "job_data"]
    assert isinstance(rp_http.JOB_DONE_URL, str) and isinstance(rp_http.JOB_STREAM_URL, str)
    # The SDK posts JSON with ensure_ascii=False, as ``encode`` does.
    assert "json.dumps(job_data, ensure_ascii=False)" in inspect.getsource(
        rp_http._handle_result)


# ----- the same posts as the SDK within the limits -----------------------------------------
@pytest.mark.parametrize("outputs", [
    [{"text": "Hello"}, {"text": " wörld ✓"}, {"usage": {"input": 3, "output": 2}}],
    [["a", "b"], "plain text", 7, None],
    [],
    [{"text": "ok"}, {"error": "the engine died"}, {"text": "never sent"}],
])
def test_within_the_limits_the_posts_are_the_sdks(posts, outputs):
    run(rp_job.handle_job, generator_of(*outputs))
    sdk = list(posts)
    posts.clear()
    run(handle_job, generator_of(*outputs))
    assert posts == sdk
    assert sdk[-1][0].endswith("&isStream=true")


def test_a_handler_that_raises_ends_the_job_with_the_sdks_error(posts):
    async def handler(job):
        yield {"text": "a"}
        raise ValueError("broken")

    run(rp_job.handle_job, handler)
    sdk = list(posts)
    posts.clear()
    run(handle_job, handler)
    assert [(u, b.keys()) for u, b, _ in posts] == [(u, b.keys()) for u, b, _ in sdk]
    assert "broken" in posts[-1][1]["error"]


class Formatted(dict):
    """An output that counts the times it is turned into text (JSON encoding does not)."""

    count = 0

    def __repr__(self) -> str:
        Formatted.count += 1
        return super().__repr__()


def test_no_output_is_turned_into_text_for_a_log_line(posts):
    """The SDK's generator loop formats every yield into a debug line whatever the log level
    (more CPU than encoding it, for a batch's large messages); the worker's does not."""
    outputs = [Formatted(line=i, text="t" * 50) for i in range(3)]
    Formatted.count = 0
    run(handle_job, generator_of(*outputs))
    assert [b["output"] for u, b, _ in posts] == [*outputs, outputs]
    assert Formatted.count == 0


# ----- weighed against the limits -----------------------------------------------------------
def test_a_message_over_a_stream_message_is_not_streamed_and_the_result_carries_it(posts):
    big = {"embedding": "x" * output_limits.STREAM_MESSAGE_LIMIT}
    run(handle_job, generator_of({"n": 1}, big, {"n": 2}))
    streamed = [b for u, b, _ in posts if u.startswith(rp_http.JOB_STREAM_URL)]
    assert streamed == [{"output": {"n": 1}}, {"output": {"n": 2}}]
    url, result, _ = posts[-1]
    assert url.startswith(rp_http.JOB_DONE_URL)
    assert result == {"output": [{"n": 1}, big, {"n": 2}]}
    assert all(len(encode(b)) <= output_limits.STREAM_MESSAGE_LIMIT for b in streamed)


def test_a_streamed_job_over_the_result_limit_ends_with_its_last_message(posts, monkeypatch):
    monkeypatch.setattr(results, "RESULT_BUDGET", 1_000)
    lines = [{"line": i, "text": "y" * 100} for i in range(20)]
    run(handle_job, generator_of(*lines, {"summary": {"lines": 20}}))
    streamed = [b["output"] for u, b, _ in posts if u.startswith(rp_http.JOB_STREAM_URL)]
    assert streamed == [*lines, {"summary": {"lines": 20}}]
    assert posts[-1][1] == {"output": [{"summary": {"lines": 20}}]}


def test_an_unstreamed_output_over_the_result_limit_fails_the_job_saying_to_stream(
        posts, monkeypatch):
    monkeypatch.setattr(results, "RESULT_BUDGET", 1_000)
    run(handle_job, generator_of({"a": "z" * 500}, {"b": "z" * 500}))
    monkeypatch.setattr(results, "STREAM_MESSAGE_LIMIT", 100)
    posts.clear()
    run(handle_job, generator_of({"a": "z" * 500}, {"b": "z" * 500}))
    assert [u for u, _, _ in posts] == [rp_http.JOB_DONE_URL + "&isStream=true"]
    error = json.loads(posts[-1][1]["error"])
    assert (error["code"], error["type"]) == (413, "output_too_large")
    assert "20,000,000 bytes" in error["message"] and '"stream": true' in error["message"]


def test_the_result_keeps_no_copy_once_it_cannot_be_sent(monkeypatch):
    monkeypatch.setattr(results, "RESULT_BUDGET", 100)
    result = JobResult()
    for i in range(10):
        result.add(encode({"i": i, "pad": "p" * 20}), streamed=True)
    assert result.parts == []
    assert json.loads(result.body()) == {"output": [{"i": 9, "pad": "p" * 20}]}


def test_a_refused_post_is_logged_and_the_job_goes_on(monkeypatch, caplog):
    from aiohttp import ClientResponseError, RequestInfo
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    sent = []

    async def transmit(session, url, data):
        sent.append(url)
        if url.startswith(rp_http.JOB_STREAM_URL):
            info = RequestInfo(URL("http://platform/stream"), "POST",
                               CIMultiDictProxy(CIMultiDict()), URL("http://platform/stream"))
            raise ClientResponseError(info, (), status=413, message="Payload Too Large")

    monkeypatch.setattr(rp_http, "_transmit", transmit)
    run(handle_job, generator_of({"n": 1}, {"n": 2}))
    assert len(sent) == 3 and sent[-1].startswith(rp_http.JOB_DONE_URL)
    assert "refused a" in caplog.text and "stream message" in caplog.text
