"""The entry point's answers that need no engine."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, worker_env


def test_the_sdk_test_server_flag_stops_with_a_pointer_to_the_local_endpoint():
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "handler.py"), "--rp_serve_api"],
                          env=worker_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "src/local_endpoint.py" in proc.stderr and "--rp_serve_api" in proc.stderr
    assert "vLLM" not in proc.stderr  # it stopped before loading anything
