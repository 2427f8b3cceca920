"""The one-process ceiling, for benchmarks/run.py --ceiling: jobs at high concurrency on the demo
model, with the CPU time of the process that serves requests ("front": the worker's main
process; `vllm serve`'s API server) per 1,000 tokens beside its tokens/s. OpenAI chat and
completions, streamed and not, against `vllm serve` answering the same requests; native jobs
against its streamed chat. `vllm serve` stays up through the run with the same engine settings,
and every round of the worker runs beside one of its rounds, one server idle while the other
works; the platform stand-in answers at once; greedy sampling. Then the floor (the SDK's job
loop with a handler that yields one constant) and the relay from vLLM's app to route jobs
alone, without an engine."""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import harness as fp
from starlette.responses import StreamingResponse

from worker_vllm.engine.app import VLLMApp
from worker_vllm.jobs.flush import FlushPolicy, chunked
from worker_vllm.jobs.vllm_app import SSEEvents, _event_weight
from worker_vllm.loop_thread import LoopThread

ENGINE = {"MAX_NUM_SEQS": "256"}


KIND_LABELS = {"chat": "chat", "chat-ns": "chat, not streamed", "completions": "completions",
               "completions-ns": "completions, not streamed"}


def _label(route: str) -> str:
    return "native jobs" if route == "native" else \
        f"OpenAI {KIND_LABELS[fp.openai_kind(route)]} jobs"


# Where the worker's main process spends its CPU on OpenAI chat jobs (harness.by_place; py-spy
# with --gil: the samples holding the GIL), most specific first.
PLACES = (
    ("POSTs to the platform (the worker's Poster)", ("worker_vllm/queue/sdk/poster.py",
                                                     "worker_vllm/queue/sdk/results.py")),
    ("middlewares of vLLM's app (error handling)", ("starlette/middleware",
                                                    "starlette/_exception_handler")),
    ("vLLM's chat generator, Starlette, FastAPI (vllm serve pays this too)",
     ("vllm/entrypoints", "vllm/renderers", "starlette", "fastapi")),
    ("relay from vLLM's app to the job loop", ("worker_vllm/loop_thread.py",)),
    ("SSE events, weighing, stream flush", ("worker_vllm/jobs/flush.py",
                                            "worker_vllm/jobs/vllm_app.py")),
    ("admission, per engine step", ("worker_vllm/queue/admission", "worker_vllm/queue/projection",
                                    "worker_vllm/engine_state", "worker_vllm/engine/load")),
    ("job handler: dispatch, summary, log line", ("worker_vllm/jobs/", "worker_vllm/logs")),
    ("job-take (the SDK's aiohttp session), job state file, intake",
     ("runpod/", "aiohttp/", "worker_vllm/queue/")),
    ("vLLM's engine client: output handler, stats (vllm serve pays this too)", ("vllm/",)),
    ("asyncio's loop, no caller of the worker's above", ("asyncio/",)),
)


def _profile(run_dir: Path, platform: fp.Platform, load: fp.Load) -> dict[str, Any]:
    """py-spy on the worker's main process through one more round of `load` (OpenAI chat)."""
    stacks = fp.profiled(platform.worker.pid, run_dir / "ceiling-profile.txt",
                         lambda: fp.measure_platform(platform, load, "openai", "profiled"),
                         rate=200, gil=True)
    return {"samples": sum(stacks.values()), "c": load.concurrency,
            "places": fp.by_place(stacks, PLACES), "top": fp.top_functions(stacks)}


class Serve:
    """`vllm serve`, up through the whole run with the worker's engine settings, idle while the
    worker's rounds run (as the worker is through its): its rounds, kept for its rows."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid
        self.rounds: list[dict[str, Any]] = []

    def measure(self, kind: str, load: fp.Load) -> dict[str, Any]:
        row = {**fp.measure_vllm_serve(self.url, self.pid, load, f"vllm serve "
                                       f"({KIND_LABELS[kind]})", route=kind), "kind": kind}
        self.rounds.append(row)
        return row


# A row's figures that are the medians of its rounds.
MEDIANS = ("tps", "front_ms_per_1k", "cpu_per_1k", "ttft_p50", "ttft_p95")


def _paired(serve: Serve, kind: str, load: fp.Load, measure: Callable[[], dict[str, Any]],
            worker_pid: int, rounds: int) -> dict[str, Any]:
    """`rounds` pairs of rounds, a `vllm serve` round of `kind` beside each of the worker's
    (`measure()`), which of the two goes first alternating: the worker's row, its figures the
    medians of its rounds, its ratios the medians of the pairs' ratios."""

    def beside(run: Callable[[], dict[str, Any]], idle_pid: int) -> tuple[dict[str, Any], float]:
        """A round, and the idle server's CPU through it (ms per 1,000 of the round's tokens)."""
        before = fp.tree_cpu(idle_pid)
        row = run()
        return row, (fp.tree_cpu(idle_pid) - before) * 1e6 / load.total()

    def serve_round() -> tuple[dict[str, Any], float]:
        return beside(lambda: serve.measure(kind, load), worker_pid)

    pairs = []
    for i in range(rounds):
        if i % 2:
            (worker, serve_idle), (ref, worker_idle) = beside(measure, serve.pid), serve_round()
        else:
            (ref, worker_idle), (worker, serve_idle) = serve_round(), beside(measure, serve.pid)
        pairs.append((worker, ref, [serve_idle, worker_idle]))
    row = {key: statistics.median(w[key] for w, _, _ in pairs) for key in MEDIANS}
    ratios = {key: [w[key] / r[key] for w, r, _ in pairs] for key in ("tps", "front_ms_per_1k")}
    return {**pairs[0][0], **row, "kind": kind, "ratios": ratios,
            "idle_ms_per_1k": [max(idle[n] for _, _, idle in pairs) for n in (0, 1)]}


def _worker_rows(run_dir: Path, serve: Serve, name: str, routes: tuple[str, ...],
                 loads: list[fp.Load], rounds: int, concurrency: int | None,
                 profile: dict[str, Any] | None = None, **env: str) -> list[dict[str, Any]]:
    """The queue worker behind the platform stand-in: each route at each load, paired with
    `vllm serve`'s rounds. Each row's `kind` names the `vllm serve` requests it is compared
    with (native jobs: streamed chat). `profile` (a dict): filled with where OpenAI chat jobs
    at the first load spend the main process's CPU."""
    slug = "-".join(re.findall(r"[a-z0-9]+", name.lower()))
    platform = fp.Platform(0.0, run_dir / f"ceiling-{slug}.log", concurrency=concurrency,
                           **ENGINE, **env)
    rows = []
    try:
        for route in routes:
            fp.warm_up(loads[0].concurrency, platform=platform, route=route)
            kind = "chat" if route == "native" else fp.openai_kind(route)
            label = f"{name}, {_label(route)}"
            for load in loads:
                rows.append(_paired(serve, kind, load, lambda load=load, route=route, label=label:
                                    fp.measure_platform(platform, load, route, label),
                                    platform.worker.pid, rounds))
            if profile is not None and route == "openai":
                profile.update(_profile(run_dir, platform, loads[0]))
    finally:
        platform.close()
    return rows


def _lb_rows(run_dir: Path, serve: Serve, loads: list[fp.Load], rounds: int
             ) -> list[dict[str, Any]]:
    with fp.lb_worker(run_dir / "ceiling-lb.log", **ENGINE) as (url, pid, _):
        fp.warm_up(loads[0].concurrency, url=url, route="openai")
        return [_paired(serve, "chat", load, lambda load=load: fp.measure_vllm_serve(
            url, pid, load, "worker, load-balancing (chat)"), pid, rounds) for load in loads]


def _floor_rows(run_dir: Path, loads: list[fp.Load], concurrency: int) -> list[dict[str, Any]]:
    """The SDK's job loop with a handler that yields one constant: one round a load."""
    name = "floor (SDK job loop, constant handler)"
    platform = fp.Platform(0.0, run_dir / "ceiling-floor.log", fp.FLOOR,
                           concurrency=concurrency, **ENGINE)
    try:
        fp.warm_up(loads[0].concurrency, platform=platform)
        return [{**fp.measure_platform(platform, load, "native", f"{name}, native jobs"),
                 "kind": "chat"} for load in loads]
    finally:
        platform.close()


def rows(run_dir: Path, smoke: bool, rounds: int = 3, jobs: int = 256, tokens: int = 128,
         concurrencies: tuple[int, ...] = (64, 128), profile: dict[str, Any] | None = None
         ) -> list[dict[str, Any]]:
    """Every row of the worker paired with `vllm serve`'s rounds (see _paired): the machine's
    speed drifts by tens of percent over minutes, so rounds minutes apart compare badly.
    `profile`: see _worker_rows."""
    if smoke:
        jobs, tokens, concurrencies, rounds = 8, 8, (2,), 1
    loads = [fp.Load(jobs, tokens, c, greedy=True) for c in concurrencies]
    top = max(concurrencies)
    routes = ("native", "openai", "openai-chat-ns", "openai-completions",
              "openai-completions-ns")
    with fp.vllm_serve(run_dir / "ceiling-vllm-serve.log",
                       max_num_seqs=int(ENGINE["MAX_NUM_SEQS"])) as (url, pid):
        serve = Serve(url, pid)
        fp.warm_up(loads[0].concurrency, url=url, route="openai")
        out = _worker_rows(run_dir, serve, f"worker, MAX_CONCURRENCY={top} fixed", routes,
                           loads, rounds, top, profile=profile, JOB_ADMISSION="fixed")
        out += _worker_rows(run_dir, serve, "worker, engine decides", ("openai",), loads,
                            rounds, None)
        out += _lb_rows(run_dir, serve, loads, rounds)
    out += _floor_rows(run_dir, loads, top)
    return _serve_rows(serve.rounds) + out


def _serve_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`vllm serve`'s rounds of each kind and load as one row: the medians."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rounds:
        groups.setdefault((row["kind"], row["c"]), []).append(row)
    return [{**group[0], "rounds": len(group),
             **{key: statistics.median(r[key] for r in group) for key in MEDIANS}}
            for group in groups.values()]


def _ratio(row: dict[str, Any], key: str, ref: dict[str, Any] | None) -> str:
    """A worker row's median ratio to `vllm serve` with the range of its pairs; the floor's
    against `vllm serve`'s median row."""
    if "rounds" in row:
        return "1.00"
    if "ratios" not in row:
        return "-" if ref is None else f"{row[key] / ref[key]:.2f}"
    seen = row["ratios"][key]
    spread = f" ({min(seen):.2f}-{max(seen):.2f})" if len(seen) > 1 else ""
    return f"{statistics.median(seen):.2f}{spread}"


def print_table(table: list[dict[str, Any]]) -> None:
    serve = {(r["kind"], r["c"]): r for r in table if "rounds" in r}
    paired = [r for r in table if "ratios" in r]
    rounds = max((len(r["ratios"]["tps"]) for r in paired), default=0)
    idle = [max((r["idle_ms_per_1k"][n] for r in paired), default=0.0) for n in (0, 1)]
    print(f"\nThe one-process ceiling: jobs x tokens on the demo model, MAX_NUM_SEQS 256, greedy; "
          "front = the process serving requests (CPU ms per 1,000 tokens). Each row of the "
          f"worker: {rounds} round(s), each beside a round of `vllm serve` (up through the run, "
          "idle during the worker's rounds: at most "
          f"{idle[0]:.1f} ms of its CPU per 1,000 of the worker's tokens; the worker's through "
          f"its rounds: at most {idle[1]:.1f}) answering the same "
          "requests (native jobs: its streamed chat); figures: the medians of the rounds; "
          "x vllm serve: the median of the pairs' ratios (their range); `vllm serve`'s rows: "
          "the medians of all its rounds; TTFT of a request not streamed: the time to its "
          "answer; the floor: the SDK's job loop with a handler that yields one constant per "
          "job (its CPU per 1,000 tokens of the jobs it stands for; one round)")
    print("| path | c | tok/s | x vllm serve | front CPU ms/1k | x vllm serve | "
          "whole-tree CPU ms/1k | TTFT p50/p95 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in table:
        ref = None if "rounds" in row else serve.get((row["kind"], row["c"]))
        floor = row["path"].startswith("floor")
        tps = "- | - |" if floor else f"{row['tps']:.0f} | {_ratio(row, 'tps', ref)} |"
        label = f"{row['path']}, {row['rounds']} round(s)" if "rounds" in row else row["path"]
        print(f"| {label} | {row['c']} | {tps} {row['front_ms_per_1k']:.0f} | "
              f"{_ratio(row, 'front_ms_per_1k', ref)} | {row['cpu_per_1k'] * 1000:.0f} | "
              f"{row['ttft_p50'] * 1000:.0f}/{row['ttft_p95'] * 1000:.0f} |")


def print_profile(profile: dict[str, Any]) -> None:
    print(f"\nWhere the worker's main process spends its CPU, OpenAI chat jobs at "
          f"c{profile['c']} (py-spy --gil, 200 Hz, {profile['samples']} samples)")
    fp.print_shares("place", profile["places"].items())
    print()
    fp.print_shares("function (self time)", [(f"`{frame}`", share)
                                             for frame, share in profile["top"]])


# One chat-completion chunk as vLLM's app sends it (one SSE event per body chunk).
_EVENT = (b'data: {"id":"chatcmpl-0123456789abcdef","object":"chat.completion.chunk",'
          b'"created":1765000000,"model":"demo","choices":[{"index":0,"delta":{"content":'
          b'" tok"},"logprobs":null,"finish_reason":null}]}\n\n')


async def _relay_round(streams: int, events: int) -> float:
    """CPU seconds per event of the engine's loop thread, for `streams` requests to an ASGI app
    on it (Starlette's StreamingResponse, as vLLM's app streams: `events` SSE events 2 ms
    apart), called and flushed there as route jobs call vLLM's app and flush its events (the
    SDK's job loop runs on the engine's loop)."""

    async def sse_app(scope: Any, receive: Any, send: Any) -> None:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(events):
                yield _EVENT
                await asyncio.sleep(0.002)

        await StreamingResponse(body(), media_type="text/event-stream")(scope, receive, send)

    engine = LoopThread("bench-relay", uvloop=True)
    app = SimpleNamespace(runner=SimpleNamespace(loop=engine), job_stack=sse_app)

    async def job(i: int) -> int:
        response = await VLLMApp.request(app, "POST", "/v1/chat/completions", b"{}",  # type: ignore[arg-type]
                                         f"relay-{i}")
        body = SSEEvents(response.body)
        async with contextlib.aclosing(chunked(body, FlushPolicy(), weigh=_event_weight)) as out:
            return sum([len(chunk.items) async for chunk in out])

    async def all_jobs() -> tuple[int, float]:
        started = time.thread_time()
        done = sum(await asyncio.gather(*[job(i) for i in range(streams)]))
        return done, time.thread_time() - started

    try:
        done, cpu = await asyncio.wrap_future(engine.submit(all_jobs()))
        if done != streams * events:
            raise RuntimeError(f"{done} SSE events reached the jobs, not {streams * events}")
        return cpu / done
    finally:
        engine.stop()


def relay_row(smoke: bool) -> dict[str, Any]:
    """vLLM's app's stream to a route job's stream flush, both on the engine's loop, without
    an engine: that loop's CPU per SSE event, median of 5 rounds after one unmeasured."""
    streams, events = (4, 20) if smoke else (64, 200)
    runs = [asyncio.run(_relay_round(streams, events)) for _ in range(6)][1:]
    return {"streams": streams, "events": events,
            "us_per_event": statistics.median(runs) * 1e6, "runs": [r * 1e6 for r in runs]}


def print_relay(row: dict[str, Any]) -> None:
    print(f"\nThe app's stream to route jobs alone (no engine): {row['streams']} streams x "
          f"{row['events']} SSE events from an ASGI app on the engine's loop to route jobs' "
          f"stream flush on the same loop: {row['us_per_event']:.1f} us of its CPU per event "
          "(median of 5: " + " / ".join(f"{r:.1f}" for r in row["runs"])
          + "), the app's own share included")


# The platform stand-in of the POST row: an aiohttp server answering every POST at once.
_POST_SERVER = """
import sys
import uvloop
from aiohttp import web
async def answer(request):
    await request.read()
    return web.Response(text="ok")
app = web.Application()
app.router.add_post("/{path:.*}", answer)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


async def _posts_round(url: str, client: str, posts: int, at_once: int) -> float:
    """CPU seconds of this (uvloop) thread per 1 KB POST, `at_once` POSTs in flight: through
    the SDK's aiohttp session as it posts ("aiohttp"), or through the worker's Poster."""
    from runpod.http_client import AsyncClientSession

    from worker_vllm.queue.sdk.poster import Poster
    from worker_vllm.queue.sdk.results import _FORM

    body = b'{"output": "' + b"x" * 1000 + b'"}'
    headers = {**_FORM, "X-Request-ID": "job-1"}
    async with AsyncClientSession() as session:
        poster = Poster(session.headers)

        async def one() -> None:
            if client == "Poster":
                status, _ = await poster.post(url, body, headers)
            else:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            if status != 200:
                raise RuntimeError(f"the stand-in answered {status}")

        async def task() -> None:
            for _ in range(posts // at_once):
                await one()

        await asyncio.gather(*[task() for _ in range(at_once)])  # connections opened
        started = time.thread_time()
        await asyncio.gather(*[task() for _ in range(at_once)])
        cpu = time.thread_time() - started
        poster.close()
    return cpu / (posts // at_once * at_once)


def posts_row(smoke: bool) -> dict[str, Any]:
    """The client's CPU per POST to the platform: the SDK's aiohttp session against the
    worker's Poster, rounds alternated, median of 3 each."""
    import subprocess
    import sys

    import uvloop

    posts, at_once = (200, 8) if smoke else (4000, 64)
    port = fp.free_port()
    server = subprocess.Popen([sys.executable, "-c", _POST_SERVER, str(port)])
    url = f"http://127.0.0.1:{port}/stream?id=job-1&isStream=false"
    try:
        fp.wait_for_port(port)
        runs: dict[str, list[float]] = {"aiohttp": [], "Poster": []}
        for _ in range(3):
            for client, seen in runs.items():
                seen.append(uvloop.run(_posts_round(url, client, posts, at_once)) * 1e6)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"posts": posts, "at_once": at_once, "runs": runs,
            "us_per_post": {client: statistics.median(r) for client, r in runs.items()}}


def print_posts(row: dict[str, Any]) -> None:
    print(f"\nPOSTs to the platform alone: {row['posts']} POSTs of 1 KB, {row['at_once']} at "
          "once, to a local aiohttp server; CPU of the client's loop thread per POST (median "
          "of 3, rounds alternated):")
    for client, us in row["us_per_post"].items():
        label = "the SDK's aiohttp session" if client == "aiohttp" else "the worker's Poster"
        print(f"  {label}: {us:.1f} us (" + " / ".join(f"{r:.1f}" for r in row["runs"][client])
              + ")")
