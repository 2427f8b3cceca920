"""What every benchmark of benchmarks/run.py shares: a platform stand-in (the local endpoint, in
this process) with a real worker process on its real runpod SDK job loop, `vllm serve` and the
worker on a load-balancing endpoint started and stopped, the loads, and a process's CPU. Each
measurement returns one row of a table."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import local_platform as le  # noqa: E402
from worker_vllm.model.demo import DEMO_MODEL_ID, ENGINE_DEFAULTS, ensure_demo_model  # noqa: E402

STALENESS = re.compile(r"staleness_p95=(\d+)ms")
LAST_WAIT = re.compile(r"last_wait=(\d+)ms")


@dataclass
class Load:
    jobs: int
    tokens: int
    concurrency: int
    # Every job's prompt, `{i}` standing for the job's number (default: a short one).
    prompt: str | None = None
    # Seeded sampling (reproducible text). vLLM's CPU build can kill its engine core on seeded
    # requests in a chunked prefill (long prompts under preemption): such loads go unseeded.
    seeded: bool = True
    # Jobs of different lengths: job i generates `tokens` +- up to `spread` tokens (a fixed
    # pattern, the same in every run).
    spread: int = 0
    # Greedy sampling (temperature 0, no seed): vLLM's CPU build kills its engine under seeded
    # sampling at c128 ("CPU Generator does not use offset").
    greedy: bool = False

    def max_tokens(self, i: int) -> int:
        return self.tokens + self.spread * ((i * 7919) % 201 - 100) // 100

    def total(self) -> int:
        return sum(self.max_tokens(i) for i in range(self.jobs))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))] if values else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    """Until something listens on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants."""
    total = 0.0
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one process, without its children."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def cpu_split(pid: int) -> tuple[float, float, float]:
    """CPU seconds so far of a server's own process (the worker's job loop, vllm serve's API
    server), of its children (vLLM's engine core) and of this process (the load's client,
    and the platform stand-in when there is one)."""
    front = process_cpu(pid)
    return front, tree_cpu(pid) - front, process_cpu(os.getpid())


def cpu_per_1k(before: tuple[float, float, float], tokens: int, pid: int) -> dict[str, float]:
    """CPU ms per 1,000 tokens since `before` (``cpu_split``), by process."""
    after = cpu_split(pid)
    return {f"{name}_ms_per_1k": (b - a) / tokens * 1e6 for name, a, b
            in zip(("front", "engine", "client"), before, after, strict=True)}


def thread_cpu(native_id: int) -> float:
    for t in psutil.Process().threads():
        if t.id == native_id:
            return t.user_time + t.system_time
    return 0.0


FLOOR = ROOT / "benchmarks" / "floor_worker.py"
HANDLER = ROOT / "src" / "handler.py"


class Platform:
    """The local endpoint's app on a thread of this process, with one worker process: the
    worker (`src/handler.py`) or the floor (`benchmarks/floor_worker.py`), taking jobs through
    `intake` ("events": the worker's own; "sdk": the runpod SDK's polling loop)."""

    def __init__(self, stream_post_delay: float, log_path: Path, script: Path = HANDLER,
                 intake: str = "events", concurrency: int | None = 64,
                 **extra_env: str) -> None:
        """`concurrency`: MAX_CONCURRENCY (None: unset, the engine decides); `extra_env`:
        more of the worker's settings."""
        self.port = free_port()
        self.endpoint = le.Endpoint(100_000, stream_post_delay)
        self.log_path = log_path
        base = f"http://127.0.0.1:{self.port}"
        env = le.platform_env(base, "bench-worker-key")
        env.pop("MODEL_NAME", None)
        env.update({k: v for k, v in _demo_env().items() if k not in env})
        env.update(RUNPOD_LOG_LEVEL="INFO", JOB_INTAKE=intake, **extra_env)
        env.pop("MAX_CONCURRENCY", None)
        if concurrency is not None:
            env["MAX_CONCURRENCY"] = str(concurrency)
        self.env = env
        app = le.create_app(self.endpoint, None, "bench-worker-key")
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.base = f"{base}/v2/bench"
        with open(log_path, "w") as log_file:
            self.worker = subprocess.Popen([sys.executable, str(script)], env=env,
                                           stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.monotonic() - self.endpoint.last_seen > 5:
            if self.worker.poll() is not None or time.time() > deadline:
                raise RuntimeError(log_path.read_text()[-3000:])
            time.sleep(0.5)

    def _serve(self) -> None:
        self.native_id = threading.get_native_id()
        asyncio.run(self.server.serve())

    def close(self) -> None:
        self.worker.terminate()
        self.worker.wait(timeout=120)
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _demo_env() -> dict[str, str]:
    env = {"MODEL_NAME": str(ensure_demo_model()), "SERVED_MODEL_NAME": DEMO_MODEL_ID}
    env.update({k.upper(): json.dumps(v) for k, v in ENGINE_DEFAULTS.items()})
    return env


def _prompt(load: Load, i: int) -> str:
    return load.prompt.format(i=i) if load.prompt else f"def job_{i}():"


def _seed(load: Load, i: int) -> dict[str, Any]:
    """The sampling of job i: seeded (reproducible), unseeded, or greedy."""
    if load.greedy:
        return {"temperature": 0.0}
    return {"temperature": 1.0, **({"seed": i} if load.seeded else {})}


def _native_body(load: Load, i: int) -> dict[str, Any]:
    return {"input": {"prompt": _prompt(load, i), "stream": True,
                      "sampling_params": {"max_tokens": load.max_tokens(i), "ignore_eos": True,
                                          **_seed(load, i)}}}


def _completion_body(load: Load, i: int, stream: bool = True) -> dict[str, Any]:
    """The native job's request as `vllm serve`'s /v1/completions takes it."""
    return {"model": DEMO_MODEL_ID, "prompt": _prompt(load, i),
            "max_tokens": load.max_tokens(i), "ignore_eos": True, "stream": stream,
            **_seed(load, i)}


def _chat_body(load: Load, i: int, stream: bool = True) -> dict[str, Any]:
    return {"model": DEMO_MODEL_ID, "messages": [{"role": "user", "content": f"job {i}"}],
            "max_tokens": load.max_tokens(i), "ignore_eos": True, "stream": stream,
            **_seed(load, i)}


# OpenAI requests by kind: "chat", "completions", and each not streamed ("-ns"). A platform
# route is "native" or "openai" (streamed chat) or "openai-<kind>".
OPENAI_KINDS = ("chat", "chat-ns", "completions", "completions-ns")


def openai_kind(route: str) -> str:
    return "chat" if route == "openai" else route.removeprefix("openai-")


def openai_request(kind: str, load: Load, i: int) -> tuple[str, dict[str, Any]]:
    """(path below /v1, body) of request i of `kind`."""
    api, _, ns = kind.partition("-")
    body = _chat_body if api == "chat" else _completion_body
    return ("chat/completions" if api == "chat" else "completions"), body(load, i, not ns)


async def _openai_call(client: httpx.AsyncClient, url: str, body: dict[str, Any]
                       ) -> tuple[float, int]:
    """One OpenAI request read to its end: (seconds to its first SSE event, or to the answer
    when not streamed; the SSE events received, 1 when not streamed)."""
    start = time.monotonic()
    if not body["stream"]:
        r = await client.post(url, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.text[:500]}")
        return time.monotonic() - start, 1
    first, n = None, 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                n += 1
                first = time.monotonic() - start if first is None else first
    return first or 0.0, n


async def until_final(platform: Platform, job_id: str) -> le.Job:
    """The job once it is final, as the platform's side of it (this process) says."""
    while (job := platform.endpoint.jobs[job_id]).status not in le.FINAL:
        if platform.worker.poll() is not None:
            raise RuntimeError("the worker exited: " + platform.log_path.read_text()[-3000:])
        await asyncio.sleep(0.02)
    return job


async def _drive_platform(platform: Platform, load: Load, route: str) -> list[le.Job]:
    semaphore = asyncio.Semaphore(load.concurrency)
    limits = httpx.Limits(max_connections=load.concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(i: int) -> None:
            async with semaphore:
                if route.startswith("openai"):  # the client reads the answer to its end
                    path, body = openai_request(openai_kind(route), load, i)
                    await _openai_call(client, f"{platform.base}/openai/v1/{path}", body)
                    return
                job_id = (await client.post(f"{platform.base}/run",
                                            json=_native_body(load, i))).json()["id"]
                await until_final(platform, job_id)

        before = set(platform.endpoint.jobs)
        await asyncio.gather(*(one(i) for i in range(load.jobs)))
    return [j for k, j in platform.endpoint.jobs.items() if k not in before]


def again_on_a_dropped_connection(measure: Callable[[], dict[str, Any]],
                                  settle: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """`measure()`, run once more (after `settle()`) when a server dropped one of its HTTP
    connections (httpx.ReadError while reading an answer's headers: seen now and then at
    c64-c128 on long runs, from the platform stand-in and from vLLM's own server alike; the
    cause is not found). Said on stderr; a second drop ends the run."""
    try:
        return measure()
    except httpx.TransportError as exc:
        print(f"A connection was dropped ({type(exc).__name__}); the round runs again",
              file=sys.stderr, flush=True)
        settle()
        return measure()


def measure_platform(platform: Platform, load: Load, route: str, label: str) -> dict[str, Any]:
    return again_on_a_dropped_connection(
        lambda: _measure_platform(platform, load, route, label),
        lambda: asyncio.run(_all_final(platform)))


async def _all_final(platform: Platform) -> None:
    for job_id in list(platform.endpoint.jobs):
        await until_final(platform, job_id)


def _measure_platform(platform: Platform, load: Load, route: str, label: str) -> dict[str, Any]:
    log_mark = platform.log_path.stat().st_size
    cpu0 = tree_cpu(platform.worker.pid)
    split0 = cpu_split(platform.worker.pid)
    ep0 = thread_cpu(platform.native_id)
    started = time.monotonic()
    jobs = asyncio.run(_drive_platform(platform, load, route))
    wall = time.monotonic() - started
    cpu = tree_cpu(platform.worker.pid) - cpu0
    endpoint_cpu = thread_cpu(platform.native_id) - ep0
    bad = [j for j in jobs if j.status != "COMPLETED"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs ended {bad[0].status}: {bad[0].error}")
    tokens = load.total()
    with open(platform.log_path) as log_file:
        log_file.seek(log_mark)
        text = log_file.read()
    staleness = [float(m.group(1)) for m in STALENESS.finditer(text)]
    last_waits = [float(m.group(1)) for m in LAST_WAIT.finditer(text)]
    # The first stream message's arrival (an unstreamed job: its end), from submission and
    # from the job-take.
    firsts = [(j.chunk_times or [j.finished or 0.0])[0] for j in jobs]
    ttfts = [f - j.created for f, j in zip(firsts, jobs, strict=True)]
    take_ttfts = [f - (j.started or j.created) for f, j in zip(firsts, jobs, strict=True)]
    return {
        "path": label, "c": load.concurrency, "tokens": load.tokens, "tps": tokens / wall,
        "take_p50": pct([(j.started or j.created) - j.created for j in jobs], 0.5),
        "take_done_p50": pct([(j.finished or 0) - (j.started or 0) for j in jobs], 0.5),
        "ttft_p50": pct(ttfts, 0.5), "ttft_p95": pct(ttfts, 0.95),
        "take_ttft_p50": pct(take_ttfts, 0.5), "take_ttft_p95": pct(take_ttfts, 0.95),
        "take_ttfts": take_ttfts, "ttfts": ttfts,
        "job_ids": [j.id for j in jobs],
        "msgs": statistics.median(len(j.chunks) for j in jobs),
        "stale_p95": pct(staleness, 0.95) / 1000 if staleness else None,
        "last_wait_max": max(last_waits) / 1000 if last_waits else None,
        "cpu_per_1k": cpu / tokens * 1000, "endpoint_cpu_share": endpoint_cpu / max(cpu, 1e-9),
        **cpu_per_1k(split0, tokens, platform.worker.pid),
    }


def profiled(pid: int, out: Path, run: Callable[[], Any], rate: int = 100,
             gil: bool = False) -> collections.Counter[str]:
    """py-spy's samples of process `pid` while `run()` runs: raw stacks ("frame;frame;..."
    root first) and their counts. `gil`: only samples holding the GIL (the CPU the process
    itself spends, not its waits). py-spy must be installed (pip install py-spy)."""
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                            str(pid), "--format", "raw", "--rate", str(rate), "--output",
                            str(out), "--nonblocking", *(["--gil"] if gil else [])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    try:
        run()
    finally:
        spy.send_signal(2)
        spy.wait(timeout=60)
    stacks: collections.Counter[str] = collections.Counter()
    carried = ""  # a frame's text can hold a line break: the row goes on in the next line
    for row in out.read_text().splitlines():
        stack, _, n = (carried + row).rpartition(" ")
        if n.isdigit():
            stacks[stack] += int(n)
            carried = ""
        else:
            carried += row + " "
    return stacks


def by_place(stacks: collections.Counter[str], places: tuple[tuple[str, tuple[str, ...]], ...]
             ) -> dict[str, float]:
    """Each sample's place: the first of `places` (name, marks) with a mark in the innermost
    frame that has any; shares of all samples, largest first."""
    counts: collections.Counter[str] = collections.Counter()
    for stack, n in stacks.items():
        counts[_place(stack, places)] += n
    total = sum(counts.values()) or 1
    return {place: n / total for place, n in counts.most_common()}


def _place(stack: str, places: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    for frame in reversed(stack.split(";")):
        for place, marks in places:
            if any(mark in frame for mark in marks):
                return place
    return "other"


def print_shares(column: str, shares: Iterable[tuple[str, float]]) -> None:
    """A table of (name, share) pairs."""
    print(f"| {column} | share |")
    print("| --- | --- |")
    for name, share in shares:
        print(f"| {name} | {share:.1%} |")


def top_functions(stacks: collections.Counter[str], most: int = 15) -> list[tuple[str, float]]:
    """The innermost frames with the most samples (self time): (frame, share)."""
    counts: collections.Counter[str] = collections.Counter()
    for stack, n in stacks.items():
        counts[stack.rsplit(";", 1)[-1]] += n
    total = sum(counts.values()) or 1
    return [(frame, n / total) for frame, n in counts.most_common(most)]


def warm_up(concurrency: int, platform: Platform | None = None, url: str | None = None,
            route: str = "native") -> None:
    """One unmeasured round of short jobs at `concurrency` through the platform (its `route`)
    or to `vllm serve` at `url`: a fresh process's first batches of each size cost more (the
    CPU kernels' first calls), whichever server runs them."""
    load = Load(concurrency, 16, concurrency, seeded=False)
    if platform is not None:
        asyncio.run(_drive_platform(platform, load, route))
    if url is not None:
        asyncio.run(_drive_vllm_serve(url, load, openai_kind(route) if route.startswith("openai")
                                      else "completions"))


@contextlib.contextmanager
def vllm_serve(log_path: Path, **engine: Any) -> Iterator[tuple[str, int]]:
    """vLLM's own server on the demo model with the worker's engine settings (`engine`: other
    values of the demo's engine defaults, by their names)."""
    port = free_port()
    settings = {**ENGINE_DEFAULTS, **engine}
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
            str(ensure_demo_model()), "--served-model-name", DEMO_MODEL_ID, "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len",
            str(settings["max_model_len"]), "--kv-cache-memory-bytes",
            str(settings["kv_cache_memory_bytes"]), "--disable-uvicorn-access-log"]
    for name in ("block_size", "max_num_seqs"):
        if name in settings:
            args += ["--" + name.replace("_", "-"), str(settings[name])]
    env = dict(os.environ, VLLM_RPC_BASE_PATH=tempfile.mkdtemp(prefix="bench-rpc-"))
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(log_path.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=120)


async def _drive_vllm_serve(url: str, load: Load, kind: str = "chat"
                            ) -> tuple[list[float], list[int]]:
    """`load` as OpenAI requests of `kind` (OPENAI_KINDS) to `url`: (time to the first SSE
    event, or to the answer when not streamed; events per request)."""
    semaphore = asyncio.Semaphore(load.concurrency)
    ttfts: list[float] = []
    events: list[int] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(
            max_connections=load.concurrency + 4)) as client:
        async def one(i: int) -> None:
            async with semaphore:
                path, body = openai_request(kind, load, i)
                first, n = await _openai_call(client, f"{url}/v1/{path}", body)
                ttfts.append(first)
                events.append(n)

        await asyncio.gather(*(one(i) for i in range(load.jobs)))
    return ttfts, events


@contextlib.contextmanager
def lb_worker(log_path: Path, **extra_env: str) -> Iterator[tuple[str, int, dict[str, float]]]:
    """The worker serving a load-balancing endpoint (ENDPOINT_TYPE=lb), reached directly (no
    gateway), with the same engine settings and access log setting as `vllm serve` here.
    Yields its URL, pid and cold start: seconds from the process start to the first /ping
    204 and to the first 200."""
    port = free_port()
    env = dict(os.environ, VLLM_RPC_BASE_PATH=tempfile.mkdtemp(prefix="bench-rpc-"),
               ENDPOINT_TYPE="lb", PORT=str(port), DISABLE_UVICORN_ACCESS_LOG="true")
    env.pop("MODEL_NAME", None)
    env.update(_demo_env())
    env.update(extra_env)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, str(HANDLER)], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)
    first: dict[str, float] = {}
    try:
        while "200" not in first:
            if proc.poll() is not None or time.monotonic() - started > 600:
                raise RuntimeError(log_path.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                status = str(httpx.get(f"{url}/ping", timeout=2).status_code)
                first.setdefault(status, time.monotonic() - started)
            time.sleep(0.02)
        yield url, proc.pid, first
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def measure_vllm_serve(url: str, pid: int, load: Load,
                       label: str = "vllm serve, HTTP SSE", route: str = "chat"
                       ) -> dict[str, Any]:
    """OpenAI requests of kind `route` (OPENAI_KINDS: streamed chat completions by default;
    "completions": the native jobs' prompts) over HTTP against `vllm serve` (or the worker
    serving vLLM's app on a load-balancing endpoint)."""
    return again_on_a_dropped_connection(lambda: _measure_vllm_serve(url, pid, load, label, route))


def _measure_vllm_serve(url: str, pid: int, load: Load, label: str, route: str
                        ) -> dict[str, Any]:
    cpu0 = tree_cpu(pid)
    split0 = cpu_split(pid)
    started = time.monotonic()
    ttfts, events = asyncio.run(_drive_vllm_serve(url, load, route))
    wall = time.monotonic() - started
    tokens = load.total()
    return {"path": label, "c": load.concurrency, "tokens": load.tokens,
            "tps": tokens / wall, "take_p50": None, "take_done_p50": None,
            "ttft_p50": pct(ttfts, 0.5), "ttft_p95": pct(ttfts, 0.95), "take_ttft_p50": None,
            "take_ttft_p95": None, "ttfts": ttfts,
            "msgs": statistics.median(events), "stale_p95": None, "last_wait_max": None,
            "cpu_per_1k": (tree_cpu(pid) - cpu0) / tokens * 1000, "endpoint_cpu_share": None,
            **cpu_per_1k(split0, tokens, pid)}
