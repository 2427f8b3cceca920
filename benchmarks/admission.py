"""Jobs per worker, for benchmarks/run.py --admission: the engine deciding against fixed
counts and `vllm serve`, in one run.

Table A, a KV-limited engine (a cache of 4 contexts of MAX_MODEL_LEN=1024 tokens, blocks of 32
tokens), native jobs through the platform stand-in: the rule before (a fixed 4 jobs at once:
min(MAX_NUM_SEQS, KV tokens // MAX_MODEL_LEN); JOB_ADMISSION=fixed), the engine deciding
(MAX_CONCURRENCY unset), a fixed 32 (JOB_ADMISSION=fixed MAX_CONCURRENCY=32: the worker's
behaviour before with MAX_CONCURRENCY=32), and `vllm serve` with the same engine settings
(/v1/completions of the same prompts); (a) 64 jobs x 128 tokens at c32 and c64, a mix of 128
jobs of 32 to 224 tokens at c32 (jobs that do not all end together, as real ones), (b) 32 jobs
of ~600-token prompts x 300 tokens at c32. Every path runs side by side and each load is
measured on each path in turn, `rounds` times (--repeat, default 3; the long load once): a
2-core machine's drift moved one path's tok/s by up to 50% between rounds, which one run per
path takes for a difference between paths; a ratio between paths is the median of the rounds'
ratios (each round's paths ran seconds apart). Columns beyond the full path's: the most
requests waiting in vLLM's scheduler at any engine step and the engine's preemptions (from the
worker's job records; `vllm serve`'s from its Prometheus counter), the most jobs waiting in the
platform's queue (sampled every 10 ms), and CPU per 1,000 tokens by process: the server's own
(the worker's job loop, vllm serve's API server), vLLM's engine core, and this process's (the
load's client, and the platform stand-in): on a 2-core machine what the front and the load
take is taken from the engine core.

Table B, the demo's default engine: the worker's first stream message from its job-take
against `vllm serve`'s time to first token, at c16 and c32, native and OpenAI jobs, with
MAX_CONCURRENCY equal to the load and unset: every process runs side by side and each path is
measured in turn, ROUNDS times (p50 and p95 over all rounds' jobs), so that the machine's
drift and its stalls (a 2-core machine runs the load, the stand-in and the server on the same
cores) fall on every path alike.

Table C, no engine: the intake's own work after each engine step in the worker's process (it
sizes every request in flight and projects the KV cache), by requests in flight, at the counts
GPUs run.

Every process (worker or `vllm serve`) first runs one unmeasured round of 16-token jobs at the
load's concurrency: a fresh process's first batches of each size cost more, whoever runs them.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import harness as fp
import httpx

# 4 contexts of 1,024 tokens: the demo model's KV cache takes 1 KiB per token. KV blocks of 32
# tokens (CPU's default is 128; GPUs' 16): a job's last block wastes what it would on a GPU.
KV_LIMITED = {"kv_cache_memory_bytes": 4 * 1024 * 1024, "max_model_len": 1024,
              "block_size": 32}
EARLIER_RULE = 4 * 1024 // 1024  # KV tokens // MAX_MODEL_LEN, as the rule before computed it
# ~605 tokens of the demo tokenizer, a different first block for each job (no prefix shared).
LONG_PROMPT = "# job {i}\n" + "value = compute(item)\n" * 75


def _loads(smoke: bool) -> list[tuple[str, fp.Load]]:
    """Unseeded: vLLM's CPU build can kill its engine core on seeded requests that are
    preempted ("CPU Generator does not use offset"), and a fixed count or `vllm serve` on this
    cache preempts."""
    if smoke:
        return [("short", fp.Load(4, 8, 2, seeded=False)),
                ("long", fp.Load(2, 8, 2, LONG_PROMPT, seeded=False))]
    return [("short", fp.Load(64, 128, 32, seeded=False)),
            ("short", fp.Load(64, 128, 64, seeded=False)),
            ("mixed", fp.Load(128, 128, 32, seeded=False, spread=96)),
            ("long", fp.Load(32, 300, 32, LONG_PROMPT, seeded=False))]


# CPU per 1,000 tokens by process (``fp.cpu_split``): the rounds' median.
CPU_KEYS = ("front_ms_per_1k", "engine_ms_per_1k", "client_ms_per_1k")


class QueueSampler:
    """The platform stand-in's queue length, sampled every 10 ms in a thread."""

    def __init__(self, platform: fp.Platform) -> None:
        self.platform, self.peak = platform, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, len(self.platform.endpoint.queue))

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def _engine_figures(records: Path, ids: list[str]) -> dict[str, Any]:
    wanted, rows = set(ids), []
    for line in records.read_text().splitlines():
        record = json.loads(line)
        if record["id"] in wanted:
            rows.append(record)
    preemptions = [r["engine_preemptions"] for r in rows]
    return {"waiting_max": max(r["engine_requests_waiting_max"] for r in rows),
            "preempted": max(preemptions) - min(preemptions)}


def _serve_preemptions(url: str) -> int:
    """`vllm serve`'s preemptions so far, from its Prometheus counter (read before and after
    a load, not sampled during it: a scrape costs the server CPU)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:num_preemptions_total")]
    if not counts:
        raise RuntimeError("vllm serve's /metrics has no vllm:num_preemptions_total")
    return int(sum(counts))


def kv_limited_rows(run_dir: Path, smoke: bool, rounds: int = 3,
                    kinds: tuple[str, ...] = ("short", "mixed", "long")) -> list[dict[str, Any]]:
    """Table A: every path runs side by side; each round measures each load on every path in
    turn (`rounds` rounds of the loads whose figure is a rate; tok/s: the median; percentiles
    over every round's jobs); the long load (whose figures are counts of waiting and preempted
    requests) runs in the first round only. `kinds`: the loads to run."""
    env = {k.upper(): json.dumps(v) for k, v in KV_LIMITED.items()}
    # (label, MAX_CONCURRENCY, JOB_ADMISSION): the rule before took a fixed count.
    configs = [(f"earlier rule: fixed {EARLIER_RULE}", EARLIER_RULE, "fixed"),
               ("engine decides", None, "engine"), ("fixed 32", 32, "fixed")]
    loads = [(kind, load) for kind, load in _loads(smoke) if kind in kinds]
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}  # (load, path) -> one row a round
    with contextlib.ExitStack() as stack:
        workers: dict[str, tuple[fp.Platform, Path]] = {}
        for label, concurrency, rule in configs[1:2] if smoke else configs:
            records = run_dir / f"records-{concurrency}.jsonl"
            platform = fp.Platform(0.0, run_dir / f"kv-worker-{concurrency}.log",
                                   concurrency=concurrency, JOB_RECORDS_FILE=str(records),
                                   JOB_ADMISSION=rule, **env)
            stack.callback(platform.close)
            workers[f"worker, {label}"] = (platform, records)
        url, pid = stack.enter_context(fp.vllm_serve(run_dir / "kv-vllm-serve.log",
                                                     **KV_LIMITED))
        for platform, _ in workers.values():
            fp.warm_up(loads[0][1].concurrency, platform)
        fp.warm_up(loads[0][1].concurrency, url=url)
        for round_ in range(1 if smoke else rounds):
            for n, (kind, load) in enumerate(loads):
                if kind == "long" and round_:
                    continue
                for path, (platform, records) in workers.items():
                    sampler = QueueSampler(platform)
                    row = fp.measure_platform(platform, load, "native", path)
                    runs.setdefault((n, path), []).append(
                        {**row, "queue_max": sampler.stop(),
                         **_engine_figures(records, row["job_ids"])})
                preempted = _serve_preemptions(url)
                row = fp.measure_vllm_serve(url, pid, load, "vllm serve", route="completions")
                row["preempted"] = _serve_preemptions(url) - preempted
                runs.setdefault((n, "vllm serve"), []).append(row)
    return [_combined(loads[n][0], loads[n][1], rows) for (n, _), rows in runs.items()]


def _combined(kind: str, load: fp.Load, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One load's rounds on one path: median tok/s, percentiles over all jobs, the most
    waiting (engine, platform) and every preemption."""
    def pooled(key: str) -> list[float]:
        return [v for r in rounds for v in r.get(key) or ()]

    ttfts, take_ttfts = pooled("ttfts"), pooled("take_ttfts")
    row = {"path": rounds[0]["path"], "c": load.concurrency, "tokens": load.tokens,
           "kind": kind, "spread": load.spread, "rounds": len(rounds),
           "tps": statistics.median(r["tps"] for r in rounds),
           "tps_all": [r["tps"] for r in rounds],
           "ttft_p50": fp.pct(ttfts, 0.5), "ttft_p95": fp.pct(ttfts, 0.95),
           "take_ttft_p50": fp.pct(take_ttfts, 0.5) if take_ttfts else None,
           "take_ttft_p95": fp.pct(take_ttfts, 0.95) if take_ttfts else None,
           **{key: statistics.median(r[key] for r in rounds) for key in CPU_KEYS}}
    if "preempted" in rounds[0]:
        row["preempted"] = sum(r["preempted"] for r in rounds)
    if "waiting_max" in rounds[0]:
        row.update(waiting_max=max(r["waiting_max"] for r in rounds),
                   queue_max=max(r["queue_max"] for r in rounds))
    return row


# Rounds of table B: each measures every path once, in turn, so drift hits all paths alike;
# the percentiles are over every round's jobs.
ROUNDS = 3


def first_message_rows(run_dir: Path, smoke: bool) -> list[dict[str, Any]]:
    """Table B: the worker with MAX_CONCURRENCY equal to the load and unset, and `vllm serve`,
    all running side by side and measured in turn, ROUNDS times."""
    concurrencies = (2,) if smoke else (16, 32)
    jobs, tokens, rounds = (4, 8, 1) if smoke else (64, 128, ROUNDS)
    workers: dict[int | None, fp.Platform] = {}
    samples: dict[tuple[str, int], list[float]] = {}
    rates: dict[tuple[str, int], list[float]] = {}
    with contextlib.ExitStack() as stack:
        for concurrency in (None,) if smoke else (*concurrencies, None):
            workers[concurrency] = fp.Platform(0.0, run_dir / f"worker-{concurrency}.log",
                                               concurrency=concurrency)
            stack.callback(workers[concurrency].close)
        url, pid = stack.enter_context(fp.vllm_serve(run_dir / "vllm-serve.log"))
        for c in concurrencies:
            fp.warm_up(c, url=url, route="openai")
            for concurrency, platform in workers.items():
                if concurrency in (None, c):
                    for route in ("native", "openai"):
                        fp.warm_up(c, platform, route=route)
        for _ in range(rounds):
            for c in concurrencies:
                load = fp.Load(jobs, tokens, c)
                row = fp.measure_vllm_serve(url, pid, load)
                samples.setdefault((row["path"], c), []).extend(row["ttfts"])
                rates.setdefault((row["path"], c), []).append(row["tps"])
                for concurrency, platform in workers.items():
                    if concurrency not in (None, c):
                        continue
                    label = "unset" if concurrency is None else "= load"
                    for route in ("native", "openai"):
                        path = f"worker, {route}, MAX_CONCURRENCY {label}"
                        row = fp.measure_platform(platform, load, route, path)
                        samples.setdefault((path, c), []).extend(row["take_ttfts"])
                        rates.setdefault((path, c), []).append(row["tps"])
    return [{"path": path, "c": c, "tps": statistics.median(rates[path, c]),
             "p50": fp.pct(values, 0.5), "p95": fp.pct(values, 0.95), "n": len(values)}
            for (path, c), values in samples.items()]


def intake_cost_rows(smoke: bool) -> list[dict[str, Any]]:
    """Table C: what the engine-deciding intake does in the worker's process after each engine
    step, by requests in flight: size them (prompt, generated, expected end), find their jobs
    by the ids they carry, project the KV cache until they end and count the jobs that fit
    (``Admission.observe`` of an intake waiting for room, which does all of it at every step).
    Requests of 8 + 128 tokens at every age, in a cache that they fill: the best of 5 runs of
    300 steps."""
    from worker_vllm.engine_state import EngineCapacity, EngineLoad, RequestSize
    from worker_vllm.queue.admission import Admission

    rows = []
    for n in (32,) if smoke else (32, 256, 1024):
        admission = Admission(EngineCapacity(2 * n, n * 140, 32))
        admission.wake_when_room(lambda: None)
        for i in range(n):
            admission.jobs.start(f"job-{i}")
        admission.took(n, n)
        requests = tuple(RequestSize(8, i % 128, 128) for i in range(n))
        ids = tuple(f"chatcmpl-job-{i}" for i in range(n))  # each request names its job
        steps = [EngineLoad(running=n, kv_usage=0.9, in_flight=tuple(
            r._replace(generated=(r.generated + k) % 128) for r in requests),
            in_flight_ids=ids) for k in range(300)]
        best = math.inf
        for _ in range(5):
            started = time.perf_counter()
            for load in steps:
                admission.arm()
                admission.room()  # no room: the next step checks again
                admission.observe(load)
            best = min(best, (time.perf_counter() - started) / len(steps))
        rows.append({"requests": n, "us_per_step": best * 1e6})
    return rows


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def print_tables(kv: list[dict[str, Any]], first: list[dict[str, Any]],
                 cost: list[dict[str, Any]]) -> None:
    if kv:
        _print_kv_limited(kv)
    if first:
        _print_first_message(first)
    print("\nC. The intake's work after each engine step in the worker's process (sizing the "
          "requests in flight, projecting the KV cache, counting the jobs that fit), by "
          "requests in flight\n")
    print("| requests in flight | us per engine step | of a 10 ms step |")
    print("|---|---|---|")
    for row in cost:
        print(f"| {row['requests']} | {row['us_per_step']:.0f} | "
              f"{row['us_per_step'] / 10_000:.1%} |")


def _print_kv_limited(kv: list[dict[str, Any]]) -> None:
    rounds = max(row["rounds"] for row in kv)
    print(f"\nA. KV-limited engine (4 contexts of 1,024 tokens), native jobs, RTT 0 (short and "
          f"mixed loads: {rounds} round(s), every path in turn; tok/s: the rounds' median, "
          "each round's in brackets; x fixed 32, x vllm serve: the median of the rounds' "
          "ratios; long load: one round)\n")
    print("| load | c | path | tok/s | x fixed 32 | x vllm serve | TTFT p50/p95 ms "
          "(from submission) | first msg from take p50/p95 ms | engine waiting max | "
          "preempted | platform queue max | CPU ms/1k tok: front / engine / load |")
    print("|" + "---|" * 12)
    for row in kv:
        def same(prefix: str, r: dict[str, Any] = row) -> dict[str, Any] | None:
            return next((o for o in kv if o["path"].startswith(prefix) and o["c"] == r["c"]
                         and o["kind"] == r["kind"]), None)

        def ratio(base: dict[str, Any] | None, r: dict[str, Any] = row) -> str:
            """The median of the rounds' ratios: each round ran the paths seconds apart."""
            if not base:
                return "-"
            pairs = zip(r["tps_all"], base["tps_all"], strict=True)
            return f"{statistics.median(a / b for a, b in pairs):.2f}"

        spread = f"+-{row['spread']}" if row.get("spread") else ""
        print(f"| {row['kind']} x{row['tokens']}{spread} | {row['c']} | {row['path']} | "
              f"{row['tps']:.0f} ({' '.join(f'{v:.0f}' for v in row['tps_all'])}) | "
              f"{ratio(same('worker, fixed 32'))} | "
              f"{ratio(same('vllm serve'))} | {_ms(row['ttft_p50'])}/{_ms(row['ttft_p95'])} | "
              f"{_ms(row['take_ttft_p50'])}/{_ms(row['take_ttft_p95'])} | "
              f"{row.get('waiting_max', '-')} | {row.get('preempted', '-')} | "
              f"{row.get('queue_max', '-')} | "
              f"{' / '.join(f'{row[key]:.0f}' for key in CPU_KEYS)} |")


def _print_first_message(first: list[dict[str, Any]]) -> None:
    print(f"\nB. The first stream message, demo engine defaults, RTT 0 ({ROUNDS} rounds of 64 "
          "jobs x 128 tokens per path, in turn; tok/s: the rounds' median)\n")
    print("| path | c | tok/s | first msg from take p50/p95 ms | vllm serve TTFT p50/p95 ms | "
          "p95 x vllm serve | jobs |")
    print("|" + "---|" * 7)
    for row in first:
        if row["path"].startswith("vllm serve"):
            continue
        serve = next(o for o in first if o["path"].startswith("vllm serve") and o["c"] == row["c"])
        print(f"| {row['path']} | {row['c']} | {row['tps']:.0f} | {_ms(row['p50'])}/"
              f"{_ms(row['p95'])} | {_ms(serve['p50'])}/{_ms(serve['p95'])} "
              f"| {row['p95'] / serve['p95']:.2f} | {row['n']} |")
