"""One error shape for every failed job.

The runpod SDK stores ``str(value)`` of a yielded ``{"error": value}`` as the job's error. Our
error object is a dict whose ``str()`` is its JSON, so clients of the hosted API receive an
error string they can parse, and in-process callers still get a dict.
"""

from __future__ import annotations

import json
from typing import Any


class ErrorObject(dict):
    """``{"message", "type", "code"[, "param"]}`` whose ``str()`` is JSON, not a Python repr."""

    def __str__(self) -> str:
        return json.dumps(self, ensure_ascii=False)

    __repr__ = __str__


class WorkerError(Exception):
    """An error the client can act on; its message is shown as is."""

    type: str = "internal_error"
    code: int = 500

    def __init__(self, message: str, *, param: str | None = None, code: int | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type

    def to_error(self) -> ErrorObject:
        err = ErrorObject(message=self.message, type=self.type, code=self.code)
        if self.param is not None:
            err["param"] = self.param
        return err


class InvalidInput(WorkerError):
    type = "invalid_request_error"
    code = 400


class ConfigError(WorkerError):
    """A setting the worker cannot use; the message names it."""

    type = "configuration_error"


class EngineUnavailable(WorkerError):
    type = "engine_unavailable"
    code = 503


def error_result(exc: BaseException) -> dict[str, Any]:
    """The job result for a failure: no traceback, no secrets, for unknown errors only the type."""
    if isinstance(exc, WorkerError):
        return {"error": exc.to_error()}
    return {
        "error": ErrorObject(
            message=f"Internal error ({type(exc).__name__}); see the worker log.",
            type="internal_error",
            code=500,
        )
    }
