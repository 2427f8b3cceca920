"""The benchmark at tiny sizes, so it cannot rot (its figures are not asserted: timing on these
machines is noise; docs/performance.md has a full run)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, worker_env

pytestmark = pytest.mark.slow


def _smoke(*options: str) -> str:
    env = worker_env()
    env.pop("MODEL_NAME", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke",
                           *options], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_benchmark_smoke_runs_every_path():
    out = _smoke("--rtt-ms", "50")
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    paths = [row.split("|")[1].strip() for row in rows[1:]]
    expected = {"raw engine (in-process)", "vllm serve, HTTP SSE",
                "worker, load-balancing, HTTP SSE", "floor, native, events intake",
                "worker, native, events intake", "worker, openai, events intake"}
    assert expected <= set(paths), out
    # The queue worker: 2 routes x (c2 and c1), with the worker's own intake; the floor: 1.
    assert sum(p.startswith(("worker, native", "worker, openai")) for p in paths) == 4, out
    assert "Load-balancing worker cold start: first /ping 204 after" in out
    assert sum(p.startswith("floor") for p in paths) == 1, out


def test_benchmark_smoke_runs_the_jobs_per_worker_tables():
    out = _smoke("--admission")
    paths = {line.split("|")[3].strip() for line in out.splitlines()
             if line.startswith("| short") or line.startswith("| long")}
    assert paths == {"worker, engine decides", "vllm serve"}, out
    assert "| worker, native, MAX_CONCURRENCY unset | 2 |" in out, out
    assert any(line.startswith("| 32 | ") for line in out.splitlines()), out  # table C
    assert "| embeddings (MiniLM) | engine decides |" in out, out  # table D
    assert "| embeddings (MiniLM) | fixed 8 |" in out, out
    assert "E. The ramp" in out, out


def test_benchmark_smoke_runs_the_batch_table():
    out = _smoke("--batch")
    for path in ("one batch job of 16 lines", "one batch job of 16 lines, streamed",
                 "16 /run jobs at c32", "vllm run-batch (its batch step)"):
        assert f"| {path} |" in out, out


def test_the_ceiling_benchmarks_relay_row_measures_every_event() -> None:
    """`benchmarks/run.py --ceiling`'s relay row (no engine: fast), at its smoke size."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ceiling

    row = ceiling.relay_row(smoke=True)
    assert row["streams"] == 4 and row["events"] == 20
    assert len(row["runs"]) == 5 and all(r > 0 for r in row["runs"])


def test_the_post_row_measures_both_clients() -> None:
    """`benchmarks/run.py --posts` (no engine: fast), at its smoke size: every POST answered
    200 (the round raises otherwise), CPU measured for both clients."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ceiling

    row = ceiling.posts_row(smoke=True)
    assert row["posts"] == 200 and row["at_once"] == 8
    assert set(row["runs"]) == {"aiohttp", "Poster"}
    assert all(len(runs) == 3 and all(r > 0 for r in runs) for runs in row["runs"].values())


def test_the_ceilings_rows_are_paired_rounds_with_vllm_serve(capsys) -> None:
    """Each of the worker's rounds runs beside one of `vllm serve`'s, which goes first
    alternating; the row's ratios are the medians of the pairs' ratios (not a ratio of
    medians), and `vllm serve`'s row the medians of all its rounds."""
    import os

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ceiling
    import harness

    order: list[str] = []
    serve_front = iter([100.0, 50.0, 200.0])
    worker_front = iter([90.0, 60.0, 180.0])

    def row(who: str, front: float) -> dict:
        order.append(who)
        return {"path": who, "c": 2, "tps": 1000.0, "front_ms_per_1k": front,
                "cpu_per_1k": 0.0, "ttft_p50": 0.01, "ttft_p95": 0.02}

    class FakeServe(ceiling.Serve):
        def measure(self, kind: str, load: harness.Load) -> dict:
            measured = {**row("vllm serve (chat)", next(serve_front)), "kind": kind}
            self.rounds.append(measured)
            return measured

    serve = FakeServe("http://unused", os.getpid())
    paired = ceiling._paired(serve, "chat", harness.Load(2, 2, 2), lambda: row(
        "worker", next(worker_front)), os.getpid(), 3)
    assert order == ["vllm serve (chat)", "worker", "worker", "vllm serve (chat)",
                     "vllm serve (chat)", "worker"]
    assert paired["ratios"]["front_ms_per_1k"] == [0.9, 1.2, 0.9]
    assert paired["front_ms_per_1k"] == 90.0  # the median of the worker's rounds
    served = ceiling._serve_rows(serve.rounds)
    assert len(served) == 1 and served[0]["rounds"] == 3 and served[0]["front_ms_per_1k"] == 100
    ceiling.print_table(served + [paired])
    out = capsys.readouterr().out
    assert "| worker | 2 | 1000 | 1.00 (1.00-1.00) | 90 | 0.90 (0.90-1.20) |" in out, out
    assert "| vllm serve (chat), 3 round(s) | 2 | 1000 | 1.00 | 100 | 1.00 |" in out, out
