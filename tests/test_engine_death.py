"""A dead engine must not leave a worker that keeps taking jobs: the worker process exits
non-zero (so the platform replaces it) and its in-flight job ends FAILED."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import requests
from conftest import ROOT, worker_env
from test_local_endpoint import free_port

pytestmark = pytest.mark.slow


def test_worker_exits_when_its_engine_dies(tmp_path, demo_model_dir):
    port = free_port()
    log_path = tmp_path / "endpoint.log"
    env = worker_env()
    env.pop("MODEL_NAME", None)
    with open(log_path, "w") as log_file:
        endpoint = subprocess.Popen(
            [sys.executable, str(ROOT / "src" / "local_endpoint.py"), "--port", str(port)],
            env=env, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v2/local"
    try:
        body = {"input": {"prompt": "x", "stream": True,
                          "sampling_params": {"max_tokens": 1900, "ignore_eos": True}}}
        deadline = time.time() + 300
        while True:
            try:
                job = requests.post(f"{base}/run", json=body, timeout=5).json()
                break
            except requests.ConnectionError:
                assert time.time() < deadline and endpoint.poll() is None
                time.sleep(1)
        while requests.get(f"{base}/status/{job['id']}", timeout=5).json()["status"] != \
                "IN_PROGRESS":
            assert time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)

        (worker,) = psutil.Process(endpoint.pid).children()
        cores = [p for p in worker.children(recursive=True) if "EngineCore" in " ".join(
            [p.name(), *p.cmdline()])]
        assert cores, [(p.name(), p.cmdline()) for p in worker.children(recursive=True)]
        for core in cores:
            core.kill()

        assert worker.wait(timeout=60) != 0
        status = requests.get(f"{base}/status/{job['id']}", timeout=5).json()
        assert status["status"] == "FAILED"
        assert "engine died" in log_path.read_text()
    finally:
        endpoint.terminate()
        endpoint.wait(timeout=60)
