"""Start-up: settings -> engine args -> model -> engine -> warm-up, before any job is taken."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from worker_vllm.config.serve_env import (
    ConfigError,
    ServeConfig,
    describe,
    near_miss_warnings,
    resolve,
    server_only_warnings,
)
from worker_vllm.config.settings import WorkerSettings, is_unset, load_worker_settings
from worker_vllm.engine import (
    EngineLogPhases,
    EngineRunner,
    VLLMApp,
    cache_key,
    chat_template_text,
    engine_args_from,
    make_sampling_params,
)
from worker_vllm.errors import WorkerError
from worker_vllm.jobs.dispatch import Worker
from worker_vllm.model import demo as demo_model
from worker_vllm.model import loader as model_loader
from worker_vllm.process_tree import exit_now
from worker_vllm.startup.errors import StartupError, explain
from worker_vllm.startup.phases import StartupPhases

log = logging.getLogger(__name__)


# vLLM's engine processes report the root cause of a failed start only in their log.
ENGINE_LOG = EngineLogPhases()


class SettingsInUse(Exception):
    """A start-up failure after the settings were parsed, with where each came from (so the
    error can name the env var behind the field vLLM complains about)."""

    def __init__(self, cause: BaseException, config: ServeConfig) -> None:
        super().__init__(str(cause))
        self.cause, self.sources = cause, dict(config.sources)
        self.values = {dest: getattr(config.args, dest, None) for dest in config.sources}


def startup_error(exc: BaseException) -> StartupError:
    """The error every job reports when start-up failed: vLLM's reason and the setting."""
    if isinstance(exc, SettingsInUse):
        return explain(exc.cause, exc.sources, ENGINE_LOG.root_cause, exc.values)
    return explain(exc, None, ENGINE_LOG.root_cause)


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


def _resolve_model(config: ServeConfig, settings: WorkerSettings) -> None:
    """Turn hub ids into local paths; the served name stays the user's id."""
    args = config.args
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    model = str(args.model)
    with _naming(config, "model", model):
        path = model_loader.resolve(model, revision=args.revision, token=token,
                                    base_path=settings.base_path)
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


def serve_config(env: Mapping[str, str], settings: WorkerSettings) -> ServeConfig:
    """The parsed `vllm serve` arguments the engine and the serving layer are built from."""
    for warning in near_miss_warnings(env) + server_only_warnings(env):
        log.warning(warning)
    config = resolve(env, settings)
    for warning in config.warnings:
        log.warning(warning)
    _apply_defaults(config, env)
    _resolve_model(config, settings)
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


def exit_when_engine_dies(runner: EngineRunner, settings: WorkerSettings,
                          first: Callable[[str], None] | None = None,
                          grace: float = 2.0) -> Callable[[str], None]:
    """A dead engine must not leave a worker that keeps taking jobs: once the engine is known
    dead (the watchdog's verdict, or a job that found it so) `first(reason)` runs (it closes
    the job intake) and the process exits with code 1 within `grace` seconds, so the
    platform replaces it. Returns the function that reports a death."""
    lock = threading.Lock()
    reported: list[str] = []

    def on_dead(reason: str) -> None:
        with lock:
            if reported:
                return
            reported.append(reason)
        log.error("The vLLM engine died (%s); this worker takes no more jobs and exits within "
                  "%.0f s so the platform replaces it", reason, grace)
        timer = threading.Timer(grace, exit_now, args=(1,))
        timer.daemon = True
        timer.start()
        if first is not None:
            first(reason)

    runner.watch(on_dead, probe_every=settings.engine_probe_interval_s,
                 probe_timeout=settings.engine_probe_timeout_s)
    return on_dead


def job_concurrency(settings: WorkerSettings, runner: EngineRunner) -> int:
    """MAX_CONCURRENCY, or what the engine can run at once without preempting: the smaller of
    its sequence limit and the sequences of a full context its KV cache holds."""
    max_num_seqs, kv_tokens = runner.capacity()
    if settings.max_concurrency is not None:
        log.info("Job concurrency: %d (MAX_CONCURRENCY; the engine runs up to %d sequences, "
                 "its KV cache holds %d tokens)", settings.max_concurrency, max_num_seqs,
                 kv_tokens)
        return settings.max_concurrency
    full_contexts = kv_tokens // runner.max_model_len
    concurrency = max(1, min(max_num_seqs, full_contexts))
    log.info("Job concurrency: %d, from the engine's capacity (MAX_NUM_SEQS=%d; the KV cache "
             "holds %d tokens = %d sequences of MAX_MODEL_LEN=%d); set MAX_CONCURRENCY to "
             "override", concurrency, max_num_seqs, kv_tokens, full_contexts,
             runner.max_model_len)
    return concurrency


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


def build_worker(env: Mapping[str, str] | None = None, *,
                 read_engine_log: bool = False) -> Worker:
    """The worker, its engine warmed up. `read_engine_log` picks vLLM's own phase figures out
    of this process's stderr (for a worker process, not for a test harness)."""
    env = os.environ if env is None else env
    phases = StartupPhases()
    engine_log = ENGINE_LOG
    with phases.phase("settings"):
        settings = load_worker_settings(dict(env))
        cache = use_volume_cache(settings, env)
        if cache:
            log.info("vLLM's cache: %s", cache)
            phases.details["vllm_cache"] = cache
        config = serve_config(env, settings)
    if model_loader.last_download:
        phases.details["download"] = dict(model_loader.last_download)
    if read_engine_log:
        engine_log.start()
    try:
        with phases.phase("engine (load, profile, compile, KV cache)"):
            runner = EngineRunner(engine_args_from(config.args))
        # Built before the job loop, so concurrent first requests cannot race to build them;
        # from the same parsed arguments as the engine.
        with phases.phase("vLLM's app (OpenAI and other routes)"):
            app = VLLMApp.create(runner, config.args)
        chat_template = chat_template_text(config.args.chat_template)
    except Exception as exc:
        raise SettingsInUse(exc, config) from exc
    if settings.warmup:
        with phases.phase("warm-up request"):
            asyncio.run(warm_up(runner))
    time.sleep(0.2)  # let the last engine log lines pass the copy
    phases.ready(engine_log.snapshot(), settings.startup_summary_file)
    return Worker(runner, settings, app, chat_template, job_concurrency(settings, runner))
