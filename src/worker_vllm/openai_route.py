"""The OpenAI route: {"openai_route", "openai_input"} jobs answered by vLLM's serving classes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from .engine import OpenAIServing, VLLMClientError
from .errors import ErrorObject, WorkerError
from .job_input import OpenAIInput
from .stream_batching import BatchPolicy, batched


class OpenAIError(WorkerError):
    """An error in the OpenAI error object's shape (param always present)."""

    def to_error(self) -> ErrorObject:
        return ErrorObject(message=self.message, type=self.type, param=self.param,
                           code=self.code)


def normalise_route(route: str) -> str:
    route = "/" + route.strip().strip("/")
    return route if route.startswith("/v1/") else "/v1" + route


def _from_vllm_error(result: dict[str, Any]) -> OpenAIError:
    err = result["error"]
    return OpenAIError(err.get("message", "error"), type=err.get("type", "invalid_request_error"),
                       param=err.get("param"), code=int(err.get("code") or 400))


async def run_openai(serving: OpenAIServing, inp: OpenAIInput, policy: BatchPolicy,
                     request_id: str, raw_output: bool = True) -> AsyncIterator[Any]:
    route = normalise_route(inp.openai_route)
    if route == "/v1/models":
        yield await serving.models()
        return
    if route not in serving.routes:
        raise OpenAIError(f"Unknown openai_route {inp.openai_route!r}; supported: "
                          f"{', '.join(serving.supported())}", type="invalid_request_error",
                          param="openai_route", code=404)
    if inp.openai_input is None:
        raise OpenAIError("openai_input is required for this route", param="openai_input",
                          type="invalid_request_error", code=400)
    try:
        request = _parse(serving, route, inp.openai_input)
        result = await serving.respond(route, request, request_id)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise OpenAIError(f"Invalid request: {param}: {first['msg']}", param=param,
                          type="invalid_request_error", code=400) from None
    except (VLLMClientError, ValueError) as exc:
        raise OpenAIError(str(exc), param=getattr(exc, "parameter", None),
                          type="invalid_request_error", code=400) from None
    if isinstance(result, dict):
        if "error" in result and isinstance(result["error"], dict):
            raise _from_vllm_error(result)
        yield result
        return
    async with contextlib.aclosing(batched(result, policy)) as batches:
        async for batch in batches:
            if raw_output:
                yield "".join(batch.items)
            else:
                yield [chunk for event in batch.items
                       if (chunk := parse_sse(event)) is not None]


def _parse(serving: OpenAIServing, route: str, body: dict[str, Any]) -> Any:
    """The route's request object. Some of vLLM's validators raise TypeError on a value of the
    wrong kind (its own server then answers 500); here that is a 400 naming the field."""
    try:
        return serving.parse(route, body)
    except (TypeError, AttributeError) as exc:
        param = next((key for key in body if _fails_without(serving, route, body, key)), None)
        raise OpenAIError(f"Invalid request: {param or 'body'}: a value of the wrong kind "
                          f"({exc})", param=param, type="invalid_request_error",
                          code=400) from None


def _fails_without(serving: OpenAIServing, route: str, body: dict[str, Any], key: str) -> bool:
    """Whether removing `key` makes the TypeError go away (it then was the culprit)."""
    try:
        serving.parse(route, {k: v for k, v in body.items() if k != key})
    except (TypeError, AttributeError):
        return False
    except Exception:
        return True
    return True


def parse_sse(event: str) -> Any:
    """The JSON payload of one SSE event (None for the closing [DONE])."""
    data = "".join(line[5:].strip() for line in event.splitlines() if line.startswith("data:"))
    return None if data in ("", "[DONE]") else json.loads(data)

