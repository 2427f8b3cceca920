"""Local endpoint API semantics that need no engine: queue bound, ttl, purge, webhook, and the
worker-facing protocol spoken over real HTTP the way the runpod SDK speaks it."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from fastapi.testclient import TestClient

from local_platform import Endpoint, create_app

WORKER_KEY = "worker-secret"


@pytest.fixture()
def endpoint():
    return Endpoint(max_queue=2)


@pytest.fixture()
def client(endpoint):
    with TestClient(create_app(endpoint, api_key=None, worker_key=WORKER_KEY)) as c:
        yield c


WORKER = {"Authorization": WORKER_KEY}


def test_queue_is_bounded(client):
    for _ in range(2):
        assert client.post("/v2/e/run", json={"input": {"prompt": "a"}}).status_code == 200
    r = client.post("/v2/e/run", json={"input": {"prompt": "a"}})
    assert r.status_code == 429 and "queue is full" in r.json()["error"]
    assert client.post("/v2/e/purge-queue").json()["removed"] == 2
    assert client.post("/v2/e/run", json={"input": {"prompt": "a"}}).status_code == 200


def test_missing_input_is_400(client):
    assert client.post("/v2/e/run", json={"prompt": "a"}).status_code == 400
    assert client.post("/v2/e/run", content=b"not json").status_code == 400


def test_worker_protocol_stream_done_and_webhook(client):
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{server.server_port}/hook"
    try:
        job = client.post("/v2/e/run", json={"input": {"prompt": "a"}, "webhook": hook_url})
        job_id = job.json()["id"]
        # The worker side, as the SDK calls it (JSON sent with a form content type).
        assert client.get("/_worker/job-take/w1?x=1").status_code == 401  # no worker key
        taken = client.get("/_worker/job-take-batch/w1?x=1&batch_size=4", headers=WORKER)
        assert taken.json() == [{"id": job_id, "input": {"prompt": "a"}}]
        form = {**WORKER, "Content-Type": "application/x-www-form-urlencoded"}
        for chunk in ("one", "two"):
            client.post(f"/_worker/job-stream/w1/{job_id}?isStream=false",
                        content=json.dumps({"output": chunk}), headers=form)
        stream = client.get(f"/v2/e/stream/{job_id}").json()
        assert stream == {"status": "IN_PROGRESS",
                          "stream": [{"output": "one"}, {"output": "two"}]}
        client.post(f"/_worker/job-done/w1/{job_id}?isStream=true",
                    content=json.dumps({"output": ["one", "two"]}), headers=form)
        status = client.get(f"/v2/e/status/{job_id}").json()
        assert status["status"] == "COMPLETED" and status["output"] == ["one", "two"]
        assert {"delayTime", "executionTime"} <= set(status)
        assert client.get(f"/v2/e/stream/{job_id}").json()["stream"] == []  # nothing new
        deadline = time.time() + 5
        while not received and time.time() < deadline:
            time.sleep(0.05)
        assert received and received[0]["id"] == job_id and received[0]["status"] == "COMPLETED"
    finally:
        server.shutdown()


def test_posts_over_the_platforms_limits_are_refused_and_shown(client):
    """1 MB per stream message, 20 MB per result (decimal), as RunPod documents them."""
    job_id = client.post("/v2/e/run", json={"input": {}}).json()["id"]
    client.get("/_worker/job-take/w1?x=1", headers=WORKER)
    pad = 1_000_000 - len(json.dumps({"output": ""}))
    fits = json.dumps({"output": "a" * pad})
    assert client.post(f"/_worker/job-stream/w1/{job_id}?isStream=false", content=fits,
                       headers=WORKER).status_code == 200
    over = json.dumps({"output": "b" * (pad + 1)})
    refused = client.post(f"/_worker/job-stream/w1/{job_id}?isStream=false", content=over,
                          headers=WORKER)
    assert refused.status_code == 413 and "1000000" in refused.json()["error"]
    stream = client.get(f"/v2/e/stream/{job_id}").json()
    assert [len(m["output"]) for m in stream["stream"]] == [pad]  # the refused one is lost
    status = client.get(f"/v2/e/status/{job_id}").json()
    assert status["status"] == "IN_PROGRESS"
    assert status["refusedPosts"] == ["stream message of 1000001 bytes"]
    result = json.dumps({"output": ["c" * 20_000_000]})
    assert client.post(f"/_worker/job-done/w1/{job_id}?isStream=true", content=result,
                       headers=WORKER).status_code == 413
    status = client.get(f"/v2/e/status/{job_id}").json()
    assert status["status"] == "FAILED" and "refused" in status["error"]
    assert status["refusedPosts"][-1] == f"result of {len(result)} bytes"


def test_cancel_of_a_running_job_reaches_the_stop_channel(client):
    job_id = client.post("/v2/e/run", json={"input": {}}).json()["id"]
    client.get("/_worker/job-take/w1?x=1", headers=WORKER)
    assert client.post(f"/v2/e/cancel/{job_id}").json()["status"] == "CANCELLED"
    assert client.get("/_worker/job-stop/w1?x=1", headers=WORKER).json() == {
        "jobsToStop": [job_id]}
    # A late result of the cancelled job is dropped.
    client.post(f"/_worker/job-done/w1/{job_id}", content=json.dumps({"output": 1}),
                headers=WORKER)
    assert client.get(f"/v2/e/status/{job_id}").json()["status"] == "CANCELLED"


def test_unknown_job_is_404(client):
    assert client.get("/v2/e/status/nope").status_code == 404
    assert client.post("/v2/e/cancel/nope").status_code == 404


@pytest.mark.parametrize("stream", [False, True])
def test_an_openai_request_hears_its_job_end_while_it_checks_its_client(monkeypatch, endpoint,
                                                                         stream):
    """The job ends while the request awaits its client check (`is_disconnected`): the answer
    comes at once, not after the next check (made an hour away here)."""
    from starlette.requests import Request

    from local_platform import openai_api

    monkeypatch.setattr(openai_api, "DISCONNECT_CHECK_S", 3600.0)
    checks = 0

    async def job_ends_during_the_check(request: Request) -> bool:
        nonlocal checks
        checks += 1
        (job,) = endpoint.jobs.values()
        if stream:
            job.chunks.append("data: {}\n\n")
        endpoint.finish(job, "COMPLETED", output=[{"answer": 42}] if not stream else [])
        return False

    monkeypatch.setattr(Request, "is_disconnected", job_ends_during_the_check)
    answers: list = []
    with TestClient(create_app(endpoint, api_key=None, worker_key=WORKER_KEY)) as c:
        ask = threading.Thread(target=lambda: answers.append(c.post(
            "/v2/e/openai/v1/chat/completions", json={"messages": [], "stream": stream})))
        ask.start()
        ask.join(timeout=60)
        hung = ask.is_alive()
        if hung:  # wake the request, so the client can close
            c.portal.call(lambda: next(iter(endpoint.jobs.values())).notify())
            ask.join()
    assert not hung, "the answer waited for the next client check"
    assert checks == 1 and answers[0].status_code == 200
    assert answers[0].json() == {"answer": 42} if not stream else "data: {}" in answers[0].text
