"""Every user-facing setting as one flat list, derived from the declarations; the deploy
generator's data (which engine settings the forms feature, their groups and labels).

Worker settings come from `worker_vllm.config.settings.WorkerSettings`; engine and server
settings are every `vllm serve` flag, with vLLM's own help text, presented first where
`ENGINE_SETTINGS` (below) features them. The deploy artefacts (worker-config.json,
.runpod/hub.json) and docs/configuration.md are generated from this list by
scripts/generate_deploy_files.py. The worker itself never reads this module.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from worker_vllm.config.serve_env import LB_SERVER_FLAGS
from worker_vllm.config.settings import ALIASES, WorkerSettings
from worker_vllm.engine import Flag, serve_flags

VLLM_GROUP = "vLLM engine and serving"


@dataclass(frozen=True)
class SettingInfo:
    env: str
    kind: str  # "str" | "int" | "float" | "bool"
    default: Any  # what applies when unset
    description: str
    group: str
    advanced: bool = False
    options: tuple[str, ...] = ()
    secret: bool = False
    # The value the deploy forms start with: a vLLM flag starts empty ("" = vLLM's default).
    form_value: Any = None
    flag: str | None = None  # the `vllm serve` flag it sets
    front_end: str | None = None  # "queue" or "lb" when only that front-end reads it


def _kind(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0] if len(args) == 1 else annotation
    for kind, cls in (("bool", bool), ("int", int), ("float", float)):
        if annotation is cls:
            return kind
    return "str"


def worker_settings() -> list[SettingInfo]:
    out = []
    for name, field in WorkerSettings.model_fields.items():
        extra = field.json_schema_extra or {}
        assert isinstance(extra, dict)
        secret = field.annotation is not None and SecretStr in typing.get_args(field.annotation)
        out.append(SettingInfo(
            env=name.upper(), kind=_kind(field.annotation), default=field.default,
            description=field.description or "", group=str(extra["group"]),
            advanced=bool(extra.get("advanced", False)), secret=secret,
            options=tuple(extra.get("options", ())),  # type: ignore[arg-type]
            form_value=None if secret else field.default,
            front_end=extra.get("front_end"),  # type: ignore[arg-type]
        ))
    return out


def _flag_kind(flag: Flag) -> str:
    if flag.kind in ("bool", "switch"):
        return "bool"
    if isinstance(flag.default, bool):
        return "bool"
    return {int: "int", float: "float"}.get(type(flag.default), "str")


def _flag_info(env: str, flag: Flag, group: str, description: str, advanced: bool,
               options: tuple[str, ...] = ()) -> SettingInfo:
    return SettingInfo(env=env, kind=_flag_kind(flag), default=flag.default,
                       description=description, group=group, advanced=advanced,
                       options=options or flag.choices, flag=flag.option)


def engine_settings(with_help: bool = True) -> list[SettingInfo]:
    """The featured `vllm serve` settings first, then every other flag (advanced)."""
    owned = {s.env for s in worker_settings()}
    flags = {f.env: f for f in serve_flags(with_help) if not f.server_only and f.env not in owned}
    out = []
    for env, meta in ENGINE_SETTINGS.items():
        flag = flags[ALIASES.get(env, env)]
        info = _flag_info(env, flag, meta.group, meta.description, meta.advanced, meta.options)
        if env == "MODEL_NAME":  # vLLM's default model is no sensible default for a worker
            info = dataclasses.replace(info, default=None)
        out.append(info)
    featured = {ALIASES.get(env, env) for env in ENGINE_SETTINGS}
    for env, flag in flags.items():
        if env not in featured:
            out.append(_flag_info(env, flag, VLLM_GROUP, flag.help, True))
    return out


LB_SERVER_GROUP = "HTTP server (load-balancing endpoints)"


def lb_server_settings(with_help: bool = True) -> list[SettingInfo]:
    """The `vllm serve` HTTP-server flags a load-balancing worker honours."""
    return [_flag_info(f.env, f, LB_SERVER_GROUP, f.help, f.env not in LB_FEATURED)
            for f in serve_flags(with_help) if f.env in LB_SERVER_FLAGS]


# Shown first in the load-balancing form (the rest are advanced).
LB_FEATURED = {"API_KEY", "ALLOWED_ORIGINS", "DISABLE_UVICORN_ACCESS_LOG"}


def all_settings(with_help: bool = True) -> list[SettingInfo]:
    lb = [dataclasses.replace(s, front_end="lb") for s in lb_server_settings(with_help)]
    return engine_settings(with_help) + worker_settings() + lb


def server_only_flags() -> list[Flag]:
    """`vllm serve` flags of its own HTTP server that no worker reads (the platform's
    business: TLS, sockets, process layout)."""
    return [f for f in serve_flags() if f.server_only and f.env not in LB_SERVER_FLAGS]


# Env vars of other software that the worker reads or sets; not settings of its own.
FOREIGN_ENV: dict[str, str] = {
    "RUNPOD_WEBHOOK_GET_JOB": "set by the platform; its presence means production",
    "RUNPOD_POD_ID": "the platform's worker id",
    "RUNPOD_LOG_LEVEL": "the runpod SDK's log level; the worker's too (default INFO)",
    "HF_HUB_OFFLINE": "huggingface_hub's offline switch: use the cache, fetch nothing",
    "XDG_CACHE_HOME": "base of the demo model's cache",
    "VLLM_CACHE_ROOT": "vLLM's cache directory (compile caches); set under BASE_PATH",
    "VLLM_LOGGING_STREAM": "vLLM's log stream; the worker sends it to stderr",
    "HF_XET_HIGH_PERFORMANCE": "huggingface_hub's high-throughput transfer; on by default",
    "PORT_HEALTH": "set by the platform on load-balancing endpoints: the port of /ping "
                   "(default PORT)",
    "HEALTH_CHECK_PATH": "the platform's health-check path on load-balancing endpoints "
                         "(default /ping; /ping keeps answering too)",
}

# Local development only (not shown in the deploy forms).
DEV_ENV: dict[str, str] = {
    "WORKER_VLLM_CACHE": "Directory where the demo model is built and cached "
                         "(default: ~/.cache/worker-vllm).",
}


@dataclass(frozen=True)
class EngineSetting:
    """Presentation metadata for an engine arg shown in the deploy forms and docs."""

    group: str
    description: str
    advanced: bool = False
    options: tuple[str, ...] = ()


ENGINE_SETTINGS: dict[str, EngineSetting] = {
    "MODEL_NAME": EngineSetting(
        "Model", "Hugging Face model id or local directory of the model to serve."
    ),
    "MODEL_REVISION": EngineSetting("Model", "Model branch, tag or commit.", advanced=True),
    "TOKENIZER_NAME": EngineSetting(
        "Model", "Tokenizer id or directory, when it differs from the model.", advanced=True
    ),
    "TOKENIZER_REVISION": EngineSetting("Model", "Tokenizer revision.", advanced=True),
    "MAX_MODEL_LEN": EngineSetting("Model", "Context length (prompt + output tokens)."),
    "DTYPE": EngineSetting(
        "Model", "Weights and activations dtype.",
        options=("auto", "half", "float16", "bfloat16", "float", "float32"), advanced=True,
    ),
    "QUANTIZATION": EngineSetting(
        "Model", "Quantization method of the weights (awq, gptq, fp8, ...).", advanced=True
    ),
    "TRUST_REMOTE_CODE": EngineSetting(
        "Model", "Allow the model repository's own Python code.", advanced=True
    ),
    "TENSOR_PARALLEL_SIZE": EngineSetting(
        "Parallelism", "GPUs to split the model over; default: all visible GPUs."
    ),
    "PIPELINE_PARALLEL_SIZE": EngineSetting(
        "Parallelism", "Pipeline stages (multi-node with Ray).", advanced=True
    ),
    "GPU_MEMORY_UTILIZATION": EngineSetting(
        "Memory", "Fraction of GPU memory vLLM may use (weights + KV cache).", advanced=True
    ),
    "MAX_NUM_SEQS": EngineSetting("Memory", "Most sequences in one engine step.", advanced=True),
    "ENABLE_PREFIX_CACHING": EngineSetting(
        "Memory", "Reuse the KV cache of shared prompt prefixes.", advanced=True
    ),
    "REASONING_PARSER": EngineSetting(
        "OpenAI", "vLLM reasoning parser (deepseek_r1, qwen3, ...): separates reasoning from "
        "the answer.", advanced=True,
    ),
    "ENABLE_LORA": EngineSetting("OpenAI", "Enable LoRA adapters (on when LORA_MODULES is set).",
                                 advanced=True),
    "MAX_LORA_RANK": EngineSetting("OpenAI", "Largest LoRA rank served.", advanced=True),
    "ENFORCE_EAGER": EngineSetting(
        "Memory", "Skip CUDA graphs / compilation (faster start, slower steps).", advanced=True
    ),
    "OPENAI_SERVED_MODEL_NAME_OVERRIDE": EngineSetting(
        "OpenAI", "Model name clients use (in `model` and /v1/models) instead of MODEL_NAME "
        "(SERVED_MODEL_NAME takes several names)."
    ),
    "OPENAI_RESPONSE_ROLE": EngineSetting("OpenAI", "Role of the generated chat message.",
                                          advanced=True),
    "CUSTOM_CHAT_TEMPLATE": EngineSetting(
        "OpenAI", "Jinja chat template (inline, or a file path) replacing the model's, for "
        "both routes.", advanced=True,
    ),
    "ENABLE_AUTO_TOOL_CHOICE": EngineSetting(
        "OpenAI", "Let the model decide to call tools (needs TOOL_CALL_PARSER)."
    ),
    "TOOL_CALL_PARSER": EngineSetting(
        "OpenAI", "vLLM tool-call parser for the model family (hermes, llama3_json, mistral, "
        "...)."
    ),
    "LORA_MODULES": EngineSetting(
        "OpenAI", 'LoRA adapters served by name: a JSON list (or one object) of {"name", '
        '"path", "base_model_name"}, or name=path pairs; select one with `model`.',
        advanced=True,
    ),
}
