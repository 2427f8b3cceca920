"""Table 1 of benchmarks/run.py, in-process: the worker's layers over vLLM's own generator,
one job and several at once, in this process (no platform, no HTTP)."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from harness import Load, pct, tree_cpu


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
    return await timed(worker.runner.loop.relayed(lambda: generator))


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


def rows(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Table 1's rows and, with --full-path or --lb, the raw engine's rows of table 2: one
    engine, built as the worker builds it, in this process."""
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
        table = []
        for jobs in (1, args.jobs):
            for name in ("engine", "bridge", "native", "native-ns", "openai-direct",
                         "openai-app"):
                table.append(await measure(name, worker, args, jobs))
        return table

    table = asyncio.run(all_rows())
    raw: list[dict] = []
    if args.full_path or args.lb:
        for c in ((2,) if args.smoke else (16, 32)):
            raw.append(asyncio.run(raw_engine_row(worker, Load(args.path_jobs,
                                                                args.path_tokens, c))))
        # One job at a time: its generation time is the floor of take->done at c1.
        raw.append(asyncio.run(raw_engine_row(worker, Load(2 if args.smoke else 8,
                                                           args.tokens, 1))))
    core.close()
    return table, raw


def print_table(table: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{args.tokens} output tokens per job, median of {args.repeat} runs "
          f"(demo model, CPU build)\n")
    print(f"{'path':<13} {'jobs':>4} {'wall s':>8} {'tok/s':>8} {'vs engine':>9} "
          f"{'TTFT ms':>8} {'yields/job':>10}")
    for row in table:
        base = next(r for r in table if r["name"] == "engine" and r["jobs"] == row["jobs"])
        print(f"{row['name']:<13} {row['jobs']:>4} {row['wall']:>8.2f} {row['tps']:>8.0f} "
              f"{row['tps'] / base['tps']:>9.2f} {row['ttft'] * 1000:>8.1f} "
              f"{row['yields']:>10.0f}")
