"""The endpoint API's HTTP messages: request bodies as the platform takes them (standard JSON
objects within a size limit), and errors raised by the routes, turned into responses in one
place."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A client error of the RunPod API: `{"error": message}` with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class OpenAIApiError(ApiError):
    """A client error on /openai/v1: the OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(status, message)
        self.type, self.param = type, param


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def openai_error_response(status: int, message: str, type: str = "invalid_request_error",
                          param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type, "param": param, "code": status}},
        status_code=status)


async def handle_api_error(_request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, OpenAIApiError):
        return openai_error_response(exc.status, exc.message, exc.type, exc.param)
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message)

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


def worker_body(raw: bytes) -> dict[str, Any]:
    """What the SDK posts: JSON, sent with a form content type."""
    return json.loads(raw or b"{}")
