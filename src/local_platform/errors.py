"""Errors of the endpoint API: raised by the routes, turned into responses in one place."""

from __future__ import annotations

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
