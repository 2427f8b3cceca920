"""Load-balancing endpoints: worker processes in `lb` mode over real HTTP, with the `openai`
client, and the local endpoint playing RunPod's load-balancing gateway in front of one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest
from conftest import ROOT, worker_env
from processes import LBWorker, free_port, group_members, wait_gone

pytestmark = pytest.mark.slow

MODEL = "worker-vllm/tiny-demo-llama"
CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def lb(tmp_path_factory, demo_model_dir):
    # The platform checks the path a user set (vLLM's own /health would answer 404 while the
    # engine loads); /ping keeps answering.
    worker = LBWorker(tmp_path_factory.mktemp("lb"), HEALTH_CHECK_PATH="/health")
    worker.wait_ping(200)
    yield worker
    worker.close()


@pytest.fixture()
def client(lb) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lb.base}/v1", api_key="unused", max_retries=0)


def test_the_health_path_answers_204_while_starting_then_200_and_ping_too(lb):
    # lb.pings: HEALTH_CHECK_PATH=/health, polled from the process start. A poll that got no
    # answer in its 5 s (a busy machine) is left out: 204 before and after it is one phase.
    answered = [status for _, status in lb.pings if status is not None]
    phases = [status for i, status in enumerate(answered) if i == 0 or answered[i - 1] != status]
    assert phases == [204, 200], lb.pings
    assert lb.ping().json() == {"status": "healthy", "engine_requests": 0}
    health = httpx.get(f"{lb.base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "healthy"


def test_chat_and_completions_streamed_and_not(client):
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 8
    text = client.completions.create(model=MODEL, prompt="def f():", max_tokens=8)
    assert text.choices[0].text and text.usage.completion_tokens == 8
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=16, stream=True) if c.choices]
    assert len(deltas) > 1 and "".join(deltas)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="x", max_tokens=16, stream=True, extra_body={"ignore_eos": True})]
    assert len("".join(pieces)) > 0 and len(pieces) >= 2


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("method,path", [("POST", "/reset_prefix_cache"), ("GET", "/metrics"),
                                         ("POST", "/v1/load_lora_adapter"), ("GET", "/nope")])
def test_operator_and_unknown_routes_are_404(lb, method, path):
    response = httpx.request(method, f"{lb.base}{path}", timeout=10)
    assert response.status_code == 404
    assert "Unknown route" in response.json()["error"]["message"]


def test_a_client_that_disconnects_aborts_its_engine_request(lb):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{lb.base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)  # vLLM sends the role chunk before the request reaches the engine
        deadline = time.time() + 10
        while lb.ping().json()["engine_requests"] != 1:  # generating while we read
            assert time.time() < deadline, "the request never reached the engine"
            time.sleep(0.02)
    deadline = time.time() + 10
    while lb.ping().json()["engine_requests"] != 0:
        assert time.time() < deadline, "the engine request outlived its client"
        time.sleep(0.1)


def test_a_startup_failure_is_answered_with_its_cause(tmp_path):
    worker = LBWorker(tmp_path, MAX_MODEL_LEN="banana")
    try:
        ping = worker.wait_ping(200, timeout=120).json()
        assert ping["status"] == "startup_error"
        assert "MAX_MODEL_LEN" in ping["error"]["message"]
        client = openai.OpenAI(base_url=f"{worker.base}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=MODEL, messages=CHAT)
        assert err.value.status_code == 503
        assert "MAX_MODEL_LEN" in err.value.body["message"]
        assert err.value.body["type"] == "startup_error"
        assert worker.proc.poll() is None  # kept serving: no restart loop
    finally:
        worker.close()


def test_engine_death_turns_ping_unhealthy(tmp_path, demo_model_dir):
    worker = LBWorker(tmp_path)
    try:
        worker.wait_ping(200)
        (core,) = [p for p in worker.children() if "EngineCore" in " ".join(p.cmdline())]
        core.kill()
        ping = worker.wait_ping(503, timeout=30).json()
        assert ping["status"] == "unhealthy"
        response = httpx.post(f"{worker.base}/v1/completions", timeout=10,
                              json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "engine_unavailable"
    finally:
        worker.close()


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(tmp_path, demo_model_dir):
    worker = LBWorker(tmp_path)
    worker.wait_ping(200)
    client = openai.OpenAI(base_url=f"{worker.base}/v1", api_key="x", max_retries=0)
    tokens: list[int] = []
    started = threading.Semaphore(0)

    def one() -> None:
        stream = client.completions.create(model=MODEL, prompt="x", max_tokens=300,
                                           stream=True, extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True})
        for i, chunk in enumerate(stream):
            if i == 0:
                started.release()
            if chunk.usage is not None:
                tokens.append(chunk.usage.completion_tokens)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert started.acquire(timeout=60)
    tree = worker.children()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=120) == 0, worker.log.read_text()[-3000:]
    for thread in threads:
        thread.join(timeout=30)
    assert tokens == [300] * 4
    assert not wait_gone(tree, 10), "processes left behind after SIGTERM"


def test_the_local_gateway_holds_requests_until_the_worker_is_ready(tmp_path, demo_model_dir):
    port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, str(ROOT / "src" / "local_endpoint.py"),
                                 "--lb", "--port", str(port), "--api-key", "k"],
                                env=worker_env(HEALTH_CHECK_PATH="/health"), stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:  # the gateway listens long before its worker is ready
            try:
                denied = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except httpx.ConnectError:
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        assert denied.status_code == 401
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                               max_retries=0, timeout=300)
        # Sent while the worker starts: held until its /ping says 200, then answered.
        chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        assert chat.usage.completion_tokens == 4
        assert [m.id for m in client.models.list().data] == [MODEL]
        worker = psutil.Process(proc.pid).children()[0]
        tree = [worker, *worker.children(recursive=True)]
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    assert not wait_gone(tree, 10)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_leaves_no_process_once_the_worker_exits(
        tmp_path, demo_model_dir, signum):
    """Ctrl-C in a terminal signals the whole foreground group: vLLM's engine core and its
    worker get it directly and may be re-parented as their parents end."""
    worker = LBWorker(tmp_path, own_group=True)
    try:
        worker.wait_ping(200)
        assert len(group_members(worker.proc.pid)) >= 2  # the worker and vLLM's engine core
        os.killpg(worker.proc.pid, signum)
        assert worker.proc.wait(timeout=120) == 0
        left = [(p.pid, p.name()) for p in group_members(worker.proc.pid)]
        assert not left, (left, worker.log.read_text()[-2000:])
    finally:
        worker.close()
