"""What the worker adds per token, measured against vLLM itself, in one run on the demo model.

    .venv/bin/python scripts/benchmark.py [--tokens 256] [--jobs 8] [--repeat 3]

Prints a table: wall time, output tokens/s, time to first output and yields per job for
  engine     vLLM's AsyncLLM.generate consumed on the engine's own loop (the baseline)
  bridge     the same stream relayed to another event loop (the worker's engine thread)
  native     a streamed native job through the handler (bridge + batching + output shaping)
  native-ns  the same job not streamed
each for one job and for --jobs concurrent jobs. Compare ratios within one run only: these
machines are noisy, absolute figures are not comparable between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


async def run_engine(worker: Any, params: Any, ids: list[int], rid: str) -> tuple[float, int]:
    """Baseline: iterate vLLM's generator on the engine loop; returns (ttft, yields)."""

    async def consume() -> tuple[float, int]:
        start, first, n = time.perf_counter(), 0.0, 0
        async for _ in worker.runner.engine.generate({"prompt_token_ids": ids}, params, rid):
            if n == 0:
                first = time.perf_counter() - start
            n += 1
        return first, n

    return await worker.runner.call(consume)


async def run_bridge(worker: Any, params: Any, ids: list[int], rid: str) -> tuple[float, int]:
    start, first, n = time.perf_counter(), 0.0, 0
    async for _ in worker.runner.generate({"prompt_token_ids": ids}, params, rid):
        if n == 0:
            first = time.perf_counter() - start
        n += 1
    return first, n


def job_runner(stream: bool):
    async def run(worker: Any, job_input: dict, rid: str) -> tuple[float, int]:
        start, first, n = time.perf_counter(), 0.0, 0
        async for item in worker.handle({"id": rid, "input": {**job_input, "stream": stream}}):
            assert "error" not in item, item
            if n == 0:
                first = time.perf_counter() - start
            n += 1
        return first, n

    return run


async def measure(name: str, worker: Any, args: argparse.Namespace, jobs: int) -> dict:
    from worker_vllm.job_input import NativeInput
    from worker_vllm.native_route import build_sampling_params, tokenize_prompt

    sampling = {"max_tokens": args.tokens, "ignore_eos": True, "temperature": 1.0, "seed": 1}
    job_input = {"prompt": "def benchmark():", "sampling_params": sampling}
    inp = NativeInput(**job_input, stream=True)
    params = build_sampling_params(inp)
    ids = tokenize_prompt(worker.runner, inp, params.max_tokens)
    walls, ttfts, yields = [], [], []
    for rep in range(args.repeat):
        start = time.perf_counter()
        if name in ("engine", "bridge"):
            fn = run_engine if name == "engine" else run_bridge
            results = await asyncio.gather(*(fn(worker, params, ids, f"{name}-{rep}-{i}")
                                             for i in range(jobs)))
        else:
            fn = job_runner(stream=name == "native")
            results = await asyncio.gather(*(fn(worker, job_input, f"{name}-{rep}-{i}")
                                             for i in range(jobs)))
        walls.append(time.perf_counter() - start)
        ttfts += [r[0] for r in results]
        yields += [r[1] for r in results]
    wall = statistics.median(walls)
    return {"name": name, "jobs": jobs, "wall": wall, "tps": jobs * args.tokens / wall,
            "ttft": statistics.median(ttfts), "yields": statistics.median(yields)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    run_dir = tempfile.mkdtemp(prefix="worker-vllm-bench-")
    os.environ.setdefault("VLLM_RPC_BASE_PATH", run_dir)
    from worker_vllm.logs import setup_logging

    setup_logging()
    from worker_vllm.startup import build_worker

    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_WEBHOOK")}
    env.pop("MODEL_NAME", None)
    env["BAKED_ARGS_FILE"] = str(Path(run_dir) / "none.json")
    worker = build_worker(env)

    async def all_rows() -> list[dict]:
        rows = []
        for jobs in (1, args.jobs):
            for name in ("engine", "bridge", "native", "native-ns"):
                rows.append(await measure(name, worker, args, jobs))
        return rows

    rows = asyncio.run(all_rows())
    worker.close()
    print(f"\n{args.tokens} output tokens per job, median of {args.repeat} runs "
          f"(demo model, CPU build)\n")
    print(f"{'path':<10} {'jobs':>4} {'wall s':>8} {'tok/s':>8} {'vs engine':>9} "
          f"{'TTFT ms':>8} {'yields/job':>10}")
    for row in rows:
        base = next(r for r in rows if r["name"] == "engine" and r["jobs"] == row["jobs"])
        print(f"{row['name']:<10} {row['jobs']:>4} {row['wall']:>8.2f} {row['tps']:>8.0f} "
              f"{row['tps'] / base['tps']:>9.2f} {row['ttft'] * 1000:>8.1f} "
              f"{row['yields']:>10.0f}")


if __name__ == "__main__":
    main()
