"""A worker whose start-up fails stays up and fails every job with the cause (no restart
loop), or exits 1 with ON_STARTUP_ERROR=exit; either way it leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import time

import psutil
import pytest
from test_faults import Endpoint

pytestmark = pytest.mark.slow


def test_invalid_setting_fails_every_job_and_the_worker_stays_up(tmp_path):
    ep = Endpoint(tmp_path, "--no-restart", MAX_MODEL_LEN="banana")
    try:
        worker = ep.worker()
        errors = []
        for _ in range(2):
            status = ep.post("runsync", {"input": {"prompt": "x"}})
            assert status["status"] == "FAILED", status
            errors.append(json.loads(status["error"]))
        for error in errors:
            assert error["type"] == "startup_error"
            assert "MAX_MODEL_LEN" in error["message"] and "banana" in error["message"]
            assert "Traceback" not in error["message"]
        assert worker.is_running() and ep.worker().pid == worker.pid  # no restart
        assert ep.log.read_text().count("Start-up failed") == 1  # logged once
    finally:
        ep.close()


def test_exit_setting_exits_1_and_leaves_no_process(tmp_path):
    # A KV cache too small for one sequence: the engine core process starts, then fails.
    ep = Endpoint(tmp_path, "--no-restart", ready=False, ON_STARTUP_ERROR="exit",
                  KV_CACHE_MEMORY_BYTES="1")
    try:
        worker = ep.worker()
        seen: dict[int, psutil.Process] = {}
        deadline = time.time() + 300
        while worker.is_running() and time.time() < deadline:
            with contextlib.suppress(psutil.Error):
                seen.update((c.pid, c) for c in worker.children(recursive=True))
            time.sleep(0.2)
        assert ep.worker_exit_code(timeout=30) == 1
        assert seen, "the engine core never started: the test did not reach its subject"
        _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
        assert "Start-up failed" in ep.log.read_text()
    finally:
        ep.close()
