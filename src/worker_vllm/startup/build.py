"""The core: settings -> engine args -> model -> engine and vLLM's app -> warm-up.

Both front-ends (the job queue, load-balancing HTTP) start from `build_core`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker_vllm.config.serve_env import (
    ServeConfig,
    describe,
    near_miss_warnings,
    resolve,
    server_only_warnings,
)
from worker_vllm.config.settings import WorkerSettings, load_worker_settings
from worker_vllm.engine import (
    EngineCoreLog,
    EngineRunner,
    LoopThread,
    VLLMApp,
    cache_key,
    chat_template_text,
    engine_args_from,
    make_sampling_params,
)
from worker_vllm.errors import ConfigError
from worker_vllm.model import demo as demo_model
from worker_vllm.model import loader as model_loader
from worker_vllm.process_tree import note_descendants
from worker_vllm.startup.errors import StartupFailure
from worker_vllm.startup.phases import StartupPhases

log = logging.getLogger(__name__)


def is_production(env: Mapping[str, str]) -> bool:
    """The platform's job-take webhook is only set on RunPod."""
    return bool(env.get("RUNPOD_WEBHOOK_GET_JOB"))


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _apply_defaults(config: ServeConfig, env: Mapping[str, str]) -> None:
    """The worker's defaults, for what no source set."""
    args = config.args
    if not args.model or not config.is_set("model"):
        if is_production(env):
            raise ConfigError("MODEL_NAME is not set: set it to a Hugging Face model id or path")
        path = demo_model.ensure_demo_model()
        log.info("MODEL_NAME is not set: serving the built-in demo model %s (random weights, "
                 "gibberish text; for trying the worker locally)", demo_model.DEMO_MODEL_ID)
        config.set("model", str(path), "demo")
        config.set("served_model_name", [demo_model.DEMO_MODEL_ID], "demo")
        for name, value in demo_model.ENGINE_DEFAULTS.items():
            if not config.is_set(name):
                config.set(name, value, "demo")
    gpus = _visible_gpus()
    if gpus == 0 and not config.is_set("dtype"):
        # bfloat16 on CPU can die with SIGILL on AMX machines; float32 always works.
        config.set("dtype", "float32", "cpu default")
    if gpus > 1 and not config.is_set("tensor_parallel_size"):
        config.set("tensor_parallel_size", gpus, "visible GPUs")
    if args.lora_modules and not config.is_set("enable_lora"):
        config.set("enable_lora", True, "LORA_MODULES")


def _resolve_model(config: ServeConfig, settings: WorkerSettings,
                   note: Callable[[str, object], None] | None = None) -> None:
    """Turn hub ids into local paths; the served name stays the user's id. `note("download",
    figures)` is told of a download."""
    args = config.args
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    model = str(args.model)
    with _naming(config, "model", model):
        path = model_loader.resolve(model, revision=args.revision, token=token,
                                    base_path=settings.base_path,
                                    on_download=note and (lambda d: note("download", d)))
    if str(path) != model:
        if not args.served_model_name:
            config.set("served_model_name", [model], config.sources["model"])
        config.set("model", str(path), config.sources["model"])
        config.set("revision", None, "downloaded")  # the snapshot is at that revision
    if args.tokenizer:
        with _naming(config, "tokenizer", str(args.tokenizer)):
            tok_path = model_loader.resolve(str(args.tokenizer),
                                            revision=args.tokenizer_revision, token=token,
                                            base_path=settings.base_path, weights=False)
        config.set("tokenizer", str(tok_path), config.sources.get("tokenizer", "env"))
        config.set("tokenizer_revision", None, "downloaded")


@contextlib.contextmanager
def _naming(config: ServeConfig, dest: str, value: str) -> Iterator[None]:
    """A model that cannot be resolved names the setting it came from."""
    try:
        yield
    except model_loader.ModelLoadError as exc:
        setting = config.sources.get(dest, dest.upper())
        raise model_loader.ModelLoadError(f"{setting}={value!r}: {exc.message}") from None


def serve_config(env: Mapping[str, str], settings: WorkerSettings,
                 phases: StartupPhases | None = None,
                 server: frozenset[str] = frozenset()) -> ServeConfig:
    """The parsed `vllm serve` arguments the engine and the serving layer are built from
    (with the HTTP-server flags named in `server`)."""
    for warning in near_miss_warnings(env) + server_only_warnings(env, server):
        log.warning(warning)
    config = resolve(env, settings, server)
    for warning in config.warnings:
        log.warning(warning)
    _apply_defaults(config, env)
    _resolve_model(config, settings, phases.details.__setitem__ if phases else None)
    log.info("vLLM settings (besides vLLM's defaults): %s", describe(config))
    log.info("Worker settings: %s", settings.model_dump(mode="json", exclude={"hf_token"}))
    return config


async def warm_up(runner: EngineRunner) -> None:
    if "generate" not in await runner.supported_tasks():
        return  # a pooling model: its first request has no lazy set-up worth warming
    params = make_sampling_params({"max_tokens": 2, "ignore_eos": True}, stream=False)
    prompt = {"prompt_token_ids": runner.get_tokenizer().encode("A short warm-up request.")}
    async for _ in runner.generate(prompt, params, "warmup"):
        pass


def _use_volume_cache(settings: WorkerSettings, env: Mapping[str, str],
                      phases: StartupPhases) -> None:
    cache = use_volume_cache(settings, env)
    if cache:
        log.info("vLLM's cache: %s", cache)
        phases.details["vllm_cache"] = cache


def use_volume_cache(settings: WorkerSettings, env: Mapping[str, str]) -> str | None:
    """vLLM's cache (compiled graphs and more) on the network volume, keyed by vLLM version
    and device, so a new worker reuses what an earlier one compiled on the same GPU."""
    if env.get("VLLM_CACHE_ROOT") or not Path(settings.base_path).is_dir():
        return None
    root = Path(settings.base_path) / "vllm-cache" / cache_key()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("Cannot use %s for vLLM's cache: %s", root, exc)
        return None
    os.environ["VLLM_CACHE_ROOT"] = str(root)
    return str(root)


@dataclass
class Core:
    """What both front-ends serve: the settings, the engine and vLLM's app on it."""

    settings: WorkerSettings
    # The parsed `vllm serve` arguments everything was built from.
    args: Any
    runner: EngineRunner
    app: VLLMApp
    # The --chat-template text (read once from a file if it named one).
    chat_template: str | None

    closers: list[Callable[[], object]] = field(default_factory=list)

    def on_close(self, closer: Callable[[], object]) -> None:
        """Run `closer` first when the core closes (what a front-end started on it)."""
        self.closers.append(closer)

    def close(self) -> None:
        """Shut the engine down."""
        for closer in self.closers:
            closer()
        self.runner.shutdown()


def build_core(env: Mapping[str, str] | None = None, *, read_engine_log: bool = False,
               phases: StartupPhases | None = None, loop: LoopThread | None = None,
               server: frozenset[str] = frozenset()) -> Core:
    """The engine warmed up and vLLM's app on it; any failure is a StartupFailure.
    `read_engine_log` picks vLLM's own phase figures (and, on failure, its reason) out of this
    process's stderr (for a worker process, not for a test harness). `loop`: the loop thread
    the engine is to share with an HTTP server; `server`: the `vllm serve` HTTP-server flags
    that server honours."""
    env = os.environ if env is None else env
    phases = phases or StartupPhases()
    engine_log = EngineCoreLog()
    config = None
    try:
        with phases.phase("settings"):
            settings = load_worker_settings(dict(env))
            _use_volume_cache(settings, env, phases)
            config = serve_config(env, settings, phases, server)
        if read_engine_log:
            engine_log.start()
        core = _start_engine(config, settings, phases, loop)
    except Exception as exc:
        raise StartupFailure(exc, config, engine_log.root_cause) from exc
    note_descendants()  # vLLM's engine processes: ended at exit whoever their parent is
    time.sleep(0.2)  # let the last engine log lines pass the copy
    phases.ready(engine_log.snapshot(), settings.startup_summary_file)
    return core


def _start_engine(config: ServeConfig, settings: WorkerSettings, phases: StartupPhases,
                  loop: LoopThread | None) -> Core:
    with phases.phase("engine (load, profile, compile, KV cache)"):
        runner = EngineRunner(engine_args_from(config.args), loop)
    # Built before any job or request, so concurrent first requests cannot race to build
    # them; from the same parsed arguments as the engine.
    with phases.phase("vLLM's app (OpenAI and other routes)"):
        app = VLLMApp.create(runner, config.args)
    core = Core(settings, config.args, runner, app,
                chat_template_text(config.args.chat_template))
    if settings.warmup:
        with phases.phase("warm-up request"):
            asyncio.run(warm_up(runner))
    with phases.phase("vLLM's app lifespan (stats log, frozen start-up heap)"):
        entered: concurrent.futures.Future[None] = concurrent.futures.Future()
        core.on_close(runner.loop.submit(_vllm_lifespan(app, entered)).cancel)
        entered.result(timeout=120)
    return core


async def _vllm_lifespan(app: VLLMApp, entered: concurrent.futures.Future[None]) -> None:
    """vLLM's app lifespan, as `vllm serve` runs it, for the life of the core: vLLM's stats
    in the log every VLLM_LOG_STATS_INTERVAL seconds, and the start-up heap frozen out of the
    garbage collector's reach (a full collection of this process's heap otherwise stops both
    the engine's loop and the job loop for half a second)."""
    try:
        async with app.lifespan():
            entered.set_result(None)
            await asyncio.Event().wait()
    except BaseException as error:  # start-up waits on `entered`: hand it the failure
        if not entered.done():
            entered.set_exception(error)
        raise
