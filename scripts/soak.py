"""Soak: many mixed jobs through the local endpoint and a real worker, over several rounds.

    .venv/bin/python scripts/soak.py [--jobs 1000] [--concurrency 32] [--rounds 4]
                                     [--malformed 0.1] [--stream-post-delay-ms 0]

Each round sends --jobs jobs (native and OpenAI, streamed and not, --malformed of them invalid)
with --concurrency in flight, and checks every job: it reaches a final state (0 lost), its
output is its own (the OpenAI response id carries the job id; a native job's token counts match
its request), nothing arrives twice, a malformed job is FAILED naming its field. Prints per
round: jobs, failures of each kind, p50/p95 latency, and the worker's process-tree RSS; exits
non-zero when any check fails. `run_soak` is what the CI test calls with small sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
MODEL = "worker-vllm/tiny-demo-llama"
# Inputs that once reached the engine (and killed or wedged it); each must fail cleanly.
MALFORMED = [
    ({"n": True}, "n"), ({"seed": "str"}, "seed"), ({"seed": 1.5}, "seed"),
    ({"max_tokens": 1.5}, "max_tokens"), ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"skip_special_tokens": None}, "skip_special_tokens"), ({"seed": 2**64}, "seed"),
    ({"stop": 0}, "stop"), ({"allowed_token_ids": [1, "a"]}, "allowed_token_ids"),
    ({"structured_outputs": "string"}, "structured_outputs"),
]


@dataclass
class Outcome:
    kind: str
    ok: bool
    latency: float
    problem: str = ""


@dataclass
class Round:
    outcomes: list[Outcome] = field(default_factory=list)
    rss_mb: float = 0.0

    def problems(self) -> list[str]:
        return [f"{o.kind}: {o.problem}" for o in self.outcomes if not o.ok]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_endpoint(extra_args: list[str], log_path: Path) -> Iterator[tuple[str, int]]:
    """The local endpoint with one worker on the demo model; yields (base URL, endpoint pid)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_WEBHOOK")}
    env.update(HF_HUB_OFFLINE="1", MAX_CONCURRENCY=env.get("MAX_CONCURRENCY", "32"))
    env.pop("MODEL_NAME", None)
    rpc = tempfile.mkdtemp(prefix="worker-vllm-soak-rpc-")
    env.setdefault("VLLM_RPC_BASE_PATH", rpc)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "src" / "local_endpoint.py"), "--port", str(port),
             "--max-queue", "100000", *extra_args],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tempfile.mkdtemp())
    base = f"http://127.0.0.1:{port}/v2/soak"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(log_path.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(f"{base}/health", timeout=2).json()
                if health["workers"]["idle"] or health["workers"]["running"]:
                    break
            if time.time() > deadline:
                raise RuntimeError("the worker did not start in time")
            time.sleep(1)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def worker_rss_mb(endpoint_pid: int) -> float:
    """Resident memory of the worker process and its children (engine core), in MB."""
    total = 0
    for child in psutil.Process(endpoint_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total / 2**20


async def wait_final(client: httpx.AsyncClient, base: str, job_id: str,
                     timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = (await client.get(f"{base}/status/{job_id}")).json()
        if status["status"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
            return status
        await asyncio.sleep(0.2)
    return {"status": "LOST"}


async def native(client: httpx.AsyncClient, base: str, i: int, stream: bool,
                 tokenizer_len: Any) -> Outcome:
    kind = "native-stream" if stream else "native"
    max_tokens = 4 + i % 29
    prompt = f"job {i}: " + "x " * (i % 7)
    body = {"input": {"prompt": prompt, "stream": stream, "sampling_params": {
        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0, "seed": i}}}
    start = time.monotonic()
    job = (await client.post(f"{base}/run", json=body)).json()
    chunks: list[Any] = []
    if stream:
        while True:
            page = (await client.get(f"{base}/stream/{job['id']}")).json()
            chunks += [c["output"] for c in page["stream"]]
            if page["status"] not in ("IN_QUEUE", "IN_PROGRESS"):
                break
    status = await wait_final(client, base, job["id"])
    latency = time.monotonic() - start
    if status["status"] != "COMPLETED":
        return Outcome(kind, False, latency, f"job {job['id']} ended {status['status']}: "
                       f"{status.get('error')}")
    output = status["output"]
    if stream and output != chunks:
        return Outcome(kind, False, latency, "streamed chunks differ from the final output "
                       "(lost or duplicated)")
    tokens = sum(len(c["choices"][0]["tokens"]) for c in output) if stream else None
    usage = output[-1]["usage"]
    expected = {"input": tokenizer_len(prompt), "output": max_tokens}
    # vLLM merges the deltas of a consumer that fell behind: at most one delta per token.
    if usage != expected or (stream and not 0 < tokens <= max_tokens):
        return Outcome(kind, False, latency, f"output of another job? usage {usage}, "
                       f"expected {expected}, {tokens} deltas")
    return Outcome(kind, True, latency)


async def openai_chat(client: httpx.AsyncClient, base: str, i: int, stream: bool) -> Outcome:
    kind = "openai-stream" if stream else "openai"
    max_tokens = 4 + i % 29
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"job {i}"}],
            "max_tokens": max_tokens, "stream": stream, "ignore_eos": True,
            "stream_options": {"include_usage": True} if stream else None}
    start = time.monotonic()
    url = f"{base}/openai/v1/chat/completions"
    if not stream:
        r = await client.post(url, json=body)
        latency = time.monotonic() - start
        if r.status_code != 200:
            return Outcome(kind, False, latency, f"HTTP {r.status_code}: {r.text[:200]}")
        data = r.json()
        ids, usage = [data["id"]], data["usage"]["completion_tokens"]
    else:
        ids, usage, seen = [], None, 0
        async with client.stream("POST", url, json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    ids.append(chunk["id"])
                    seen += 1
                    if chunk.get("usage"):
                        usage = chunk["usage"]["completion_tokens"]
        latency = time.monotonic() - start
    if len(set(ids)) != 1:
        return Outcome(kind, False, latency, f"chunks of several responses: {set(ids)}")
    if usage != max_tokens:
        return Outcome(kind, False, latency, f"{usage} tokens, expected {max_tokens}")
    return Outcome(kind, True, latency)


async def malformed(client: httpx.AsyncClient, base: str, i: int) -> Outcome:
    params, name = MALFORMED[i % len(MALFORMED)]
    start = time.monotonic()
    r = (await client.post(f"{base}/runsync", json={"input": {
        "prompt": "x", "sampling_params": params}})).json()
    status = r if r["status"] in ("FAILED", "COMPLETED") else await wait_final(
        client, base, r["id"])
    latency = time.monotonic() - start
    if status["status"] != "FAILED":
        return Outcome("malformed", False, latency, f"{params} ended {status['status']}")
    error = json.loads(status["error"])
    if error.get("param") != f"sampling_params.{name}" or error["type"] == "internal_error":
        return Outcome("malformed", False, latency, f"{params}: {error}")
    return Outcome("malformed", True, latency)


async def one_round(base: str, jobs: int, concurrency: int, malformed_share: float,
                    tokenizer_len: Any, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(i: int) -> Outcome:
            async with semaphore:
                roll = rng.random()
                if roll < malformed_share:
                    return await malformed(client, base, i)
                pick = rng.randrange(4)
                try:
                    if pick < 2:
                        return await native(client, base, i, pick == 1, tokenizer_len)
                    return await openai_chat(client, base, i, pick == 3)
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    return Outcome("client", False, 0.0, repr(exc))

        return list(await asyncio.gather(*(one(seed * 100_000 + i) for i in range(jobs))))


def demo_tokenizer_len() -> Any:
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoTokenizer

    from worker_vllm.model.demo import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_demo_model()))
    return lambda text: len(tokenizer.encode(text))


def run_soak(jobs: int, concurrency: int, rounds: int, malformed_share: float = 0.1,
             endpoint_args: list[str] | None = None, log_path: Path | None = None,
             report: Any = print) -> list[Round]:
    log_path = log_path or Path(tempfile.mkdtemp()) / "endpoint.log"
    tokenizer_len = demo_tokenizer_len()
    results = []
    with local_endpoint(endpoint_args or [], log_path) as (base, pid):
        report(f"{'round':>5} {'jobs':>5} {'failed checks':>13} {'p50 s':>7} {'p95 s':>7} "
               f"{'worker RSS MB':>13}  kinds")
        for r in range(rounds):
            outcomes = asyncio.run(one_round(base, jobs, concurrency, malformed_share,
                                             tokenizer_len, r + 1))
            result = Round(outcomes, worker_rss_mb(pid))
            results.append(result)
            latencies = sorted(o.latency for o in outcomes)
            p95 = latencies[int(0.95 * (len(latencies) - 1))]
            kinds = Counter(o.kind for o in outcomes)
            report(f"{r + 1:>5} {len(outcomes):>5} {len(result.problems()):>13} "
                   f"{statistics.median(latencies):>7.2f} {p95:>7.2f} {result.rss_mb:>13.0f}  "
                   + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
            for problem in result.problems()[:10]:
                report(f"      {problem}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--malformed", type=float, default=0.1)
    parser.add_argument("--stream-post-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    extra = ["--stream-post-delay-ms", str(args.stream_post_delay_ms)]
    rounds = run_soak(args.jobs, args.concurrency, args.rounds, args.malformed, extra)
    problems = sum(len(r.problems()) for r in rounds)
    print(f"{sum(len(r.outcomes) for r in rounds)} jobs, {problems} failed checks")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
