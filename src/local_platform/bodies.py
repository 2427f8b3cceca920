"""Request bodies as the platform takes them: standard JSON objects within a size limit."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from .errors import ApiError

RUN_LIMIT = 10 * 1024 * 1024  # documented payload limits of /run and /runsync
RUNSYNC_LIMIT = 20 * 1024 * 1024


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in `value` holds a lone surrogate (not encodable as UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


async def json_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; raises ApiError (413, 400)."""
    raw = await request.body()
    if len(raw) > limit:
        raise ApiError(413, f"Payload of {len(raw)} bytes exceeds the limit of {limit} bytes")
    try:
        # Standard JSON only: NaN, Infinity and lone surrogates cannot be handed on.
        body = json.loads(raw or b"{}", parse_constant=_reject_constant)
    except ValueError as exc:
        raise ApiError(400, f"The body is not valid JSON: {exc}") from None
    if _lone_surrogate(body):
        raise ApiError(400, "The body is not valid JSON: a string holds a lone surrogate")
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object")
    return body


async def worker_body(request: Request) -> dict[str, Any]:
    """What the SDK posts: JSON, sent with a form content type."""
    return json.loads(await request.body() or b"{}")
