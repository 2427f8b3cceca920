"""What the worker adds, measured against vLLM itself, in one run on the demo model.

    .venv/bin/python benchmarks/run.py [--tokens 256] [--jobs 8] [--repeat 3]
        [--full-path] [--path-jobs 64] [--path-tokens 128] [--rtt-ms 100] [--smoke]
    .venv/bin/python benchmarks/run.py --admission [--repeat 3] [--loads short,mixed,long]
        [--no-first-message] [--smoke]
    .venv/bin/python benchmarks/run.py --ceiling [--repeat 3] [--profile] [--smoke]
    .venv/bin/python benchmarks/run.py --posts [--smoke]
    .venv/bin/python benchmarks/run.py --batch [--batch-lines 512,2000] [--batch-tokens 64]
        [--repeat 3] [--rtt-ms 100] [--profile] [--smoke]
    .venv/bin/python benchmarks/run.py --startup [--eager] [--model DIR]

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
(benchmarks/floor_worker.py); the raw engine (in-process) and `vllm serve` with an HTTP client
under the same load. Columns: tok/s and its ratio to the raw engine, to the floor with the
same intake and to `vllm serve`; submission to job-take and take to done p50; time to first
token p50/p95 (from submission, and from the worker's take), messages per job, token staleness
p95 (how long a message's oldest token waited for it), the longest wait of a stream's last
message, process-tree CPU seconds per 1,000 tokens and its ratio to `vllm serve`'s, and the
platform stand-in's CPU as a share of the worker's.

--admission: jobs per worker instead (admission.py, intake.py): the engine deciding against fixed
counts and `vllm serve` on a KV-limited engine, and the first stream message with
MAX_CONCURRENCY equal to the load and unset.

--batch: batch work instead (benchmarks/batch.py): for each of --batch-lines, greedy chat
requests of --batch-tokens tokens as one batch job, streamed and not (--repeat runs each, the
median), as `/run` jobs at concurrency 32 (the first size, one run; all through the platform
stand-in, --rtt-ms per job-take and per stream POST) and through `vllm run-batch` on the same
file with the same engine settings (--repeat runs before the worker starts and --repeat after
it stopped, the median of all: the machine drifts between them; its start-up taken out: its
time on one line). --profile: py-spy on the worker's main process through one more
streamed batch job, its samples by place (line start, weighing, stream POSTs, vLLM's app, ...;
py-spy must be installed: pip install py-spy).

--ceiling: the one process that serves requests, at its limit (ceiling.py): 256 jobs x 128
tokens at c64 and c128 (MAX_NUM_SEQS 256, greedy, the stand-in answering at once): the worker
with a fixed MAX_CONCURRENCY on native jobs and on OpenAI chat and completions, streamed and
not, OpenAI chat jobs with the engine deciding, and the worker on a load-balancing endpoint,
each round of each beside a round of `vllm serve` answering the same requests (native jobs: its
streamed chat), up through the run and idle while the worker works (--repeat pairs a row, the
first server alternating; ratios: the medians of the pairs'); then the floor (the SDK's job loop
with a constant handler, one round). Tok/s, the front process's CPU per 1,000 tokens (the
worker's main process; `vllm serve`'s API server), the whole tree's, TTFT p50/p95. --profile:
py-spy on the worker's main process through one more round of OpenAI chat jobs at c64, its
samples by place and its top functions. Then vLLM's app's stream to route jobs alone (no
engine, both on the engine's loop, as in the worker): that loop's CPU per SSE event; and the
POST row (--posts).

--posts: POSTs to the platform alone (ceiling.py): 4,000 POSTs of 1 KB, 64 at once, to a local
aiohttp server, through the SDK's aiohttp session and through the worker's Poster (the client
its results go out on), rounds alternated: the client loop thread's CPU per POST.

--startup: cold start instead (startup.py): a worker started twice on one "network volume"
directory, the phase table from its own start-up summaries.

Compare ratios within one run only: these machines are noisy, absolute figures are not
comparable between runs. --smoke runs every path at tiny sizes, the queue worker with its own
intake only (for CI: no figures asserted).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _run_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="worker-vllm-bench-"))


def _parser() -> argparse.ArgumentParser:
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
                        help="only the jobs-per-worker tables (admission.py, intake.py)")
    parser.add_argument("--loads", default="short,mixed,long,fast,ramp",
                        help="--admission: table A's loads (short, mixed, long), table D "
                             "(fast: jobs shorter than a round trip) and table E (ramp)")
    parser.add_argument("--no-first-message", action="store_true",
                        help="--admission: table A only")
    parser.add_argument("--batch", action="store_true",
                        help="only the batch-work table (batch.py)")
    parser.add_argument("--ceiling", action="store_true",
                        help="only the one-process ceiling table (ceiling.py)")
    parser.add_argument("--posts", action="store_true",
                        help="only the POST row: the client's CPU per POST to the platform")
    parser.add_argument("--startup", action="store_true",
                        help="only cold start, phase by phase (startup.py)")
    parser.add_argument("--eager", action="store_true",
                        help="--startup: ENFORCE_EAGER (no compilation)")
    parser.add_argument("--model", default=None,
                        help="--startup: model directory (default: the demo model)")
    parser.add_argument("--batch-lines", default="512,2000",
                        help="--batch: the batch sizes, comma-separated")
    parser.add_argument("--batch-tokens", type=int, default=64,
                        help="--batch: tokens per line")
    parser.add_argument("--profile", action="store_true",
                        help="--batch, --ceiling: where the worker's main process spends its "
                             "time (py-spy)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    return parser


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if args.profile and not (Path(sys.executable).with_name("py-spy")).exists():
        parser.error("--profile samples with py-spy: install it beside this Python first "
                     f"({Path(sys.executable).with_name('pip')} install py-spy)")
    if args.ceiling:
        import ceiling

        profile: dict[str, Any] | None = {} if args.profile else None
        ceiling.print_table(ceiling.rows(_run_dir(), args.smoke, args.repeat, profile=profile))
        if profile:
            ceiling.print_profile(profile)
        ceiling.print_relay(ceiling.relay_row(args.smoke))
        ceiling.print_posts(ceiling.posts_row(args.smoke))
    elif args.posts:
        import ceiling

        ceiling.print_posts(ceiling.posts_row(args.smoke))
    elif args.batch:
        import batch

        rtt = args.rtt_ms / 1000
        sizes = tuple(int(n) for n in args.batch_lines.split(","))
        batch.print_table(batch.rows(_run_dir(), args.smoke, rtt, sizes, args.batch_tokens,
                                     args.repeat, args.profile), rtt)
    elif args.admission:
        import admission
        import intake

        run_dir, kinds = _run_dir(), tuple(args.loads.split(","))
        kv = admission.kv_limited_rows(run_dir, args.smoke, args.repeat, kinds) \
            if {"short", "mixed", "long"} & set(kinds) else []
        first = [] if args.no_first_message else admission.first_message_rows(
            run_dir, args.smoke)
        admission.print_tables(kv, first, admission.intake_cost_rows(args.smoke))
        intake.print_tables(
            intake.fast_rows(run_dir, args.smoke, args.repeat) if "fast" in kinds else [],
            intake.ramp_rows(run_dir, args.smoke) if "ramp" in kinds else [])
    elif args.startup:
        import startup

        startup.run(args.model, args.eager)
    else:
        _in_process_and_full_path(args)


def _in_process_and_full_path(args: argparse.Namespace) -> None:
    import full_path
    import in_process

    if args.smoke:
        args.tokens, args.jobs, args.repeat = 8, 2, 1
        args.full_path, args.path_jobs, args.path_tokens = True, 4, 8
    table, raw = in_process.rows(args)
    in_process.print_table(table, args)
    if args.lb:
        full_path.print_table(raw + full_path.http_rows(args, _run_dir()), args)
    elif args.full_path:
        full_path.print_table(full_path.rows(args, raw), args)


if __name__ == "__main__":
    main()
