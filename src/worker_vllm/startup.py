"""Start-up: settings -> engine args -> model -> engine -> warm-up, before any job is taken."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from . import demo_model, model_loader
from .engine_config import (
    ConfigError,
    EngineArgsSpec,
    near_miss_warnings,
    redacted,
    resolve_engine_args,
)
from .errors import WorkerError
from .openai_options import parse_lora_modules, serving_cli_args
from .process_tree import exit_now
from .settings import WorkerSettings, is_unset, load_worker_settings
from .vllm_adapter import EngineRunner, OpenAIServing, make_sampling_params
from .worker import Worker

log = logging.getLogger(__name__)


class StartupError(WorkerError):
    type = "startup_error"
    code = 500


def startup_error(exc: BaseException) -> StartupError:
    """The error every job reports when start-up failed: the cause, no traceback."""
    if isinstance(exc, WorkerError):
        return StartupError(f"The worker could not start: {exc.message}")
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return StartupError(f"The worker could not start: {type(exc).__name__}"
                        + (f": {detail}" if detail else "") + " (see the worker log)")


def startup_failure_action(env: Mapping[str, str]) -> str:
    """ON_STARTUP_ERROR; read on its own when the settings themselves are what failed."""
    try:
        return load_worker_settings(dict(env)).on_startup_error
    except WorkerError:
        pass
    raw = env.get("ON_STARTUP_ERROR")
    return "exit" if not is_unset(raw) and str(raw).strip().lower() == "exit" else "fail_jobs"


def is_production(env: Mapping[str, str]) -> bool:
    """The platform's job-take webhook is only set on RunPod."""
    return bool(env.get("RUNPOD_WEBHOOK_GET_JOB"))


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _apply_defaults(spec: EngineArgsSpec, env: Mapping[str, str]) -> None:
    if not spec.is_set("model"):
        if is_production(env):
            raise ConfigError("MODEL_NAME is not set: set it to a Hugging Face model id or path")
        path = demo_model.ensure_demo_model()
        log.info("MODEL_NAME is not set: serving the built-in demo model %s (random weights, "
                 "gibberish text; for trying the worker locally)", demo_model.DEMO_MODEL_ID)
        spec.set("model", str(path), "demo")
        spec.set("served_model_name", [demo_model.DEMO_MODEL_ID], "demo")
        for name, value in demo_model.ENGINE_DEFAULTS.items():
            if not spec.is_set(name):
                spec.set(name, value, "demo")
    gpus = _visible_gpus()
    if gpus == 0 and not spec.is_set("dtype"):
        # bfloat16 on CPU can die with SIGILL on AMX machines; float32 always works.
        spec.set("dtype", "float32", "cpu default")
    if gpus > 1 and not spec.is_set("tensor_parallel_size"):
        spec.set("tensor_parallel_size", gpus, "visible GPUs")


def _resolve_model(spec: EngineArgsSpec, settings: WorkerSettings) -> None:
    """Turn hub ids into local paths; the served name stays the user's id."""
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    model = str(spec.values["model"])
    path = model_loader.resolve(
        model, revision=spec.values.get("revision"), token=token, base_path=settings.base_path
    )
    if str(path) != model:
        if not spec.is_set("served_model_name"):
            spec.set("served_model_name", [model], spec.sources["model"])
        spec.set("model", str(path), spec.sources["model"])
        # The snapshot is already at the requested revision.
        spec.values.pop("revision", None)
    tokenizer = spec.values.get("tokenizer")
    if tokenizer:
        tok_path = model_loader.resolve(
            str(tokenizer), revision=spec.values.get("tokenizer_revision"), token=token,
            base_path=settings.base_path, weights=False,
        )
        spec.set("tokenizer", str(tok_path), spec.sources["tokenizer"])
        spec.values.pop("tokenizer_revision", None)


def _apply_openai_settings(spec: EngineArgsSpec, settings: WorkerSettings) -> None:
    if settings.openai_served_model_name_override:
        spec.set("served_model_name", [settings.openai_served_model_name_override],
                 "OPENAI_SERVED_MODEL_NAME_OVERRIDE")
    if parse_lora_modules(settings.lora_modules) and not spec.is_set("enable_lora"):
        spec.set("enable_lora", True, "LORA_MODULES")


def engine_args(env: Mapping[str, str], settings: WorkerSettings) -> dict[str, Any]:
    for warning in near_miss_warnings(env):
        log.warning(warning)
    spec = resolve_engine_args(env, settings)
    _apply_openai_settings(spec, settings)
    _apply_defaults(spec, env)
    _resolve_model(spec, settings)
    shown = {k: f"{v!r} ({spec.sources[k]})" for k, v in redacted(spec.values).items()}
    log.info("Engine args: %s", ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    log.info("Worker settings: %s", settings.model_dump(mode="json", exclude={"hf_token"}))
    return dict(spec.values)


async def warm_up(runner: EngineRunner) -> None:
    if "generate" not in await runner.supported_tasks():
        return  # a pooling model: its first request has no lazy set-up worth warming
    params = make_sampling_params({"max_tokens": 2, "ignore_eos": True}, stream=False)
    prompt = {"prompt_token_ids": runner.get_tokenizer().encode("A short warm-up request.")}
    async for _ in runner.generate(prompt, params, "warmup"):
        pass


def exit_when_engine_dies(runner: EngineRunner, settings: WorkerSettings,
                          grace: float = 3.0) -> None:
    """A dead engine must not leave a worker that keeps taking jobs: exit so it is replaced."""

    def on_dead(reason: str) -> None:
        log.error("The vLLM engine died (%s); exiting in %.0f s so the platform replaces the "
                  "worker", reason, grace)
        threading.Timer(grace, exit_now, args=(1,)).start()

    runner.watch(on_dead, probe_every=settings.engine_probe_interval_s,
                 probe_timeout=settings.engine_probe_timeout_s)


def build_worker(env: Mapping[str, str] | None = None) -> Worker:
    env = os.environ if env is None else env
    settings = load_worker_settings(dict(env))
    args = engine_args(env, settings)
    runner = EngineRunner(args)
    # Built before the job loop, so concurrent first requests cannot race to build them.
    openai = OpenAIServing.create(runner, str(args["model"]), serving_cli_args(settings, args))
    if settings.warmup:
        asyncio.run(warm_up(runner))
        log.info("Engine warmed up; ready for jobs")
    return Worker(runner, settings, openai)
