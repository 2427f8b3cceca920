"""Cold start, phase by phase: a worker started twice on one "network volume" directory.

    .venv/bin/python benchmarks/run.py --startup [--eager] [--model DIR]

Each start is a new worker process (local test mode, one short job) with BASE_PATH on the same
directory and a fresh temp dir of its own, as a new container with the volume attached. The
first start compiles; the second finds vLLM's compile cache on the volume. Prints the phase
table from the workers' own start-up summaries (STARTUP_SUMMARY_FILE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = json.dumps({"input": {"prompt": "x", "sampling_params": {"max_tokens": 4}}})


def start_once(volume: Path, model: str, eager: bool, label: str) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix=f"worker-vllm-start-{label.replace(' ', '-')}-"))
    summary = scratch / "startup.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_WEBHOOK")}
    env.update(
        MODEL_NAME=model, SERVED_MODEL_NAME="demo", BASE_PATH=str(volume),
        ENFORCE_EAGER="true" if eager else "false", MAX_MODEL_LEN="2048",
        KV_CACHE_MEMORY_BYTES="256M", STARTUP_SUMMARY_FILE=str(summary), HF_HUB_OFFLINE="1",
        # A new container: nothing of an earlier start outside the volume.
        TMPDIR=str(scratch), TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor"),
        TRITON_CACHE_DIR=str(scratch / "triton"), VLLM_RPC_BASE_PATH=str(scratch / "rpc"),
    )
    (scratch / "rpc").mkdir()
    env.pop("VLLM_CACHE_ROOT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "handler.py"), "--test_input",
                           JOB], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"start {label} failed:\n{proc.stderr[-3000:]}")
    return json.loads(summary.read_text())


def table(runs: list[tuple[str, dict]]) -> str:
    names: list[str] = []
    for _, s in runs:
        for key in [*s["phases"], *(f"vLLM: {k}" for k in s["vllm_phases"])]:
            if key not in names:
                names.append(key)

    def value(s: dict, key: str) -> str:
        if key.startswith("vLLM: "):
            v = s["vllm_phases"].get(key[6:])
        else:
            v = s["phases"].get(key)
        return "" if v is None else f"{v:.2f}"

    lines = ["| phase (s) | " + " | ".join(label for label, _ in runs) + " |",
             "| --- |" + " --- |" * len(runs)]
    lines += [f"| {key} | " + " | ".join(value(s, key) for _, s in runs) + " |"
              for key in names]
    lines.append("| **ready** | " + " | ".join(f"**{s['ready_seconds']:.2f}**"
                                              for _, s in runs) + " |")
    return "\n".join(lines)


def run(model: str | None, eager: bool) -> None:
    """Two starts on one volume (`model`: a model directory, default the demo model)."""
    sys.path.insert(0, str(ROOT / "src"))
    from worker_vllm.model.demo import ensure_demo_model

    model = model or str(ensure_demo_model())
    volume = Path(tempfile.mkdtemp(prefix="worker-vllm-volume-"))
    runs = [(label, start_once(volume, model, eager, label))
            for label in ("first start", "second start")]
    print(table(runs))
    print(f"\nvLLM cache on the volume: {runs[0][1].get('vllm_cache')}")
