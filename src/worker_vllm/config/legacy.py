"""Settings that worker-vllm users have in their endpoints but `vllm serve` no longer has.

Each is mapped to what replaced it, or, when nothing did and the value differs from the
default worker-vllm's forms sent, named in one start-up warning. Nothing set to a non-default
value is ignored silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker_vllm.config.settings import is_unset, parse_bool
from worker_vllm.errors import ConfigError


@dataclass(frozen=True)
class Removed:
    """A removed setting: the values worker-vllm's forms sent by default, and what to use."""

    defaults: tuple[str, ...]
    instead: str


REMOVED: dict[str, Removed] = {
    "GUIDED_DECODING_BACKEND": Removed(("outlines", "auto", "xgrammar"),
                                       "STRUCTURED_OUTPUTS_CONFIG, e.g. {\"backend\": \"...\"}"),
    "SWAP_SPACE": Removed(("4",), "nothing: vLLM's V1 engine has no CPU swap space"),
    "MAX_SEQ_LEN_TO_CAPTURE": Removed(("8192",), "COMPILATION_CONFIG's "
                                      "max_cudagraph_capture_size"),
    "PREEMPTION_MODE": Removed(("",), "nothing: V1 always preempts by recomputation"),
    "PREEMPTION_CHECK_PERIOD": Removed(("1.0", "1"), "nothing"),
    "PREEMPTION_CPU_CAPACITY": Removed(("2",), "nothing"),
    "NUM_LOOKAHEAD_SLOTS": Removed(("0",), "SPECULATIVE_CONFIG"),
    "USE_V2_BLOCK_MANAGER": Removed(("false",), "nothing: there is one block manager"),
    "TOKENIZER_POOL_SIZE": Removed(("0",), "nothing: tokenization runs in the API process"),
    "TOKENIZER_POOL_TYPE": Removed(("ray",), "nothing"),
    "TOKENIZER_POOL_EXTRA_CONFIG": Removed(("",), "nothing"),
    "QUANTIZATION_PARAM_PATH": Removed(("",), "nothing: KV-cache scales come from the "
                                       "checkpoint"),
    "LORA_EXTRA_VOCAB_SIZE": Removed(("256",), "nothing"),
    "LONG_LORA_SCALING_FACTORS": Removed(("",), "nothing"),
    "DEVICE": Removed(("auto",), "nothing: the platform is detected"),
    "SCHEDULER_DELAY_FACTOR": Removed(("0", "0.0"), "nothing"),
    "SPEC_DECODING_ACCEPTANCE_METHOD": Removed(("rejection_sampler",), "SPECULATIVE_CONFIG"),
    "TYPICAL_ACCEPTANCE_SAMPLER_POSTERIOR_THRESHOLD": Removed(("",), "SPECULATIVE_CONFIG"),
    "TYPICAL_ACCEPTANCE_SAMPLER_POSTERIOR_ALPHA": Removed(("",), "SPECULATIVE_CONFIG"),
    "DISABLE_LOGGING_REQUEST": Removed(("false",), "ENABLE_LOG_REQUESTS"),
    "CUDA_GRAPH_SIZES": Removed(("",), "COMPILATION_CONFIG's cudagraph_capture_sizes"),
    "DISABLE_FRONTEND_MULTIPROCESSING": Removed(("false",), "nothing"),
    "DISABLE_MM_PREPROCESSOR_CACHE": Removed(("false",), "MM_PROCESSOR_CACHE_GB=0"),
    "ENABLE_LORA_BIAS": Removed(("false",), "nothing"),
    "LOGITS_PROCESSOR_PATTERN": Removed(("",), "LOGITS_PROCESSORS"),
    "OVERRIDE_POOLER_CONFIG": Removed(("",), "POOLER_CONFIG"),
    "TASK": Removed(("auto", "generate"), "RUNNER (generate, pooling) and CONVERT"),
    "NUM_REDUNDANT_EXPERTS": Removed(("0",), "EPLB_CONFIG"),
    "MAX_NUM_PARTIAL_PREFILLS": Removed(("1",), "nothing"),
    "MAX_LONG_PARTIAL_PREFILLS": Removed(("1",), "nothing"),
}

# The old speculative-decoding settings, folded into SPECULATIVE_CONFIG under these keys.
SPECULATIVE_KEYS: dict[str, tuple[str, type]] = {
    "SPECULATIVE_MODEL": ("model", str),
    "SPECULATIVE_METHOD": ("method", str),
    "NUM_SPECULATIVE_TOKENS": ("num_speculative_tokens", int),
    "NGRAM_PROMPT_LOOKUP_MAX": ("prompt_lookup_max", int),
    "NGRAM_PROMPT_LOOKUP_MIN": ("prompt_lookup_min", int),
    "SPECULATIVE_DRAFT_TENSOR_PARALLEL_SIZE": ("draft_tensor_parallel_size", int),
    "SPECULATIVE_MAX_MODEL_LEN": ("max_model_len", int),
    "SPECULATIVE_DISABLE_BY_BATCH_SIZE": ("disable_by_batch_size", int),
}
# Mapped one to one onto a current setting (old name -> how).
MAPPED: dict[str, str] = {
    "DISABLE_LOG_REQUESTS": "ENABLE_LOG_REQUESTS, inverted",
    "WORKER_USE_RAY": "DISTRIBUTED_EXECUTOR_BACKEND=ray",
    "ROPE_SCALING": "HF_OVERRIDES {\"rope_scaling\": ...}",
    "ROPE_THETA": "HF_OVERRIDES {\"rope_theta\": ...}",
    **{name: f"SPECULATIVE_CONFIG {{\"{key}\": ...}}" for name, (key, _) in
       SPECULATIVE_KEYS.items()},
}


def legacy_names() -> set[str]:
    return set(REMOVED) | set(MAPPED)


@dataclass
class Translation:
    """What the legacy settings of an environment amount to."""

    env: dict[str, str] = field(default_factory=dict)  # current env names -> values
    warnings: list[str] = field(default_factory=list)


def _truthy(name: str, raw: str) -> bool:
    value = parse_bool(raw)
    if value is None:
        raise ConfigError(f"Invalid value {raw!r} for {name}: expected true or false")
    return value


def _speculative(env: Mapping[str, str]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name, (key, kind) in SPECULATIVE_KEYS.items():
        raw = env.get(name)
        if is_unset(raw):
            continue
        assert raw is not None
        try:
            config[key] = kind(raw.strip())
        except ValueError:
            raise ConfigError(f"Invalid value {raw!r} for {name}: expected "
                                    f"{kind.__name__}") from None
    if config.get("model") == "[ngram]":  # worker-vllm's way of asking for n-gram lookup
        config.pop("model")
        config.setdefault("method", "ngram")
    return config


def translate(env: Mapping[str, str]) -> Translation:
    """Current settings for the legacy names in `env`, and warnings for the removed ones."""
    out = Translation()
    spec = _speculative(env)
    if spec:
        current = env.get("SPECULATIVE_CONFIG")
        try:
            explicit = json.loads(current) if not is_unset(current) else {}
        except ValueError as exc:
            raise ConfigError(f"Invalid SPECULATIVE_CONFIG {current!r}: {exc}") from None
        out.env["SPECULATIVE_CONFIG"] = json.dumps({**spec, **explicit})
    overrides: dict[str, Any] = {}
    try:
        if not is_unset(raw := env.get("ROPE_SCALING")):
            overrides["rope_scaling"] = json.loads(str(raw))
        if not is_unset(raw := env.get("ROPE_THETA")):
            overrides["rope_theta"] = float(str(raw))
        if overrides:
            current = env.get("HF_OVERRIDES")
            out.env["HF_OVERRIDES"] = json.dumps(
                {**overrides, **(json.loads(current) if not is_unset(current) else {})})
    except ValueError as exc:
        raise ConfigError(f"Invalid ROPE_SCALING, ROPE_THETA or HF_OVERRIDES: {exc}"
                                ) from None
    if not is_unset(raw := env.get("DISABLE_LOG_REQUESTS")) and is_unset(
            env.get("ENABLE_LOG_REQUESTS")):
        out.env["ENABLE_LOG_REQUESTS"] = str(not _truthy("DISABLE_LOG_REQUESTS", str(raw)))
    if not is_unset(raw := env.get("WORKER_USE_RAY")) and _truthy("WORKER_USE_RAY", str(raw)):
        out.env.setdefault("DISTRIBUTED_EXECUTOR_BACKEND", "ray")
    ignored = []
    for name, removed in REMOVED.items():
        raw = env.get(name)
        if raw is None or raw.strip() in removed.defaults or is_unset(raw):
            continue
        ignored.append(f"{name}={raw!r} (use {removed.instead})")
    if ignored:
        out.warnings.append("These settings were removed from vLLM and have no effect: "
                            + "; ".join(ignored))
    return out
