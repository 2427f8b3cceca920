"""Every user-facing setting as one flat list, derived from the declarations in `settings`.

The deploy artefacts (worker-config.json, .runpod/hub.json) and docs/configuration.md are
generated from this list by scripts/generate_deploy_files.py, so they cannot drift.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from .engine_config import engine_defaults, engine_fields, type_name
from .settings import ENGINE_ALIASES, ENGINE_SETTINGS, WorkerSettings


@dataclass(frozen=True)
class SettingInfo:
    env: str
    kind: str  # "str" | "int" | "float" | "bool"
    default: Any
    description: str
    group: str
    advanced: bool = False
    options: tuple[str, ...] = ()
    secret: bool = False


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
        ))
    return out


def engine_settings() -> list[SettingInfo]:
    fields, defaults = engine_fields(), engine_defaults()
    out = []
    for env, meta in ENGINE_SETTINGS.items():
        name = ENGINE_ALIASES.get(env, env.lower())
        kind = _kind(fields[name])
        default = defaults.get(name)
        if env == "MODEL_NAME":
            default = None  # vLLM's default model is no sensible default for a worker
        out.append(SettingInfo(
            env=env, kind=kind, default=default, description=meta.description,
            group=meta.group, advanced=meta.advanced, options=meta.options,
        ))
    return out


def all_settings() -> list[SettingInfo]:
    return engine_settings() + worker_settings()


def other_engine_args() -> list[tuple[str, str, Any]]:
    """(ENV_NAME, type, default) of every engine arg without its own entry above."""
    shown = {ENGINE_ALIASES.get(e, e.lower()) for e in ENGINE_SETTINGS}
    defaults = engine_defaults()
    return [
        (name.upper(), type_name(name), defaults.get(name, "(computed)"))
        for name in sorted(engine_fields())
        if name not in shown
    ]
