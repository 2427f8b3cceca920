"""A dead or stuck engine must not leave a worker that keeps taking jobs: the worker process
exits non-zero (so the platform replaces it), its in-flight job ends FAILED, and nothing it
started keeps running."""

from __future__ import annotations

import contextlib
import signal
import time

import psutil
import pytest
from test_faults import Endpoint

pytestmark = pytest.mark.slow

LONG = {"max_tokens": 1900, "ignore_eos": True}


def engine_processes(worker: psutil.Process) -> list[psutil.Process]:
    return [p for p in worker.children(recursive=True)
            if "EngineCore" in " ".join([p.name(), *p.cmdline()])]


def test_worker_exits_within_10_s_when_its_engine_dies_leaving_no_process(tmp_path):
    ep = Endpoint(tmp_path, "--no-restart")
    try:
        job = ep.run({"prompt": "x", "stream": True, "sampling_params": LONG})
        ep.wait(job, ("IN_PROGRESS",))
        worker = ep.worker()
        tree = worker.children(recursive=True)
        cores = engine_processes(worker)
        assert cores, [(p.name(), p.cmdline()) for p in tree]
        killed = time.monotonic()
        for core in cores:
            core.kill()
        assert ep.worker_exit_code(timeout=60) != 0
        assert time.monotonic() - killed < 10
        assert ep.wait(job)["status"] == "FAILED"
        assert "engine died" in ep.log.read_text()
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        ep.close()


def test_an_engine_that_stops_answering_is_detected_by_the_health_probe(tmp_path):
    """SIGSTOP freezes the engine core without killing it: vLLM reports nothing, the probe's
    deadline does."""
    ep = Endpoint(tmp_path, "--no-restart", ENGINE_PROBE_INTERVAL_S="1",
                  ENGINE_PROBE_TIMEOUT_S="3")
    frozen: list[psutil.Process] = []
    try:
        worker = ep.worker()
        tree = worker.children(recursive=True)
        frozen = engine_processes(worker)
        assert frozen
        for core in frozen:
            core.send_signal(signal.SIGSTOP)
        assert ep.worker_exit_code(timeout=60) != 0
        assert "health probe got no answer" in ep.log.read_text()
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        for core in frozen:  # only if the worker failed to end them
            with contextlib.suppress(psutil.Error):
                core.kill()
        ep.close()
