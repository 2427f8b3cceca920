"""What the worker adds, measured against vLLM itself, in one run on the demo model.

    .venv/bin/python scripts/benchmark.py [--tokens 256] [--jobs 8] [--repeat 3]
        [--full-path] [--path-jobs 64] [--path-tokens 128] [--rtt-ms 100] [--smoke]
    .venv/bin/python scripts/benchmark.py --admission [--repeat 3] [--loads short,mixed,long]
        [--no-first-message] [--smoke]
    .venv/bin/python scripts/benchmark.py --ceiling [--smoke]
    .venv/bin/python scripts/benchmark.py --batch [--batch-lines 512,2000] [--batch-tokens 64]
        [--repeat 3] [--rtt-ms 100] [--profile] [--smoke]

Table 1, in-process: wall time, output tokens/s, time to first output and yields per job for
  engine     vLLM's AsyncLLM.generate consumed on the engine's own loop (the baseline)
  bridge     the same stream relayed to another event loop (the worker's engine thread)
  native     a streamed native job through the handler (bridge + batching + output shaping)
  native-ns  the same job not streamed
  openai-direct  a streamed OpenAI chat job through vLLM's chat serving object called directly
             (how the worker answered OpenAI-route jobs before it called vLLM's app)
  openai-app     the same job through the handler and vLLM's app called in-process (ASGI)
each for one job and for --jobs concurrent jobs.

Table 2 (--full-path), the path users run: --path-jobs streamed jobs of --path-tokens tokens at
concurrency 16 and 32, native and OpenAI chat, through a platform stand-in (the local endpoint)
and a real worker process on the runpod SDK's job loop, with stream POSTs answered at once and
after --rtt-ms (the platform's round trip), plus --tokens-token jobs one at a time under the
round trip; each through the SDK's polling intake (as before) and the worker's event intake;
beside it the floor, the same SDK loop with a handler that yields a constant
(scripts/floor_worker.py); the raw engine (in-process) and `vllm serve` with an HTTP client
under the same load. Columns: tok/s and its ratio to the raw engine, to the floor with the
same intake and to `vllm serve`; submission to job-take and take to done p50; time to first
token p50/p95 (from submission, and from the worker's take), messages per job, token staleness
p95 (how long a message's oldest token waited for it), the longest wait of a stream's last
message, process-tree CPU seconds per 1,000 tokens and its ratio to `vllm serve`'s, and the
platform stand-in's CPU as a share of the worker's.

--admission: jobs per worker instead (scripts/bench_admission.py): the engine deciding against
fixed counts and `vllm serve` on a KV-limited engine, and the first stream message with
MAX_CONCURRENCY equal to the load and unset.

--batch: batch work instead (scripts/bench_batch.py): for each of --batch-lines, greedy chat
requests of --batch-tokens tokens as one batch job, streamed and not (--repeat runs each, the
median), as `/run` jobs at concurrency 32 (the first size, one run; all through the platform
stand-in, --rtt-ms per job-take and per stream POST) and through `vllm run-batch` on the same
file with the same engine settings (--repeat runs before the worker starts and --repeat after
it stopped, the median of all: the machine drifts between them; its start-up taken out: its
time on one line). --profile: py-spy on the worker's main process through one more
streamed batch job, its samples by place (line start, weighing, stream POSTs, vLLM's app, ...;
py-spy must be installed: pip install py-spy).

--ceiling: the one process that serves requests, at its limit (scripts/bench_ceiling.py): 256
streamed jobs x 128 tokens at c64 and c128 (MAX_NUM_SEQS 256, greedy, the stand-in answering
at once), each path alone: `vllm serve` (first and last, stopped while the worker's rows run;
ratios against the mean of the two), native and OpenAI chat jobs with a fixed
MAX_CONCURRENCY, OpenAI chat jobs with the engine deciding, the worker on a load-balancing
endpoint; tok/s, the front process's CPU per 1,000 tokens (the worker's main process; `vllm
serve`'s API server), the whole tree's, TTFT p50/p95. Then the relay from vLLM's app to route
jobs alone (no engine): the job loop's CPU per SSE event.

Compare ratios within one run only: these machines are noisy, absolute figures are not
comparable between runs. --smoke runs every path at tiny sizes, the queue worker with its own
intake only (for CI: no figures asserted).
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


async def timed(items: Any) -> tuple[float, int]:
    """Consume a stream: (seconds to its first item, number of items). A job's error fails."""
    start, first, n = time.perf_counter(), 0.0, 0
    async for item in items:
        assert not (isinstance(item, dict) and "error" in item), item
        if n == 0:
            first = time.perf_counter() - start
        n += 1
    return first, n


async def run_engine(worker: Any, params: Any, ids: list[int], rid: str) -> tuple[float, int]:
    """Baseline: iterate vLLM's generator on the engine loop; returns (ttft, yields)."""

    async def consume() -> tuple[float, int]:
        return await timed(worker.runner.engine.generate({"prompt_token_ids": ids}, params,
                                                         rid))

    return await worker.runner.loop.call(consume)


async def run_bridge(worker: Any, params: Any, ids: list[int], rid: str) -> tuple[float, int]:
    return await timed(worker.runner.generate({"prompt_token_ids": ids}, params, rid))


def _chat_request_type(worker: Any) -> Any:
    """vLLM's request type of /v1/chat/completions, as its app declares it."""
    route = next(r for r in worker.app.app.routes
                 if getattr(r, "path", "") == "/v1/chat/completions")
    return route.body_field.field_info.annotation


async def run_openai_direct(worker: Any, body: dict, rid: str) -> tuple[float, int]:
    """The OpenAI route as the worker called it before it called vLLM's app: vLLM's chat
    serving object directly, its SSE strings relayed from the engine loop."""
    from starlette.requests import Request

    request = _chat_request_type(worker).model_validate(body)
    raw = Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                   "headers": [(b"x-request-id", rid.encode())]})
    serving = worker.app.state.openai_serving_chat

    async def call() -> Any:
        return await serving.create_chat_completion(request, raw)

    generator = await worker.runner.loop.call(call)
    return await timed(worker.runner.loop.stream(lambda: generator))


def openai_runner(direct: bool):
    async def run(worker: Any, body: dict, rid: str) -> tuple[float, int]:
        if direct:
            return await run_openai_direct(worker, body, rid)
        return await timed(worker.handle({"id": rid, "input": {
            "openai_route": "/v1/chat/completions", "openai_input": body}}))

    return run


def job_runner(stream: bool):
    async def run(worker: Any, job_input: dict, rid: str) -> tuple[float, int]:
        return await timed(worker.handle({"id": rid, "input": {**job_input,
                                                               "stream": stream}}))

    return run


async def measure(name: str, worker: Any, args: argparse.Namespace, jobs: int) -> dict:
    from worker_vllm.jobs.native import tokenize_prompt
    from worker_vllm.jobs.shapes import NativeInput
    from worker_vllm.jobs.validate import build_sampling_params

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
        elif name.startswith("openai"):
            body = {"model": worker.runner.served_model_names[0], "stream": True,
                    "max_tokens": args.tokens, "ignore_eos": True, "seed": 1,
                    "messages": [{"role": "user", "content": "def benchmark():"}]}
            fn = openai_runner(direct=name == "openai-direct")
            results = await asyncio.gather(*(fn(worker, body, f"{name}-{rep}-{i}")
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


async def raw_engine_row(worker: Any, load: Any) -> dict:
    """vLLM's own generator on the engine loop under the full path's load."""
    import psutil
    from bench_full_path import pct, tree_cpu

    from worker_vllm.jobs.shapes import NativeInput
    from worker_vllm.jobs.validate import build_sampling_params

    semaphore = asyncio.Semaphore(load.concurrency)
    tokenizer = worker.runner.get_tokenizer()

    async def one(i: int) -> float:
        inp = NativeInput(prompt=f"def job_{i}():", stream=True, sampling_params={
            "max_tokens": load.tokens, "ignore_eos": True, "temperature": 1.0, "seed": i})
        params = build_sampling_params(inp)
        async with semaphore:
            first, _ = await run_engine(worker, params, tokenizer.encode(inp.prompt),
                                        f"raw-{load.concurrency}-{i}")
        return first

    cpu0 = tree_cpu(psutil.Process().pid)
    start = time.perf_counter()
    ttfts = await asyncio.gather(*(one(i) for i in range(load.jobs)))
    wall = time.perf_counter() - start
    tokens = load.jobs * load.tokens
    return {"path": "raw engine (in-process)", "rtt": "-", "c": load.concurrency,
            "tokens": load.tokens, "tps": tokens / wall, "take_p50": None,
            # At c1, the time one job's generation takes.
            "take_done_p50": wall / load.jobs if load.concurrency == 1 else None,
            "ttft_p50": pct(list(ttfts), 0.5),
            "ttft_p95": pct(list(ttfts), 0.95), "take_ttft_p50": None, "msgs": load.tokens,
            "stale_p95": None, "last_wait_max": None,
            "cpu_per_1k": (tree_cpu(psutil.Process().pid) - cpu0) / tokens * 1000,
            "endpoint_cpu_share": None}


def full_path_rows(args: argparse.Namespace, raw: list[dict]) -> list[dict]:
    """Each process behind the platform stand-in, at each simulated round trip: the floor (the
    SDK loop with a constant handler) and the worker, through the SDK's polling intake (as
    before) and the worker's event intake; then `vllm serve` under the same load."""
    import bench_full_path as fp

    run_dir = Path(tempfile.mkdtemp(prefix="worker-vllm-bench-"))
    rows = list(raw)
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
                                rows.append({**row, "rtt": f"{rtt * 1000:.0f} ms"})
                    finally:
                        platform.close()
    return rows + http_rows(args, run_dir)


def http_rows(args: argparse.Namespace, run_dir: Path) -> list[dict]:
    """`vllm serve` and the worker on a load-balancing endpoint, each over direct HTTP under
    the same loads, alternating per concurrency so that drift affects both alike."""
    import bench_full_path as fp

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


def print_full_path(rows: list[dict], args: argparse.Namespace) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--full-path", action="store_true")
    parser.add_argument("--path-jobs", type=int, default=64)
    parser.add_argument("--path-tokens", type=int, default=128)
    parser.add_argument("--rtt-ms", type=float, default=100.0)
    parser.add_argument("--lb", action="store_true",
                        help="of the full path, only `vllm serve` and the worker on a "
                             "load-balancing endpoint (direct HTTP)")
    parser.add_argument("--admission", action="store_true",
                        help="only the jobs-per-worker tables (scripts/bench_admission.py)")
    parser.add_argument("--loads", default="short,mixed,long,fast,ramp",
                        help="--admission: table A's loads (short, mixed, long), table D "
                             "(fast: jobs shorter than a round trip) and table E (ramp)")
    parser.add_argument("--no-first-message", action="store_true",
                        help="--admission: table A only")
    parser.add_argument("--batch", action="store_true",
                        help="only the batch-work table (scripts/bench_batch.py)")
    parser.add_argument("--ceiling", action="store_true",
                        help="only the one-process ceiling table (scripts/bench_ceiling.py)")
    parser.add_argument("--batch-lines", default="512,2000",
                        help="--batch: the batch sizes, comma-separated")
    parser.add_argument("--batch-tokens", type=int, default=64,
                        help="--batch: tokens per line")
    parser.add_argument("--profile", action="store_true",
                        help="--batch: where a streamed batch job's time goes (py-spy)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args()
    if args.ceiling:
        sys.path.insert(0, str(ROOT / "scripts"))
        import bench_ceiling

        run_dir = Path(tempfile.mkdtemp(prefix="worker-vllm-bench-"))
        bench_ceiling.print_table(bench_ceiling.rows(run_dir, args.smoke))
        bench_ceiling.print_relay(bench_ceiling.relay_row(args.smoke))
        return
    if args.batch:
        sys.path.insert(0, str(ROOT / "scripts"))
        import bench_batch

        rtt = args.rtt_ms / 1000
        run_dir = Path(tempfile.mkdtemp(prefix="worker-vllm-bench-"))
        sizes = tuple(int(n) for n in args.batch_lines.split(","))
        bench_batch.print_table(bench_batch.rows(run_dir, args.smoke, rtt, sizes,
                                                 args.batch_tokens, args.repeat,
                                                 args.profile), rtt)
        return
    if args.admission:
        sys.path.insert(0, str(ROOT / "scripts"))
        import bench_admission
        import bench_intake

        run_dir = Path(tempfile.mkdtemp(prefix="worker-vllm-bench-"))
        kinds = tuple(args.loads.split(","))
        kv = bench_admission.kv_limited_rows(run_dir, args.smoke, args.repeat, kinds) \
            if {"short", "mixed", "long"} & set(kinds) else []
        first = [] if args.no_first_message else bench_admission.first_message_rows(
            run_dir, args.smoke)
        bench_admission.print_tables(kv, first, bench_admission.intake_cost_rows(args.smoke))
        bench_intake.print_tables(
            bench_intake.fast_rows(run_dir, args.smoke, args.repeat)
            if "fast" in kinds else [],
            bench_intake.ramp_rows(run_dir, args.smoke) if "ramp" in kinds else [])
        return
    if args.smoke:
        args.tokens, args.jobs, args.repeat = 8, 2, 1
        args.full_path, args.path_jobs, args.path_tokens = True, 4, 8
    sys.path.insert(0, str(ROOT / "scripts"))

    run_dir = tempfile.mkdtemp(prefix="worker-vllm-bench-")
    os.environ.setdefault("VLLM_RPC_BASE_PATH", run_dir)
    from worker_vllm.logs import setup_logging

    setup_logging()
    from worker_vllm.jobs.dispatch import JobHandler
    from worker_vllm.startup.build import build_core

    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_WEBHOOK")}
    env.pop("MODEL_NAME", None)
    env["BAKED_ARGS_FILE"] = str(Path(run_dir) / "none.json")
    core = build_core(env)
    worker = JobHandler(core.runner, core.settings, core.app, core.chat_template)

    async def all_rows() -> list[dict]:
        rows = []
        for jobs in (1, args.jobs):
            for name in ("engine", "bridge", "native", "native-ns", "openai-direct",
                         "openai-app"):
                rows.append(await measure(name, worker, args, jobs))
        return rows

    rows = asyncio.run(all_rows())
    raw: list[dict] = []
    if args.full_path or args.lb:
        from bench_full_path import Load

        for c in ((2,) if args.smoke else (16, 32)):
            raw.append(asyncio.run(raw_engine_row(worker, Load(args.path_jobs,
                                                                args.path_tokens, c))))
        # One job at a time: its generation time is the floor of take->done at c1.
        raw.append(asyncio.run(raw_engine_row(worker, Load(2 if args.smoke else 8,
                                                           args.tokens, 1))))
    core.close()
    print(f"\n{args.tokens} output tokens per job, median of {args.repeat} runs "
          f"(demo model, CPU build)\n")
    print(f"{'path':<13} {'jobs':>4} {'wall s':>8} {'tok/s':>8} {'vs engine':>9} "
          f"{'TTFT ms':>8} {'yields/job':>10}")
    for row in rows:
        base = next(r for r in rows if r["name"] == "engine" and r["jobs"] == row["jobs"])
        print(f"{row['name']:<13} {row['jobs']:>4} {row['wall']:>8.2f} {row['tps']:>8.0f} "
              f"{row['tps'] / base['tps']:>9.2f} {row['ttft'] * 1000:>8.1f} "
              f"{row['yields']:>10.0f}")
    if args.lb:
        run_dir = Path(tempfile.mkdtemp(prefix="worker-vllm-bench-"))
        print_full_path(raw + http_rows(args, run_dir), args)
    elif args.full_path:
        print_full_path(full_path_rows(args, raw), args)


if __name__ == "__main__":
    main()
