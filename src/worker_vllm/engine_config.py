"""vLLM engine args from env vars, an optional YAML file and baked-model args.

Every ``AsyncEngineArgs`` field is settable as its UPPERCASE name; the value is converted by the
field's own type annotation. Precedence: baked args > env > YAML file > vLLM defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from vllm import AsyncEngineArgs

from .errors import WorkerError
from .settings import ENGINE_ALIASES, WorkerSettings, is_unset

log = logging.getLogger(__name__)

# Engine fields the worker owns under its own setting (HF_TOKEN is used for our own download
# and must never reach vLLM's config dump).
_WORKER_OWNED = {"hf_token"}
# Env prefixes of other software; never treated as misspelt worker settings.
_FOREIGN_PREFIXES = ("RUNPOD_", "VLLM_", "HF_", "CUDA_", "NVIDIA_", "PYTHON", "LC_", "XDG_",
                     "TORCH", "OMP_", "NCCL_", "UV_", "PIP_", "VIRTUAL_ENV", "TOKENIZERS_")
_SECRET_NAME = re.compile(r"(^|_)(token|key|secret|password)$", re.IGNORECASE)


class ConfigError(WorkerError):
    type = "configuration_error"


@dataclass
class EngineArgsSpec:
    """The engine args the user asked for, and where each came from."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def set(self, name: str, value: Any, source: str) -> None:
        self.values[name] = value
        self.sources[name] = source

    def is_set(self, name: str) -> bool:
        return name in self.values


@cache
def engine_fields() -> dict[str, Any]:
    """AsyncEngineArgs field name -> resolved annotation (the raw string if unresolvable)."""
    namespace: dict[str, Any] = {}
    for cls in reversed(AsyncEngineArgs.__mro__):
        namespace.update(vars(sys.modules[cls.__module__]))
    out: dict[str, Any] = {}
    for f in dataclasses.fields(AsyncEngineArgs):
        annotation: Any = f.type
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # noqa: S307 - vLLM's own annotations
            except Exception:
                pass
        out[f.name] = annotation
    return {k: v for k, v in out.items() if k not in _WORKER_OWNED}


@cache
def engine_defaults() -> dict[str, Any]:
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None)
        for f in dataclasses.fields(AsyncEngineArgs)
        if f.default_factory is dataclasses.MISSING
    }


@cache
def _adapter(name: str) -> TypeAdapter | None:
    annotation = engine_fields()[name]
    if isinstance(annotation, str):
        return None
    for kwargs in ({"config": ConfigDict(arbitrary_types_allowed=True)}, {}):
        try:
            return TypeAdapter(annotation, **kwargs)
        except Exception:
            continue
    return None


def type_name(name: str) -> str:
    annotation = engine_fields()[name]
    text = annotation if isinstance(annotation, str) else getattr(
        annotation, "__name__", None) or str(annotation)
    return str(text).replace("typing.", "")


def convert(name: str, raw: Any, origin: str) -> Any:
    """Convert a raw value (env string or YAML value) by the field's type; raise naming `origin`."""
    adapter = _adapter(name)
    candidates = [raw]
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except ValueError:
            pass
        else:
            # A JSON list/object is meant as one ('["a","b"]' for a str | list[str] field);
            # a JSON scalar only if the string itself is not accepted.
            candidates.insert(0 if isinstance(parsed, (list, dict)) else 1, parsed)
    if adapter is None:
        # Config objects (compilation_config, ...) are passed as parsed JSON, as `vllm serve` does.
        return candidates[0]
    error: ValidationError | None = None
    for candidate in candidates:
        try:
            return adapter.validate_python(candidate)
        except ValidationError as exc:
            error = error or exc
    assert error is not None
    raise ConfigError(
        f"Invalid value {raw!r} for {origin}: expected {type_name(name)} "
        f"({error.errors()[0]['msg']})"
    )


def _env_name(field_name: str) -> str:
    return field_name.upper()


def known_env_names() -> set[str]:
    return (
        {_env_name(n) for n in engine_fields()}
        | set(ENGINE_ALIASES)
        | {n.upper() for n in WorkerSettings.model_fields}
    )


def near_miss_warnings(env: Mapping[str, str]) -> list[str]:
    """Warnings for env vars that look like a misspelt setting (nothing is silently ignored)."""
    known = known_env_names()
    warnings = []
    for var in env:
        if var in known or not var.isupper() or var.startswith(_FOREIGN_PREFIXES):
            continue
        match = difflib.get_close_matches(var, known, n=1, cutoff=0.85)
        if match:
            warnings.append(f"Env var {var} is not a setting; did you mean {match[0]}?")
    return warnings


def _load_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read VLLM_CONFIG_FILE {path!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"VLLM_CONFIG_FILE {path!r} must hold a mapping of engine args")
    return data


def _normalise_key(key: str) -> str:
    name = str(key).replace("-", "_")
    alias = ENGINE_ALIASES.get(name.upper())
    return alias or name.lower()


def load_baked_args(path: str) -> dict[str, Any]:
    """Args written by the model-baking build step; an absent file means nothing was baked."""
    file = Path(path)
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except ValueError as exc:
        raise ConfigError(f"Baked args file {path} is not valid JSON: {exc}") from None
    return dict(data)


def resolve_engine_args(env: Mapping[str, str], settings: WorkerSettings) -> EngineArgsSpec:
    """Collect engine args from file, env and baked args (later sources win)."""
    spec = EngineArgsSpec()
    fields = engine_fields()
    if settings.vllm_config_file:
        for key, value in _load_yaml(settings.vllm_config_file).items():
            name = _normalise_key(key)
            if name not in fields:
                raise ConfigError(
                    f"Unknown engine arg {key!r} in VLLM_CONFIG_FILE "
                    f"{settings.vllm_config_file}"
                )
            spec.set(name, convert(name, value, f"{key} in VLLM_CONFIG_FILE"), "file")
    env_names = {_env_name(n): n for n in fields} | ENGINE_ALIASES
    for var, name in env_names.items():
        raw = env.get(var)
        if is_unset(raw):
            continue
        field_var = _env_name(name)
        if var != field_var and not is_unset(env.get(field_var)):
            raise ConfigError(f"Both {var} and {field_var} are set; set only one")
        spec.set(name, convert(name, raw, var), "env")
    for key, value in load_baked_args(settings.baked_args_file).items():
        name = _normalise_key(key)
        if name not in fields:
            raise ConfigError(f"Unknown engine arg {key!r} in {settings.baked_args_file}")
        spec.set(name, convert(name, value, f"{key} in {settings.baked_args_file}"), "baked")
    return spec


def redacted(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy safe to log: values of secret-looking names are masked."""
    return {
        k: ("***" if _SECRET_NAME.search(k) and v else v)
        for k, v in values.items()
    }
