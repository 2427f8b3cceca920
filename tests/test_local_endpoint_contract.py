"""The platform's side of the contract as RunPod documents it, over real HTTP against the local
endpoint's app (no worker process: the worker-facing calls are made as the runpod SDK makes
them): retry, result retention, ttl as a job's whole lifespan, policy bounds, workerId, webhook
retries, and the in-progress jobs of a worker that exits going back to the queue."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import requests
import uvicorn

from local_platform import Endpoint, create_app
from local_platform.state import RUN_RETENTION_S, RUNSYNC_RETENTION_S

WORKER_KEY = "worker-secret"
WORKER = {"Authorization": WORKER_KEY}
FORM = {**WORKER, "Content-Type": "application/x-www-form-urlencoded"}


class Served:
    """The endpoint's app on a real socket, on a thread of this process."""

    def __init__(self, endpoint: Endpoint) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = endpoint
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(endpoint, None, WORKER_KEY), host="127.0.0.1", port=port,
            log_level="warning"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()),
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"
        self.api = f"{self.url}/v2/e"

    def run(self, body: dict, path: str = "run") -> requests.Response:
        return requests.post(f"{self.api}/{path}", json=body, timeout=30)

    def status(self, job_id: str) -> requests.Response:
        return requests.get(f"{self.api}/status/{job_id}", timeout=10)

    def take(self, worker: str = "w1") -> list[dict]:
        r = requests.get(f"{self.url}/_worker/job-take-batch/{worker}?x=1&batch_size=8",
                         headers=WORKER, timeout=30)
        return r.json() if r.status_code == 200 else []

    def done(self, job_id: str, body: dict) -> None:
        requests.post(f"{self.url}/_worker/job-done/w1/{job_id}", data=json.dumps(body),
                      headers=FORM, timeout=10)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture()
def served() -> Iterator[Served]:
    s = Served(Endpoint(max_queue=100, webhook_retry_delay=0.2))
    yield s
    s.close()


@pytest.fixture()
def served_short() -> Iterator[Served]:
    s = Served(Endpoint(max_queue=100, short_policies=True))
    yield s
    s.close()


@pytest.mark.parametrize("policy,message", [
    ({"executionTimeout": 4999}, "executionTimeout must be between 5000"),
    ({"executionTimeout": "600000"}, "executionTimeout must be a number"),
    ({"executionTimeout": True}, "executionTimeout must be a number"),
    ({"executionTimeout": 8 * 24 * 3600 * 1000}, "executionTimeout must be between"),
    ({"ttl": 9999}, "ttl must be between 10000"),
    ({"ttl": None}, "ttl must be a number"),
    ({"lowPriority": "yes"}, "lowPriority must be true or false"),
])
def test_policies_outside_the_platforms_bounds_are_400(served, policy, message):
    for path in ("run", "runsync"):
        r = served.run({"input": {}, "policy": policy}, path)
        assert r.status_code == 400 and message in r.json()["error"], r.text


def test_policies_within_the_bounds_are_accepted(served):
    r = served.run({"input": {}, "policy": {"executionTimeout": 5000, "ttl": 10000,
                                            "lowPriority": True}})
    assert r.status_code == 200 and r.json()["status"] == "IN_QUEUE"


def test_status_names_the_worker_that_took_the_job(served):
    job_id = served.run({"input": {}}).json()["id"]
    assert "workerId" not in served.status(job_id).json()
    assert [j["id"] for j in served.take("worker-7")] == [job_id]
    assert served.status(job_id).json()["workerId"] == "worker-7"


def test_retry_requeues_a_failed_job_under_its_id_without_its_old_output(served):
    job_id = served.run({"input": {"x": 1}}).json()["id"]
    served.take()
    served.done(job_id, {"error": "boom"})
    assert served.status(job_id).json()["status"] == "FAILED"
    r = requests.post(f"{served.api}/retry/{job_id}", timeout=10)
    assert r.json() == {"id": job_id, "status": "IN_QUEUE"}
    status = served.status(job_id).json()
    assert status["status"] == "IN_QUEUE" and "error" not in status
    assert [j["input"] for j in served.take()] == [{"x": 1}]
    served.done(job_id, {"output": "ok"})
    assert served.status(job_id).json()["output"] == "ok"
    again = requests.post(f"{served.api}/retry/{job_id}", timeout=10)
    assert again.status_code == 400 and "COMPLETED" in again.json()["error"]
    assert requests.get(f"{served.api}/health", timeout=10).json()["jobs"]["retried"] == 1


def test_results_are_kept_30_minutes_after_run_and_1_minute_after_runsync(served):
    ids = {}
    for path in ("run", "runsync"):
        r = requests.post(f"{served.api}/{path}?wait=100", json={"input": {}}, timeout=30)
        ids[path] = r.json()["id"]
    for job in served.take():
        served.done(job["id"], {"output": 1})
    endpoint = served.endpoint
    # Move the end of each job back in time instead of waiting half an hour.
    for path, kept in (("run", RUN_RETENTION_S), ("runsync", RUNSYNC_RETENTION_S)):
        endpoint.jobs[ids[path]].finished -= kept - 2
    endpoint.expire()
    assert all(served.status(i).status_code == 200 for i in ids.values())
    for path in ids:
        endpoint.jobs[ids[path]].finished -= 3
    endpoint.expire()
    assert all(served.status(i).status_code == 404 for i in ids.values())


def test_ttl_is_the_whole_lifespan_from_submission(served_short):
    served = served_short
    ttl = {"input": {}, "policy": {"ttl": 300}}
    running = served.run(ttl).json()["id"]
    served.take()
    done = served.run(ttl).json()["id"]
    served.take()
    served.done(done, {"output": 1})
    queued = served.run(ttl).json()["id"]
    time.sleep(0.35)
    served.endpoint.expire()
    for job_id in (running, queued):
        status = served.status(job_id).json()
        assert status["status"] == "TIMED_OUT" and "ttl" in status["error"]
    # The running one is stopped at its worker; the finished one is gone with its ttl.
    stops = requests.get(f"{served.url}/_worker/job-stop/w1?x=1", headers=WORKER, timeout=10)
    assert running in stops.json()["jobsToStop"]
    assert served.status(done).status_code == 404


def test_webhook_is_retried_twice_after_a_failed_call(served):
    calls: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(500 if len(calls) < 3 else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job_id = served.run({"input": {}, "webhook":
                             f"http://127.0.0.1:{server.server_port}/hook"}).json()["id"]
        served.take()
        served.done(job_id, {"output": 1})
        deadline = time.time() + 10
        while len(calls) < 3 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a fourth call would come 0.2 s after the third
        assert len(calls) == 3
        assert all(c["id"] == job_id and c["status"] == "COMPLETED" for c in calls)
    finally:
        server.shutdown()


def test_jobs_of_a_worker_that_exits_go_back_to_the_queue_once(served):
    first = served.run({"input": {"n": 1}}).json()["id"]
    second = served.run({"input": {"n": 2}}).json()["id"]
    assert len(served.take()) == 2
    served.endpoint.worker_exited(-9)
    assert [served.status(i).json()["status"] for i in (first, second)] == ["IN_QUEUE"] * 2
    assert [j["id"] for j in served.take()] == [first, second]  # first in line, in order
    served.endpoint.worker_exited(-9)
    for job_id in (first, second):
        status = served.status(job_id).json()
        assert status["status"] == "FAILED" and "exited" in status["error"]
    assert requests.get(f"{served.api}/health", timeout=10).json()["jobs"]["retried"] == 2


def test_a_job_take_whose_worker_hung_up_takes_nothing(served):
    """A killed worker's job-take long-poll outlives it on the endpoint; the jobs its death
    put back in the queue must go to the next worker, not to that dead connection."""
    with socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1]))) as conn:
        conn.sendall(f"GET /_worker/job-take/dead?x=1 HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {WORKER_KEY}\r\n\r\n".encode())
        time.sleep(0.3)  # the long-poll is waiting for a job
    time.sleep(0.3)  # the worker is gone
    job_id = served.run({"input": {}}).json()["id"]
    time.sleep(0.3)
    assert served.status(job_id).json()["status"] == "IN_QUEUE"
    assert [j["id"] for j in served.take("alive")] == [job_id]
