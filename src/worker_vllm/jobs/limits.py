"""Per-job limits (JOB_MAX_*): checked before a request reaches the engine."""

from __future__ import annotations

import json
import math
from typing import Any

from worker_vllm.config.settings import WorkerSettings
from worker_vllm.errors import InvalidInput


def _not_json(value: Any, path: str) -> str | None:
    """The path of the first value JSON cannot carry (NaN, Infinity, a non-JSON type)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if isinstance(value, dict):
        for key, item in value.items():
            if (found := _not_json(item, f"{path}.{key}" if path else str(key))) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _not_json(item, f"{path}.{i}" if path else str(i))) is not None:
                return found
    elif not isinstance(value, str | int | float | bool | type(None)):
        return path
    return None


def input_size(raw_input: Any) -> int:
    """The job input's size as JSON (what the platform received), in bytes."""
    try:
        return len(json.dumps(raw_input, ensure_ascii=False, allow_nan=False).encode(
            "utf-8", "surrogatepass"))
    except (TypeError, ValueError):
        path = _not_json(raw_input, "") or "input"
        # An OpenAI body's fields are named as the OpenAI API names them.
        path = path.removeprefix("openai_input.")
        raise InvalidInput(f"{path} is not a JSON value (NaN and Infinity are not JSON)",
                           param=path) from None


def check_size(settings: WorkerSettings, raw_input: Any) -> None:
    size = input_size(raw_input)
    if size > settings.job_max_input_bytes:
        raise InvalidInput(f"Job input is {size} bytes; this worker takes at most "
                           f"{settings.job_max_input_bytes} (JOB_MAX_INPUT_BYTES)",
                           param="input", code=413)


def check_counts(settings: WorkerSettings, n: Any, max_tokens: Any, prefix: str,
                 tokens_field: str = "max_tokens") -> None:
    """`n` and the output-token bound of one request against the worker's limits."""
    if isinstance(n, int) and not isinstance(n, bool) and n > settings.job_max_n:
        raise InvalidInput(f"n={n} exceeds this worker's limit of {settings.job_max_n} "
                           "(JOB_MAX_N)", param=f"{prefix}n")
    limit = settings.job_max_tokens
    if (limit is not None and isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
            and max_tokens > limit):
        raise InvalidInput(f"{tokens_field}={max_tokens} exceeds this worker's limit of "
                           f"{limit} (JOB_MAX_TOKENS)", param=f"{prefix}{tokens_field}")


def check_openai_body(settings: WorkerSettings, body: dict[str, Any] | None,
                      prefix: str = "") -> None:
    """An OpenAI-shaped request body (OpenAI-route or route job) within the limits."""
    if not body:
        return
    field = next((f for f in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                  if f in body), "max_tokens")
    check_counts(settings, body.get("n"), body.get(field), prefix, field)
