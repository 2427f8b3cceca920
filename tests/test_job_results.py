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

    async def sdk_transmit(session, url, data):
        sent.append((url, json.loads(data), session.headers["X-Request-ID"]))

    async def transmit(session, url, body, request_id):
        sent.append((url, json.loads(body), request_id))

    monkeypatch.setattr(rp_http, "_transmit", sdk_transmit)
    monkeypatch.setattr(results, "transmit", transmit)
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
    # ``transmit`` retries as the SDK's _transmit does: 3 attempts, FibonacciRetry's waits.
    assert "FibonacciRetry(attempts=3)" in inspect.getsource(rp_http._transmit)
    waits = rp_http.FibonacciRetry(attempts=3)
    assert (waits.get_timeout(1), waits.get_timeout(2)) == results.RETRY_WAITS


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


# ----- the POSTs on the wire, against the SDK's ---------------------------------------------
class Platform:
    """A real HTTP server that records each POST and answers with the next status of
    ``answers`` for its path (200 once they run out)."""

    def __init__(self, answers: dict[str, list[int]]) -> None:
        self.answers = {path: list(statuses) for path, statuses in answers.items()}
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def answer(self, request):
        from aiohttp import web

        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k in ("Content-Type", "charset", "X-Request-ID")}
        self.seen.append((request.method, request.path_qs, headers, body))
        statuses = self.answers.get(request.path, [])
        return web.Response(status=statuses.pop(0) if statuses else 200, text="ok")


def on_the_wire(monkeypatch, answers: dict[str, list[int]], job_handler, handler) -> Platform:
    """``job_handler`` run against a real server through the SDK's own aiohttp session."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from runpod.http_client import AsyncClientSession

    platform = Platform(answers)
    app = web.Application()
    app.router.add_post("/{path:.*}", platform.answer)

    async def main():
        async with TestServer(app) as server:
            base = str(server.make_url(""))
            monkeypatch.setattr(rp_http, "JOB_STREAM_URL", f"{base}/stream?id=$ID")
            monkeypatch.setattr(rp_http, "JOB_DONE_URL", f"{base}/done?id=$ID")
            async with AsyncClientSession() as session:
                await job_handler(session, {"handler": handler, "return_aggregate_stream": True},
                                  {"id": "job-7", "input": {}})
    asyncio.run(main())
    return platform


@pytest.mark.parametrize(("answers", "stream_posts"), [
    ({}, 2),  # every POST taken
    ({"/stream": [503, 502]}, 4),  # the first message taken at its third attempt
    ({"/stream": [503, 503, 503], "/done": [500]}, 4),  # the first lost after 3 attempts
    ({"/stream": [413]}, 2),  # refused: not tried again
])
def test_the_posts_on_the_wire_are_the_sdks(monkeypatch, answers, stream_posts):
    """Method, URL, form headers, the job's id, body and retries as the SDK's ``_transmit``
    makes them (its waits shortened in both)."""
    from functools import partial

    monkeypatch.setattr(rp_http, "FibonacciRetry",
                        partial(rp_http.FibonacciRetry, multiplier=0.001))
    monkeypatch.setattr(results, "RETRY_WAITS", (0.002, 0.003))
    handler = generator_of({"text": "Hello"}, {"text": " wörld ✓"})
    sdk = on_the_wire(monkeypatch, answers, rp_job.handle_job, handler)
    ours = on_the_wire(monkeypatch, answers, handle_job, handler)
    assert [(m, u, h, json.loads(b)) for m, u, h, b in ours.seen] == [
        (m, u, h, json.loads(b)) for m, u, h, b in sdk.seen]
    assert ours.seen[0][2] == {"Content-Type": "application/x-www-form-urlencoded",
                               "charset": "utf-8", "X-Request-ID": "job-7"}
    assert [u for _, u, _, _ in ours.seen].count("/stream?id=job-7&isStream=false") == (
        stream_posts)


def test_a_refused_post_is_logged_and_the_job_goes_on(monkeypatch, caplog):
    platform = on_the_wire(monkeypatch, {"/stream": [413]}, handle_job,
                           generator_of({"n": 1}, {"n": 2}))
    assert [u.split("?")[0] for _, u, _, _ in platform.seen] == ["/stream", "/stream", "/done"]
    assert json.loads(platform.seen[-1][3]) == {"output": [{"n": 1}, {"n": 2}]}
    assert "refused a" in caplog.text and "stream message" in caplog.text


def test_a_redirect_is_a_refused_post_not_followed(monkeypatch, caplog):
    """The platform never redirects a POST: one that does has not taken it (logged, not
    followed, not tried again)."""
    platform = on_the_wire(monkeypatch, {"/stream": [307]}, handle_job,
                           generator_of({"n": 1}, {"n": 2}))
    assert [u.split("?")[0] for _, u, _, _ in platform.seen] == ["/stream", "/stream", "/done"]
    assert "refused a" in caplog.text and "307" in caplog.text


def test_a_post_that_failed_without_a_message_is_logged_by_its_kind(monkeypatch, caplog):
    async def no_answer(poster, url, body, request_id):
        raise TimeoutError()

    monkeypatch.setattr(results, "transmit", no_answer)
    run(handle_job, generator_of({"n": 1}))
    assert "refused a" in caplog.text and ": TimeoutError" in caplog.text
