"""Table 2 of benchmarks/run.py (--full-path, --lb): the path users run, behind the platform
stand-in at each simulated round trip, beside the floor, the raw engine and `vllm serve`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import harness as fp


def rows(args: argparse.Namespace, raw: list[dict]) -> list[dict]:
    """Each process behind the platform stand-in, at each simulated round trip: the floor (the
    SDK loop with a constant handler) and the worker, through the SDK's polling intake (as
    before) and the worker's event intake; then `vllm serve` under the same load."""
    run_dir = Path(tempfile.mkdtemp(prefix="worker-vllm-bench-"))
    out = list(raw)
    concurrencies = (2,) if args.smoke else (16, 32)
    single = fp.Load(2 if args.smoke else 8, args.tokens, 1)
    processes = (("floor", fp.FLOOR, ("native",)), ("worker", fp.HANDLER, ("native", "openai")))
    # --smoke: only under the round trip (each worker start costs tens of seconds).
    for rtt in ((args.rtt_ms / 1000,) if args.smoke else (0.0, args.rtt_ms / 1000)):
        for name, script, routes in processes:
            # --smoke: the worker's own intake only (the SDK's is the same code, another env).
            for intake in (("events",) if args.smoke else ("sdk", "events")):
                for c in concurrencies:
                    # MAX_CONCURRENCY = the load's concurrency: the worker is full whenever
                    # the load is, as on RunPod when jobs wait in the queue.
                    log = run_dir / f"{name}-{intake}-c{c}-rtt{int(rtt * 1000)}.log"
                    platform = fp.Platform(rtt, log, script, intake, concurrency=c)
                    loads = [fp.Load(args.path_jobs, args.path_tokens, c)]
                    if rtt and name == "worker" and c == concurrencies[0]:
                        loads.append(single)
                    try:
                        for route in routes:
                            for load in loads:
                                row = fp.measure_platform(platform, load, route,
                                                          f"{name}, {route}, {intake} intake")
                                out.append({**row, "rtt": f"{rtt * 1000:.0f} ms"})
                    finally:
                        platform.close()
    return out + http_rows(args, run_dir)


def http_rows(args: argparse.Namespace, run_dir: Path) -> list[dict]:
    """`vllm serve` and the worker on a load-balancing endpoint, each over direct HTTP under
    the same loads, alternating per concurrency so that drift affects both alike."""
    rows: list[dict] = []
    concurrencies = (2,) if args.smoke else (16, 32)
    with fp.vllm_serve(run_dir / "vllm-serve.log") as (url, pid), \
            fp.lb_worker(run_dir / "lb-worker.log") as (lb_url, lb_pid, cold):
        for c in concurrencies:
            load = fp.Load(args.path_jobs, args.path_tokens, c)
            rows.append({**fp.measure_vllm_serve(url, pid, load), "rtt": "-"})
            rows.append({**fp.measure_vllm_serve(lb_url, lb_pid, load,
                                                 "worker, load-balancing, HTTP SSE"),
                         "rtt": "-"})
    print(f"\nLoad-balancing worker cold start: first /ping 204 after {cold['204']:.2f} s, "
          f"first 200 after {cold['200']:.2f} s (from the process start)")
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    def ms(v: Any) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    print(f"\nThe full path: {args.path_jobs} streamed jobs x {args.path_tokens} tokens at c16 "
          f"and c32, {args.tokens} tokens at c1 (demo model, CPU build)\n")
    print("| path | RTT | c | tok/s | x raw engine | x floor (same intake) | x vllm serve | "
          "submit->take p50 ms | take->done p50 ms | TTFT p50/p95 ms | from take p50 ms | "
          "msgs/job | staleness p95 ms | last msg wait max ms | CPU s/1k tok | "
          "CPU x vllm serve | endpoint CPU / worker |")
    print("|" + "---|" * 17)
    for row in rows:
        def same(prefix: str, r: dict = row) -> dict | None:
            return next((o for o in rows if o["path"].startswith(prefix) and o["c"] == r["c"]
                         and o.get("tokens") == r.get("tokens")
                         and o.get("rtt") in (r.get("rtt"), "-")), None)

        raw = same("raw")
        serve = same("vllm serve")
        intake = row["path"].rsplit(", ", 1)[-1] if row["path"].endswith("intake") else None
        floor = same(f"floor, native, {intake}") if intake else None
        share = row["endpoint_cpu_share"]

        def ratio(base: dict | None, key: str = "tps", r: dict = row) -> str:
            return f"{r[key] / base[key]:.2f}" if base and base.get(key) else "-"

        print(f"| {row['path']} | {row['rtt']} | {row['c']} | {row['tps']:.0f} | {ratio(raw)} | "
              f"{ratio(floor)} | {ratio(serve)} | {ms(row.get('take_p50'))} | "
              f"{ms(row.get('take_done_p50'))} | {ms(row['ttft_p50'])}/{ms(row['ttft_p95'])} | "
              f"{ms(row['take_ttft_p50'])} | {row['msgs']:.0f} | {ms(row['stale_p95'])} | "
              f"{ms(row['last_wait_max'])} | {row['cpu_per_1k']:.2f} | "
              f"{ratio(serve, 'cpu_per_1k')} | "
              + ("-" if share is None else f"{share:.0%}") + " |")


