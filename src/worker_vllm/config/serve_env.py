"""Engine and server settings from the environment, parsed by `vllm serve`'s own parser.

Every `vllm serve` flag is an env var: ``--max-model-len`` is ``MAX_MODEL_LEN``; booleans
become the flag or its ``--no-`` form, lists are JSON or space-separated, dicts and config
objects JSON, and every value means what it means to `vllm serve` (``auto``, ``32k``, ...).
worker-vllm's own names are aliases; its removed settings are mapped or named in a warning.

The arguments are assembled as `vllm serve` would see them, lowest precedence first: vLLM's
``--config`` file (VLLM_CONFIG_FILE), env vars, VLLM_EXTRA_ARGS, args baked into the image.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from worker_vllm.config.legacy import legacy_names, translate
from worker_vllm.config.settings import ALIASES, WorkerSettings, is_unset, parse_bool
from worker_vllm.engine.serve_args import Flag, ServeArgsError, parse_serve_args, serve_flags
from worker_vllm.errors import ConfigError

log = logging.getLogger(__name__)

# Env prefixes of other software; never treated as misspelt settings.
_FOREIGN_PREFIXES = ("RUNPOD_", "VLLM_", "HF_", "CUDA_", "NVIDIA_", "PYTHON", "LC_", "XDG_",
                     "TORCH", "OMP_", "NCCL_", "UV_", "PIP_", "VIRTUAL_ENV", "TOKENIZERS_",
                     "PYTORCH_", "SSL_", "REQUESTS_", "CURL_")
_SECRET_NAME = re.compile(r"(^|_)(token|key|secret|password)$", re.IGNORECASE)
# Flags the worker owns under its own setting: HF_TOKEN is for the worker's download and must
# never reach vLLM's logged config.
_WORKER_OWNED = {"HF_TOKEN"}


@dataclass
class ServeConfig:
    """vLLM's parsed `vllm serve` arguments and where each non-default one came from."""

    args: argparse.Namespace
    sources: dict[str, str] = field(default_factory=dict)  # dest -> "MAX_MODEL_LEN", ...
    warnings: list[str] = field(default_factory=list)

    def is_set(self, dest: str) -> bool:
        return dest in self.sources

    def set(self, dest: str, value: Any, source: str) -> None:
        setattr(self.args, dest, value)
        self.sources[dest] = source


# `vllm serve` HTTP-server flags that mean something when the worker serves vLLM's app over
# HTTP itself (load-balancing endpoints): API key, CORS, root path, request ids, logging and
# header limits. PORT is read by the front-end (RunPod's default differs from vLLM's); TLS,
# sockets and multi-process serving are the platform's business.
LB_SERVER_FLAGS = frozenset({
    "API_KEY", "ALLOWED_ORIGINS", "ALLOWED_METHODS", "ALLOWED_HEADERS", "ALLOW_CREDENTIALS",
    "ROOT_PATH", "ENABLE_REQUEST_ID_HEADERS", "UVICORN_LOG_LEVEL", "DISABLE_UVICORN_ACCESS_LOG",
    "H11_MAX_INCOMPLETE_EVENT_SIZE", "H11_MAX_HEADER_COUNT",
})


def env_flags(server: frozenset[str] = frozenset()) -> dict[str, Flag]:
    """Env name -> flag, for every flag that configures the engine or the serving layer (and
    the HTTP-server flags named in `server`)."""
    return {f.env: f for f in serve_flags()
            if (not f.server_only or f.env in server) and f.env not in _WORKER_OWNED}


def _flags_by_dest() -> dict[str, Flag]:
    return {f.dest: f for f in serve_flags()}


def _as_list(raw: str) -> list[str]:
    """A list value: a JSON list (items that are objects stay JSON), one JSON object, or
    space-separated words."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return shlex.split(raw)
    if isinstance(parsed, dict):
        return [raw]
    if isinstance(parsed, list):
        return [json.dumps(x) if isinstance(x, dict | list) else str(x) for x in parsed]
    return shlex.split(raw)


def flag_tokens(flag: Flag, raw: Any, origin: str) -> list[str]:
    """The `vllm serve` tokens for one setting's value."""
    text = raw if isinstance(raw, str) else json.dumps(raw)
    if flag.kind in ("bool", "switch"):
        value = parse_bool(text if isinstance(raw, str) else str(raw))
        if value is None:
            raise ConfigError(f"Invalid value {raw!r} for {origin}: expected true or false")
        if value:
            return [flag.option]
        return ["--no-" + flag.option[2:]] if flag.kind == "bool" else []
    if flag.kind == "list":
        items = [str(x) if not isinstance(x, dict | list) else json.dumps(x) for x in raw] \
            if isinstance(raw, list) else _as_list(text)
        return [flag.option, *items] if items else []
    if flag.kind == "append":
        return [t for item in _as_list(text) for t in (flag.option, item)]
    return [flag.option, text.strip() if isinstance(raw, str) else text]


def _env_tokens(env: Mapping[str, str], server: frozenset[str] = frozenset()
                ) -> tuple[list[str], dict[str, str]]:
    """Tokens for the env settings (aliases included) and the env name behind each dest."""
    flags = env_flags(server)
    names: dict[str, str] = {}  # flag env name -> the env var that sets it
    for alias, target in ALIASES.items():
        if is_unset(env.get(alias), alias):
            continue
        other = env.get(target)
        if not is_unset(other, target) and other.strip() != env[alias].strip():  # type: ignore
            raise ConfigError(f"Both {alias} and {target} are set, to different values; "
                              "set only one")
        names[target] = alias
    for name in flags:
        if name not in names and not is_unset(env.get(name), name):
            names[name] = name
    tokens: list[str] = []
    sources: dict[str, str] = {}
    for target, var in names.items():
        flag = flags[target]
        tokens += flag_tokens(flag, env[var], var)
        sources[flag.dest] = var
    return tokens, sources


def _file_sources(path: str) -> dict[str, str]:
    """Dests set by vLLM's --config YAML (read here only to know where values came from)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read VLLM_CONFIG_FILE {path!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"VLLM_CONFIG_FILE {path!r} must hold a mapping of vllm serve "
                          "options")
    return {str(k).replace("-", "_"): "VLLM_CONFIG_FILE" for k in data}


def load_baked_args(path: str) -> dict[str, Any]:
    """Args written by the model-baking build step; an absent file means nothing was baked."""
    file = Path(path)
    if not file.is_file():
        return {}
    try:
        return dict(json.loads(file.read_text()))
    except ValueError as exc:
        raise ConfigError(f"Baked args file {path} is not valid JSON: {exc}") from None


def _baked_tokens(baked: Mapping[str, Any], path: str) -> tuple[list[str], dict[str, str]]:
    by_dest = _flags_by_dest()
    tokens: list[str] = []
    sources = {}
    for key, value in baked.items():
        flag = by_dest.get(str(key).replace("-", "_"))
        if flag is None:
            raise ConfigError(f"Unknown vllm serve option {key!r} in {path}")
        tokens += flag_tokens(flag, value, f"{key} in {path}")
        sources[flag.dest] = "baked"
    return tokens, sources


def _named_flags(message: str) -> list[Flag]:
    """The flags a vLLM message speaks of (`--tool-call-parser`, "tool call parser"), in the
    order it names them."""
    lowered = message.lower()
    found = []
    for flag in serve_flags():
        spots = [i for i in (message.find(flag.option + " "), message.find(flag.option + ":"),
                             message.find(flag.option + "/"), message.find(flag.option + "="),
                             lowered.find(flag.dest.replace("_", " ")))
                 if i >= 0]
        if message.endswith(flag.option):
            spots.append(len(message) - len(flag.option))
        if spots:
            found.append((min(spots), -len(flag.option), flag))
    return [flag for _, _, flag in sorted(found, key=lambda t: (t[0], t[1]))]


def _explain(message: str, env: Mapping[str, str], sources: dict[str, str],
             parameter: str | None = None) -> str:
    """vLLM's parser message, naming the env var (and its value) behind the flag it names."""
    dests = [flag.dest for flag in _named_flags(message)] + ([parameter] if parameter else [])
    for dest in dests:
        var = sources.get(dest)
        if var in env:
            return f"Invalid value {env[var]!r} for {var}: {message}"
        if var is not None:
            return f"Invalid value from {var}: {message}"
    if "unrecognized arguments" in message:
        return f"VLLM_EXTRA_ARGS: {message}"
    return f"Invalid vllm serve settings: {message}"


def resolve(env: Mapping[str, str], settings: WorkerSettings,
            server: frozenset[str] = frozenset()) -> ServeConfig:
    """Parse the environment's settings with `vllm serve`'s parser (with the HTTP-server
    flags named in `server`); raise ConfigError."""
    legacy = translate(env)
    merged = {**env, **{k: v for k, v in legacy.env.items()
                        if is_unset(env.get(k), k) or k in ("SPECULATIVE_CONFIG",
                                                            "HF_OVERRIDES")}}
    argv: list[str] = []
    sources: dict[str, str] = {}
    if settings.vllm_config_file:
        argv += ["--config", settings.vllm_config_file]
        sources.update(_file_sources(settings.vllm_config_file))
    tokens, env_sources = _env_tokens(merged, server)
    argv += tokens
    sources.update(env_sources)
    if settings.vllm_extra_args:
        extra = shlex.split(settings.vllm_extra_args)
        argv += extra
        by_option = {f.option: f for f in serve_flags()}
        for token in extra:
            name = token.split("=", 1)[0]
            if name.startswith("--no-"):
                name = "--" + name[5:]
            if name in by_option:
                sources[by_option[name].dest] = "VLLM_EXTRA_ARGS"
    baked_tokens, baked_sources = _baked_tokens(load_baked_args(settings.baked_args_file),
                                                settings.baked_args_file)
    argv += baked_tokens
    sources.update(baked_sources)
    try:
        args = parse_serve_args(argv)
    except ServeArgsError as exc:
        raise ConfigError(_explain(str(exc), merged, sources, exc.parameter)) from None
    if args.model_tag and not args.model:  # a positional model in VLLM_EXTRA_ARGS
        args.model = args.model_tag
    return ServeConfig(args, sources, legacy.warnings)


def known_env_names() -> set[str]:
    return ({f.env for f in serve_flags()} | set(ALIASES) | legacy_names()
            | {n.upper() for n in WorkerSettings.model_fields})


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


def server_only_warnings(env: Mapping[str, str], honoured: frozenset[str] = frozenset()
                         ) -> list[str]:
    """`vllm serve` flags of its HTTP server (host, TLS, ...) mean nothing here, except those
    the load-balancing front-end honours."""
    names = sorted(f.env for f in serve_flags() if f.server_only and f.env in env
                   and not is_unset(env.get(f.env), f.env) and f.env not in ("HOST", "PORT")
                   and f.env not in honoured)
    if not names:
        return []
    where = ("the worker serves vLLM's app itself but leaves these to the platform"
             if honoured else "the queue worker has no HTTP server of its own (on a "
             "load-balancing endpoint some of them apply; see docs/load-balancing.md)")
    return [f"{', '.join(names)}: vllm serve HTTP-server settings; {where}, so they have "
            "no effect"]


def redacted(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy safe to log: values of secret-looking names are masked."""
    return {k: ("***" if _SECRET_NAME.search(k) and v else v) for k, v in values.items()}


def describe(config: ServeConfig) -> str:
    """The settings that differ from vLLM's defaults, with their source (for the log)."""
    values = {dest: getattr(config.args, dest) for dest in sorted(config.sources)}
    shown = redacted(values)
    return ", ".join(f"{dest}={shown[dest]!r} ({config.sources[dest]})" for dest in shown
                     if dest in vars(config.args))
