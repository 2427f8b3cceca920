"""The benchmark at tiny sizes, so it cannot rot (its figures are not asserted: timing on these
machines is noise; docs/performance.md has a full run)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, worker_env

pytestmark = pytest.mark.slow


def test_benchmark_smoke_runs_every_path():
    env = worker_env()
    env.pop("MODEL_NAME", None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--smoke",
                           "--rtt-ms", "50"], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    paths = [row.split("|")[1].strip() for row in rows[1:]]
    expected = {"raw engine (in-process)", "vllm serve, HTTP SSE",
                "worker, load-balancing, HTTP SSE", "floor, native, events intake",
                "worker, native, events intake", "worker, openai, events intake"}
    assert expected <= set(paths), proc.stdout
    # The queue worker: 2 routes x (c2 and c1), with the worker's own intake; the floor: 1.
    assert sum(p.startswith(("worker, native", "worker, openai")) for p in paths) == 4, \
        proc.stdout
    assert "Load-balancing worker cold start: first /ping 204 after" in proc.stdout
    assert sum(p.startswith("floor") for p in paths) == 1, proc.stdout
