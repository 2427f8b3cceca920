"""Helpers the tests share (test modules do not import each other)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any


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


def run_handler(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`python src/handler.py ARGS` as a worker process with `env` in its real environment
    (local test mode: the platform's webhooks are unset)."""
    from conftest import ROOT, worker_env

    full_env = worker_env(**env)
    if "MODEL_NAME" not in env:
        full_env.pop("MODEL_NAME", None)
    return subprocess.run([sys.executable, str(ROOT / "src" / "handler.py"), *args],
                          env=full_env, capture_output=True, text=True, timeout=timeout)


PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")


def run_handler_online(env: dict[str, str], *args: str
                       ) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`python src/handler.py ARGS` with `env`, not offline, and every HTTP(S) call sent to a
    proxy that only counts connections: (the process, the connections it made)."""
    from conftest import ROOT

    env = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}
    with counting_proxy() as (proxy, connections):
        env.update(dict.fromkeys(PROXY_VARS, proxy), NO_PROXY="", no_proxy="")
        proc = subprocess.run([sys.executable, str(ROOT / "src" / "handler.py"), *args],
                              env=env, capture_output=True, text=True, timeout=600)
    return proc, connections


@contextlib.contextmanager
def job_handler(env: dict[str, str]) -> Iterator[Any]:
    """The core built from `env` and the queue front-end's job handler on it."""
    from worker_vllm.jobs.dispatch import JobHandler
    from worker_vllm.startup.build import build_core

    core = build_core(env)
    try:
        yield JobHandler(core.runner, core.settings, core.app, core.chat_template)
    finally:
        core.close()
