"""The worker process the local endpoint runs, and the platform's env it hands it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

from .state import Endpoint

log = logging.getLogger("local_platform")
HANDLER = Path(__file__).resolve().parents[1] / "handler.py"


def platform_env(base_url: str, worker_key: str, base: dict[str, str] | None = None
               ) -> dict[str, str]:
    """The platform's env for a worker that talks to this endpoint."""
    env = dict(os.environ if base is None else base)
    env.update(
        RUNPOD_WEBHOOK_GET_JOB=f"{base_url}/_worker/job-take/$ID?local=1",
        RUNPOD_WEBHOOK_POST_OUTPUT=f"{base_url}/_worker/job-done/$RUNPOD_POD_ID/$ID?local=1",
        RUNPOD_WEBHOOK_POST_STREAM=f"{base_url}/_worker/job-stream/$RUNPOD_POD_ID/$ID?local=1",
        RUNPOD_WEBHOOK_PING=f"{base_url}/_worker/ping/$RUNPOD_POD_ID",
        RUNPOD_AI_API_KEY=worker_key,
        RUNPOD_POD_ID=env.get("RUNPOD_POD_ID", "local-worker"),
        # The production start-up checks need internet and a GPU: off for local runs.
        RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true",
        RUNPOD_SKIP_GPU_CHECK="true",
    )
    env.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    return env


def queue_worker_exited(endpoint: Endpoint) -> Callable[[int | None], None]:
    """A queue worker's exit: no worker until the next one calls in; its jobs go back."""

    def on_exit(code: int | None) -> None:
        endpoint.last_seen = 0.0
        endpoint.worker_exited(code)

    return on_exit


async def housekeeping(endpoint: Endpoint) -> None:
    while True:
        await asyncio.sleep(1)
        endpoint.expire()


class WorkerProcess:
    """The worker process, restarted when it exits (as the platform replaces workers)."""

    def __init__(self, env: dict[str, str], on_exit: Callable[[int | None], None],
                 restart: bool) -> None:
        # on_exit(code): what the platform does with the exited worker's work.
        self.env, self.on_exit, self.restart = env, on_exit, restart
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.starts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HANDLER)], env=self.env)
        self.starts += 1
        log.info("Worker pid %s is starting", self.proc.pid)

    async def supervise(self) -> None:
        while not self.stopping:
            assert self.proc is not None
            tree: list[psutil.Process] = []
            while self.proc.poll() is None:
                tree = self._descendants() or tree
                await asyncio.sleep(0.5)
            if self.stopping:
                return
            code = self.proc.returncode
            log.error("The worker process exited with code %s", code)
            _end(tree)  # what a killed worker left running (its engine, its heartbeat)
            self.on_exit(code)
            if not self.restart:
                return
            await asyncio.sleep(min(30, 2 ** min(self.starts, 5)))  # back off on repeated exits
            if not self.stopping:
                self.start()

    def _descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)  # type: ignore[union-attr]
        except psutil.Error:
            return []

    def end(self) -> None:
        """End the worker (SIGTERM); `supervise` starts the next one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _end(processes: list[psutil.Process], timeout: float = 5.0) -> None:
    alive = [p for p in processes if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, left = psutil.wait_procs(alive, timeout=timeout)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if alive:
        log.warning("Ended %d process(es) the exited worker left running", len(alive))
