"""`python src/handler.py` in local test mode, as a user runs it (a real process)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, worker_env
from processes import run_handler

pytestmark = pytest.mark.slow


def test_invalid_n_exits_nonzero_and_names_n():
    proc = run_handler("--test_input",
                       '{"input": {"prompt": "hi", "sampling_params": {"n": 0}}}')
    assert proc.returncode != 0
    result = json.loads(proc.stdout)
    assert result["status"] == "FAILED"
    assert "n must be at least 1" in result["error"]["message"]


def test_missing_input_is_a_clear_error(tmp_path):
    proc = run_handler(cwd=tmp_path)
    assert proc.returncode != 0
    assert "test_input.json" in json.loads(proc.stdout)["error"]["message"]


def test_test_input_json_runs_a_real_job(tmp_path, demo_model_dir):
    shutil.copy(ROOT / "test_input.json", tmp_path / "test_input.json")
    proc = run_handler(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "COMPLETED"
    (output,) = result["output"]
    assert output["choices"][0]["tokens"][0]
    expected = json.loads((ROOT / "test_input.json").read_text())["input"]
    assert output["usage"]["output"] == expected["sampling_params"]["max_tokens"]
    assert "serving the built-in demo model" in proc.stderr


def test_a_normal_exit_leaves_no_process(tmp_path, demo_model_dir):
    import time

    import psutil

    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "src" / "handler.py"), "--test_input",
         '{"input": {"prompt": "hi", "sampling_params": {"max_tokens": 2}}}'],
        cwd=tmp_path, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    while proc.poll() is None:
        try:
            seen.update((c.pid, c) for c in parent.children(recursive=True))
        except psutil.Error:
            pass
        time.sleep(0.2)
    assert proc.returncode == 0 and json.loads(proc.stdout.read())["status"] == "COMPLETED"
    assert seen, "the engine core never showed: the test did not reach its subject"
    _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
