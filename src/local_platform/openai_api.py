"""/openai/v1/... as the platform serves it: each request becomes a job.

Inferred from the platform's documented behaviour, not from its code: a request to
/openai/v1/<path> becomes a job {"openai_route": "/v1/<path>", "openai_input": body}, and a
streamed job's yields (SSE text) are relayed as the text/event-stream body.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from .messages import RUNSYNC_LIMIT, ApiError, OpenAIApiError, json_body, openai_error_response
from .state import FINAL, Endpoint, Job


def job_error_response(error: Any) -> JSONResponse:
    """The worker's error (its JSON text, as the SDK stores it) as an OpenAI error response."""
    detail: Any = error
    if isinstance(error, str):
        with contextlib.suppress(ValueError):
            detail = json.loads(error)
    if isinstance(detail, dict) and isinstance(detail.get("error"), dict):
        detail = detail["error"]
    if not isinstance(detail, dict) or "message" not in detail:
        return openai_error_response(500, str(error), "internal_error")
    code = detail.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return openai_error_response(status, detail["message"], detail.get("type", "internal_error"),
                                 detail.get("param"))


def _sse_text(chunk: Any) -> str:
    return chunk if isinstance(chunk, str) else f"data: {json.dumps(chunk)}\n\n"


router = APIRouter()

# How often a request waiting for its job checks that its client is still there.
DISCONNECT_CHECK_S = 1.0

@router.api_route("/v2/{endpoint_id}/openai/v1/{path:path}", methods=["GET", "POST"])
async def openai_route(request: Request, path: str) -> Response:
    endpoint: Endpoint = request.app.state.endpoint
    body: dict[str, Any] | None = None
    if request.method == "POST":
        try:
            body = await json_body(request, RUNSYNC_LIMIT)
        except ApiError as exc:
            raise OpenAIApiError(exc.status, exc.message) from None
    if len(endpoint.queue) >= endpoint.max_queue:
        raise OpenAIApiError(429, "The queue is full", "rate_limit_error")
    job_input: dict[str, Any] = {"openai_route": f"/v1/{path}"}
    if body is not None:
        job_input["openai_input"] = body
    job = endpoint.submit({"input": job_input})
    if body is not None and body.get("stream"):
        return await _stream(endpoint, job, request)
    while job.status not in FINAL:
        change = job.change()  # before the await below: a change during it is not missed
        if await request.is_disconnected():
            # vLLM's own server aborts a request whose client went away; so does this.
            endpoint.stop(job, "CANCELLED")
            return Response(status_code=499)
        await job.wait_change(DISCONNECT_CHECK_S, change)
    if job.status != "COMPLETED":
        return job_error_response(job.error or f"The job ended {job.status}")
    outputs = job.output if isinstance(job.output, list) else [job.output]
    return JSONResponse(outputs[0] if outputs else None)


async def _stream(endpoint: Endpoint, job: Job, request: Request) -> Response:
    # Wait for the first chunk (or the end) so an error can still get its HTTP status.
    while not job.chunks and job.status not in FINAL:
        change = job.change()
        if await request.is_disconnected():
            endpoint.stop(job, "CANCELLED")
            return Response(status_code=499)
        await job.wait_change(DISCONNECT_CHECK_S, change)
    if not job.chunks and job.status != "COMPLETED":
        return job_error_response(job.error or f"The job ended {job.status}")
    return StreamingResponse(_relay(endpoint, job), media_type="text/event-stream")


async def _relay(endpoint: Endpoint, job: Job) -> AsyncIterator[str]:
    sent = 0
    try:
        while True:
            while sent < len(job.chunks):
                yield _sse_text(job.chunks[sent])
                sent += 1
            if job.status in FINAL:
                if job.status != "COMPLETED":
                    err = json.loads(job_error_response(job.error or job.status).body)
                    yield f"data: {json.dumps(err)}\n\n"
                return
            await job.wait_change(30)
    finally:
        # The client went away (the response was closed early): cancel its job.
        if job.status not in FINAL:
            endpoint.stop(job, "CANCELLED")
