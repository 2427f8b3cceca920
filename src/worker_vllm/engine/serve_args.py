"""`vllm serve`'s own argument parser: its flags (with env names) and parsing.

Engine and server settings mean exactly what they mean to `vllm serve` because they are parsed
by the parser `vllm serve` builds (`make_arg_parser`); the same parsed arguments build the
engine (`AsyncEngineArgs.from_cli_args`) and the serving layer (`init_app_state`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, NoReturn

from vllm import AsyncEngineArgs
from vllm.engine import arg_utils
from vllm.entrypoints.launchers.cli_args import BaseFrontendArgs, make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

# Flags of the parser itself or of a process layout the worker does not have.
_NOT_SETTINGS = {"help", "model_tag", "config"}


class ServeArgsError(ValueError):
    """vLLM's parser refused the arguments; the message is vLLM's own, `parameter` the
    argument (dest) its check named, if it named one."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class _Parser(FlexibleArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ServeArgsError(message)


@dataclass(frozen=True)
class Flag:
    """One `vllm serve` flag as an env setting."""

    env: str  # MAX_MODEL_LEN
    option: str  # --max-model-len
    dest: str  # max_model_len
    kind: str  # "bool" (--x / --no-x), "switch" (store_true), "list", "append" or "value"
    help: str
    default: Any
    choices: tuple[str, ...]
    # Applies to `vllm serve`'s HTTP server or process layout (host, port, TLS, CORS, API
    # server count, ...), not to an in-process worker: accepted, but it has no effect.
    server_only: bool


@functools.cache
def _parser(with_help: bool = False) -> _Parser:
    if with_help:
        # vLLM reads its config classes' docstrings into help texts only when asked.
        arg_utils.NEEDS_HELP = True
        arg_utils._compute_kwargs.cache_clear()
    parser = make_arg_parser(_Parser(prog="vllm serve"))
    return parser


@functools.cache
def _worker_dests() -> frozenset[str]:
    """Destinations of the flags that configure the engine or the serving layer."""
    engine = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    frontend = {f.name for f in dataclasses.fields(BaseFrontendArgs)}
    return frozenset(engine | frontend)


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "bool"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return "switch"
    if isinstance(action, argparse._AppendAction):
        return "append"
    if action.nargs in ("+", "*"):
        return "list"
    return "value"


@functools.cache
def serve_flags(with_help: bool = False) -> tuple[Flag, ...]:
    """Every `vllm serve` flag the worker takes as an env var, in the parser's order."""
    flags = []
    for action in _parser(with_help)._actions:
        longs = [o for o in action.option_strings if o.startswith("--")
                 and not o.startswith("--no-")]
        if not longs or action.dest in _NOT_SETTINGS:
            continue
        option = longs[0]
        default = action.default
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            default = None  # a config object: "vLLM's default configuration"
        flags.append(Flag(
            env=option[2:].upper().replace("-", "_"), option=option, dest=action.dest,
            kind=_kind(action), help=" ".join((action.help or "").split()),
            default=None if default is argparse.SUPPRESS else default,
            choices=tuple(str(c) for c in action.choices or ()),
            server_only=action.dest not in _worker_dests(),
        ))
    return tuple(flags)


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check `vllm serve` arguments as `vllm serve` does before it loads anything;
    raises ServeArgsError with vLLM's message."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import validate_api_server_args

    try:
        args = _parser().parse_args(argv)
        validate_parsed_serve_args(args)
        validate_api_server_args(args)
    except SystemExit as exc:  # a parser path that exits instead of calling error()
        raise ServeArgsError(f"invalid arguments (exit {exc.code})") from None
    except Exception as exc:  # raised by vLLM's own checks (ValueError, its own errors)
        message = str(exc.args[0]) if exc.args else repr(exc)
        raise ServeArgsError(message, getattr(exc, "parameter", None)) from None
    return args


def engine_args_from(args: argparse.Namespace) -> AsyncEngineArgs:
    return AsyncEngineArgs.from_cli_args(args)


def chat_template_text(value: str | None) -> str | None:
    """`--chat-template` as template text (it may be a file path), as vLLM loads it."""
    if value is None:
        return None
    from vllm.renderers.chat_utils import load_chat_template

    return load_chat_template(value)
