"""Faults as the platform and users produce them, against real worker processes under the local
endpoint: SIGKILL and restart in the same directory, SIGTERM with jobs in flight, a hundred
mid-stream cancels and timeouts, clients that go away, non-standard JSON, planted secrets."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import time

import httpx
import psutil
import pytest
import requests
from processes import FINAL, Endpoint, wait_gone

pytestmark = pytest.mark.slow

HF_SECRET = "hf_plantedSecretToken0123456789"
API_KEY = "sk-planted-api-key-9876543210"
LONG = {"max_tokens": 1500, "ignore_eos": True}


def test_sigkilled_worker_is_restarted_and_takes_jobs_at_once(tmp_path):
    """The runpod SDK's job-state file of a SIGKILLed worker no longer blocks its successor."""
    ep = Endpoint(tmp_path, cwd=tmp_path)
    try:
        jobs = [ep.run({"prompt": "x", "stream": True, "sampling_params": LONG})
                for _ in range(8)]
        for job in jobs:
            ep.wait(job, ("IN_PROGRESS",))
        worker = ep.worker()
        tree = worker.children(recursive=True)
        worker.kill()
        for child in tree:  # SIGKILL leaves orphans by nature; not the subject here
            with contextlib.suppress(psutil.Error):
                child.kill()
        # The platform gives the jobs of a worker that died to the next worker, which the
        # endpoint starts in the same directory: it must take work at once.
        ep.wait_ready()
        assert [ep.wait(job, timeout=300)["status"] for job in jobs] == ["COMPLETED"] * 8
        assert ep.get("health")["jobs"]["retried"] == 8
        started = time.time()
        job = ep.run({"prompt": "x", "sampling_params": {"max_tokens": 4}})
        status = ep.wait(job, timeout=60)
        assert status["status"] == "COMPLETED", status
        assert time.time() - started < 30
    finally:
        ep.close()


def test_sigterm_lets_jobs_in_flight_finish_then_exits_0_leaving_no_process(tmp_path):
    ep = Endpoint(tmp_path, "--no-restart")
    try:
        jobs = [ep.run({"prompt": "x", "stream": True,
                        "sampling_params": {"max_tokens": 300, "ignore_eos": True}})
                for _ in range(4)]
        for job in jobs:
            ep.wait(job, ("IN_PROGRESS", "COMPLETED"))
        worker = ep.worker()
        tree = worker.children(recursive=True)
        assert tree  # the engine core and the SDK's heartbeat
        worker.send_signal(signal.SIGTERM)
        assert ep.worker_exit_code(timeout=180) == 0
        assert [ep.wait(job)["status"] for job in jobs] == ["COMPLETED"] * 4
        assert not wait_gone(tree, 10), "processes left behind after SIGTERM"
    finally:
        ep.close()


@pytest.fixture(scope="module")
def secret_endpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    ep = Endpoint(tmp, "--api-key", API_KEY, "--short-policies", HF_TOKEN=HF_SECRET,
                  MAX_CONCURRENCY="16")
    yield ep
    ep.close()


def test_a_hundred_mid_stream_cancels_and_timeouts_leave_no_request(secret_endpoint):
    ep = secret_endpoint
    rng = random.Random(7)
    jobs = []
    for i in range(100):
        if i % 2:
            jobs.append(ep.run({"prompt": "x", "stream": True, "sampling_params": LONG},
                               policy={"executionTimeout": rng.randint(300, 2500)}))
        else:
            jobs.append(ep.run({"prompt": "x", "stream": True, "sampling_params": LONG}))
    cancelled = 0
    for i, job in enumerate(jobs):
        if i % 2 == 0:
            ep.wait(job, ("IN_PROGRESS", *FINAL), timeout=300)
            time.sleep(rng.uniform(0, 0.3))
            cancelled += ep.post(f"cancel/{job}")["status"] == "CANCELLED"
    statuses = [ep.wait(job, timeout=300)["status"] for job in jobs]
    assert cancelled == 50
    assert set(statuses[0::2]) == {"CANCELLED"}
    assert set(statuses[1::2]) <= {"TIMED_OUT", "COMPLETED"}
    # The platform's final status can come before the worker has seen the stop: wait until
    # the engine has no request left (a request that was never aborted would keep it busy).
    deadline = time.time() + 60
    while ep.record(ep.run({"prompt": "x", "sampling_params": {"max_tokens": 2}})
                    )["engine_requests_running"] != 0:
        assert time.time() < deadline, "engine requests outlived their jobs"
    # One more, cancelled alone: the engine's own count after its abort.
    last = ep.run({"prompt": "x", "stream": True, "sampling_params": LONG})
    ep.wait(last, ("IN_PROGRESS",))
    time.sleep(0.3)
    ep.post(f"cancel/{last}")
    record = ep.record(last)
    assert record["outcome"] == "stopped"
    assert record["engine_requests_running"] == 0


def test_openai_client_that_disconnects_cancels_its_job(secret_endpoint):
    ep = secret_endpoint
    body = {"model": "worker-vllm/tiny-demo-llama", "stream": True, "ignore_eos": True,
            "max_tokens": 1500, "messages": [{"role": "user", "content": "x"}]}
    stopped_before = ep.log.read_text().count("job stopped")
    with httpx.stream("POST", f"{ep.base}/openai/v1/chat/completions", json=body,
                      headers=ep.headers, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event, then the client goes away
    deadline = time.time() + 30
    while ep.log.read_text().count("job stopped") == stopped_before:
        assert time.time() < deadline, "the job of a disconnected client kept running"
        time.sleep(0.3)
    assert ep.get("health")["jobs"]["inProgress"] == 0


@pytest.mark.parametrize("raw", [b'{"input": {"prompt": NaN}}',
                                 b'{"input": {"prompt": "x", "sampling_params": '
                                 b'{"temperature": Infinity}}}',
                                 b'{"input": {"prompt": "\\ud800"}}'])
def test_non_standard_json_is_refused_with_400(secret_endpoint, raw):
    ep = secret_endpoint
    for path in ("run", "runsync"):
        r = requests.post(f"{ep.base}/{path}", data=raw, headers=ep.headers, timeout=10)
        assert r.status_code == 400, r.text
    r = requests.post(f"{ep.base}/openai/v1/chat/completions", data=raw, headers=ep.headers,
                      timeout=10)
    assert r.status_code == 400


def test_planted_secrets_never_appear(secret_endpoint):
    """Runs last in this module: logs of everything above, plus outputs and errors."""
    ep = secret_endpoint
    ok = ep.post("runsync", {"input": {"prompt": "x", "sampling_params": {"max_tokens": 3}}})
    bad = ep.post("runsync", {"input": {"prompt": "x", "sampling_params": {"seed": "s"}}})
    models = requests.get(f"{ep.base}/openai/v1/models", headers=ep.headers, timeout=10).text
    texts = [ep.log.read_text(), json.dumps(ok), json.dumps(bad), models]
    for proc in [ep.worker(), *ep.worker().children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            texts.append(" ".join(proc.cmdline()))
    for text in texts:
        assert HF_SECRET not in text and API_KEY not in text


def test_jobs_cancelled_while_their_take_is_on_its_way_never_run(tmp_path):
    """Production mode (the platform's webhooks set): each job-take answer reaches the worker
    300 ms after its jobs were assigned; the jobs are cancelled in that window, so the stop
    channel tells the worker before the job arrives. None of them may reach the engine."""
    ep = Endpoint(tmp_path, "--take-delay-ms", "300", "--no-restart")
    try:
        jobs = []
        for _ in range(5):
            job = ep.run({"prompt": "x", "stream": True, "sampling_params": LONG})
            deadline = time.time() + 30
            while ep.get(f"status/{job}")["status"] != "IN_PROGRESS":
                assert time.time() < deadline
                time.sleep(0.01)
            assert ep.post(f"cancel/{job}")["status"] == "CANCELLED"
            jobs.append(job)
        served = ep.run({"prompt": "x", "sampling_params": {"max_tokens": 4}})
        assert ep.wait(served)["status"] == "COMPLETED"  # the worker kept serving
        log = ep.log.read_text()
        for job in jobs:
            assert f"Job {job} was stopped before it started: not run" in log
            assert f"[job {job}]" not in log  # the handler never saw it: no engine request
    finally:
        ep.close()
