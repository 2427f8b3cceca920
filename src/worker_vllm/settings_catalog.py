"""Every user-facing setting as one flat list, derived from the declarations.

Worker settings come from `settings.WorkerSettings`; engine and server settings are every
`vllm serve` flag, with vLLM's own help text, presented first where `settings.ENGINE_SETTINGS`
features them. The deploy artefacts (worker-config.json, .runpod/hub.json) and
docs/configuration.md are generated from this list by scripts/generate_deploy_files.py.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from .engine import Flag, serve_flags
from .settings import ALIASES, ENGINE_SETTINGS, WorkerSettings

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


def all_settings(with_help: bool = True) -> list[SettingInfo]:
    return engine_settings(with_help) + worker_settings()


def server_only_flags() -> list[Flag]:
    """`vllm serve` flags of its own HTTP server, which a worker does not have."""
    return [f for f in serve_flags() if f.server_only]
