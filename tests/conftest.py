"""Shared fixtures: ONE real vLLM engine (CPU build, demo model, float32) per test session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Per-run socket dir for vLLM's ZeroMQ files; the demo model is cached across runs.
_RUN_DIR = Path(tempfile.mkdtemp(prefix="worker-vllm-tests-"))
os.environ.setdefault("VLLM_RPC_BASE_PATH", str(_RUN_DIR / "rpc"))
Path(os.environ["VLLM_RPC_BASE_PATH"]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def worker_env(**extra: str) -> dict[str, str]:
    """Env for a worker process under test: local, offline, no platform."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_WEBHOOK")}
    env.update(HF_HUB_OFFLINE="1", RUNPOD_LOG_LEVEL="INFO", **extra)
    return env


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from worker_vllm.model.demo import ensure_demo_model

    return ensure_demo_model()


LORA_NAME = "tiny-lora"


@pytest.fixture(scope="session")
def lora_dir(demo_model_dir: Path) -> Path:
    from lora_adapter import build_lora_adapter

    return build_lora_adapter(_RUN_DIR / "lora", demo_model_dir)


@pytest.fixture(scope="session")
def worker(demo_model_dir: Path, lora_dir: Path) -> Iterator[Any]:
    import json

    from helpers import job_handler

    env = worker_env(BAKED_ARGS_FILE=str(_RUN_DIR / "no-baked-args.json"),
                     LORA_MODULES=json.dumps([{"name": LORA_NAME, "path": str(lora_dir)}]),
                     TOOL_CALL_PARSER="pythonic", ENABLE_AUTO_TOOL_CHOICE="true")
    env.pop("MODEL_NAME", None)
    with job_handler(env) as w:
        yield w


async def collect(worker: Any, job_input: dict[str, Any], job_id: str = "test-job") -> list[Any]:
    return [item async for item in worker.handle({"id": job_id, "input": job_input})]


async def aiter_list(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item
