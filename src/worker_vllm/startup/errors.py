"""A failed start-up, told the way a user can act on it: vLLM's own reason, and the setting
(env var) it is about.

vLLM's reasons arrive in many shapes: a pydantic ValidationError whose first line says only
"1 validation error for ModelConfig" (the reason is in its error list), an error with a
`parameter`, a message that names a field in words ("Reasoning parser 'x' not found"), or,
for the engine core process, only a line in its log.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from worker_vllm.config.settings import is_unset, load_worker_settings
from worker_vllm.errors import WorkerError

MAX_REASON = 1500


class StartupError(WorkerError):
    type = "startup_error"
    code = 500


# vLLM reasons that name no setting, with what they mean for a worker and what to do.
KNOWN_REASONS = {
    # vLLM's CUDA build found no GPU through NVML (none attached, or no usable driver).
    "Failed to infer device type": (
        "no usable GPU was found: vLLM detected no CUDA device on this machine (no GPU "
        "attached, or its driver is missing or older than the image's CUDA version). On "
        "RunPod, give the endpoint a GPU type and the CUDA versions the image supports "
        "(README, \"Deploy\"); to run on a CPU, use the CPU build (scripts/setup.sh). "
        "vLLM said: "),
}


def known_reason(reason: str) -> str | None:
    """What a reason that names no setting means for this worker, with vLLM's words."""
    return next((meaning + reason for words, meaning in KNOWN_REASONS.items()
                 if words in reason), None)


def vllm_reason(exc: BaseException, engine_root_cause: str | None = None) -> str:
    """The reason vLLM gives, complete, without traceback."""
    if isinstance(exc, WorkerError):
        return exc.message
    if engine_root_cause:
        return f"the vLLM engine failed to initialise: {engine_root_cause}"
    parts = [_validation_part(e) for e in _validation_errors(exc) or ()]
    if parts:
        return f"{type(exc).__name__} ({getattr(exc, 'title', '')}): " + "; ".join(parts)
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _validation_errors(exc: BaseException) -> list[Mapping] | None:
    """A pydantic ValidationError's error list (vLLM's configs are pydantic models); None for
    any other exception."""
    errors = getattr(exc, "errors", None)
    if not (callable(errors) and type(exc).__name__ == "ValidationError"):
        return None
    try:
        return list(errors())
    except Exception:  # not pydantic's after all
        return []


def _validation_part(error: Mapping) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ()))
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def settings_named(exc: BaseException, reason: str, sources: Mapping[str, str],
                   values: Mapping[str, object] | None = None) -> list[str]:
    """The env vars behind the vLLM fields the error is about: its `parameter`, its
    validation locations, a field named in the reason (`max_model_len`, or in words), or a
    setting whose value the reason quotes ("Cannot find the config file for awq")."""
    named: set[str] = set()
    parameter = getattr(exc, "parameter", None)
    if parameter:
        named.add(str(parameter))
    errors = _validation_errors(exc)
    if errors is not None:
        named |= {str(p) for e in errors for p in e.get("loc", ())}
        # A config object given as JSON (SpeculativeConfig <- speculative_config).
        title = str(getattr(exc, "title", ""))
        named.add(re.sub(r"(?<!^)(?=[A-Z])", "_", title).lower())
    words = re.sub(r"[^a-z0-9]+", "_", reason.lower())
    named |= {dest for dest in sources if re.search(rf"(^|_){re.escape(dest)}(_|$)", words)}
    named |= {dest for dest, value in (values or {}).items()
              if isinstance(value, str) and len(value) >= 3
              and re.search(rf"(?<![\w/.-]){re.escape(value)}(?![\w/.-])", reason)}
    return sorted({sources[d] for d in named if d in sources and _is_env_name(sources[d])})


def _is_env_name(label: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", label))


def explain(exc: BaseException, sources: Mapping[str, str] | None = None,
            engine_root_cause: str | None = None,
            values: Mapping[str, object] | None = None) -> StartupError:
    """The error every job reports when start-up failed."""
    if isinstance(exc, StartupError):
        return exc
    reason = vllm_reason(exc, engine_root_cause)
    if len(reason) > MAX_REASON:
        reason = reason[:MAX_REASON] + " [...] (the worker log has all of it)"
    if (known := known_reason(reason)) is not None:
        return StartupError(f"The worker could not start: {known}")
    if isinstance(exc, WorkerError) or not sources:
        return StartupError(f"The worker could not start: {reason}")
    settings = settings_named(exc, reason, sources, values)
    culprit = (f" (check {', '.join(settings)})" if settings
               else " (vLLM names no setting; the worker log lists the settings in use)")
    return StartupError(f"The worker could not start: {reason}{culprit}")


class StartupFailure(Exception):
    """A failed start-up with what explains it: where each setting came from (so the error
    can name the env var behind the field vLLM complains about), and the engine core's own
    reason from its log."""

    def __init__(self, cause: BaseException, config: Any = None,
                 engine_root_cause: str | None = None) -> None:
        super().__init__(str(cause))
        self.cause, self.engine_root_cause = cause, engine_root_cause
        self.sources = dict(config.sources) if config is not None else None
        self.values = ({dest: getattr(config.args, dest, None) for dest in config.sources}
                       if config is not None else None)

    def error(self) -> StartupError:
        """The error every job or request reports: vLLM's reason and the setting."""
        return explain(self.cause, self.sources, self.engine_root_cause, self.values)


def startup_failure_action(env: Mapping[str, str]) -> str:
    """ON_STARTUP_ERROR; read on its own when the settings themselves are what failed."""
    try:
        return load_worker_settings(dict(env)).on_startup_error
    except WorkerError:
        pass
    raw = env.get("ON_STARTUP_ERROR")
    return "exit" if not is_unset(raw) and str(raw).strip().lower() == "exit" else "fail_jobs"
