"""Helpers the tests share (test modules do not import each other)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator


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
