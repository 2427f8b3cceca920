"""The one-process ceiling, for scripts/benchmark.py --ceiling: streamed chat (and native)
jobs at high concurrency on the demo model, each path alone, with the CPU time of the process
that serves requests ("front": the worker's main process; `vllm serve`'s API server) per
1,000 tokens beside its tokens/s. `vllm serve` runs first with the same engine settings and is
stopped before the worker's rows; the platform stand-in answers at once; greedy sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bench_full_path as fp

ENGINE = {"MAX_NUM_SEQS": "256"}


def _worker_rows(run_dir: Path, name: str, routes: tuple[str, ...], loads: list[fp.Load],
                 concurrency: int | None, **env: str) -> list[dict[str, Any]]:
    """The queue worker behind the platform stand-in: each route at each load."""
    platform = fp.Platform(0.0, run_dir / f"ceiling-{len(name)}-{routes[0]}.log",
                           concurrency=concurrency, **ENGINE, **env)
    rows = []
    try:
        for route in routes:
            fp.warm_up(loads[0].concurrency, platform=platform, route=route)
            for load in loads:
                label = f"{name}, {'OpenAI chat' if route == 'openai' else 'native'} jobs"
                rows.append(fp.measure_platform(platform, load, route, label))
    finally:
        platform.close()
    return rows


def rows(run_dir: Path, smoke: bool, jobs: int = 256, tokens: int = 128,
         concurrencies: tuple[int, ...] = (64, 128)) -> list[dict[str, Any]]:
    if smoke:
        jobs, tokens, concurrencies = 8, 8, (2,)
    loads = [fp.Load(jobs, tokens, c, greedy=True) for c in concurrencies]
    out = []
    with fp.vllm_serve(run_dir / "ceiling-vllm-serve.log", max_num_seqs=256) as (url, pid):
        fp.warm_up(concurrencies[0], url=url, route="openai")
        out += [fp.measure_vllm_serve(url, pid, load, "vllm serve (chat)") for load in loads]
    top = max(concurrencies)
    out += _worker_rows(run_dir, f"worker, MAX_CONCURRENCY={top} fixed", ("native", "openai"),
                        loads, top, JOB_ADMISSION="fixed")
    out += _worker_rows(run_dir, "worker, engine decides", ("openai",), loads, None)
    with fp.lb_worker(run_dir / "ceiling-lb.log", **ENGINE) as (lb_url, lb_pid, _):
        fp.warm_up(concurrencies[0], url=lb_url, route="openai")
        out += [fp.measure_vllm_serve(lb_url, lb_pid, load, "worker, load-balancing (chat)")
                for load in loads]
    return out


def print_table(table: list[dict[str, Any]]) -> None:
    print("\nThe one-process ceiling: streamed jobs x tokens on the demo model, MAX_NUM_SEQS "
          "256, greedy; front = the process serving requests (CPU ms per 1,000 tokens)")
    print("| path | c | tok/s | x vllm serve | front CPU ms/1k | x vllm serve | "
          "whole-tree CPU ms/1k | TTFT p50/p95 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in table:
        serve = next(r for r in table if r["path"].startswith("vllm serve")
                     and r["c"] == row["c"])
        front = row["front_ms_per_1k"]
        print(f"| {row['path']} | {row['c']} | {row['tps']:.0f} | "
              f"{row['tps'] / serve['tps']:.2f} | {front:.0f} | "
              f"{front / serve['front_ms_per_1k']:.2f} | {row['cpu_per_1k'] * 1000:.0f} | "
              f"{row['ttft_p50'] * 1000:.0f}/{row['ttft_p95'] * 1000:.0f} |")
