"""A batch job's lines: the OpenAI Batch API's request lines (`vllm run-batch`'s input), read
one at a time as they start, and the output lines they become.

A line that cannot run (not a JSON object, a route the model does not serve, a body over the
worker's limits) becomes an error line; it never fails the batch.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from worker_vllm.config.settings import WorkerSettings
from worker_vllm.engine import VLLMApp
from worker_vllm.errors import InvalidInput, WorkerError
from worker_vllm.jobs.limits import check_openai_body
from worker_vllm.jobs.shapes import BatchInput
from worker_vllm.jobs.vllm_app import route_path

# The routes of OpenAI's Batch API and of `vllm run-batch` that take a JSON body, as vLLM's
# app names them; a batch reaches those the model serves.
BATCH_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                "/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank")


@dataclass(frozen=True)
class RequestLine:
    number: int  # the line's place in the batch, from 1 (its line in a .jsonl text)
    custom_id: str
    path: str  # the app's route
    body: dict[str, Any]


class LineError(WorkerError):
    """Why one line did not run (status: the HTTP status vLLM would answer with)."""

    def __init__(self, message: str, number: int, custom_id: str | None, code: int = 400,
                 type: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(f"line {number}: {message}", type=type, param=param, code=code)
        self.number, self.custom_id = number, custom_id


def line_count(inp: BatchInput) -> int:
    if inp.batch is not None:
        return len(inp.batch)
    return sum(1 for _ in _jsonl_lines(inp.batch_jsonl or ""))


def _jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, without splitting the whole text at once."""
    for number, line in enumerate(io.StringIO(text), start=1):
        if line.strip():
            yield number, line


def raw_lines(inp: BatchInput) -> Iterator[tuple[int, Any]]:
    """(line number, the line as sent) lazily; a .jsonl line is parsed when it is reached."""
    if inp.batch is not None:
        yield from enumerate(inp.batch, start=1)
        return
    for number, text in _jsonl_lines(inp.batch_jsonl or ""):
        try:
            yield number, json.loads(text)
        except ValueError as exc:
            yield number, LineError(f"not JSON ({exc})", number, None)


def served_batch_routes(app: VLLMApp) -> list[str]:
    return [path for path in BATCH_ROUTES if app.allowed("POST", path)]


def request_line(number: int, raw: Any, app: VLLMApp, settings: WorkerSettings,
                 seen: set[str]) -> RequestLine:
    """The line ready to run, or a LineError saying why it cannot."""
    if isinstance(raw, LineError):
        raise raw
    if not isinstance(raw, dict):
        raise LineError("a request line is a JSON object with custom_id, method, url and body",
                        number, None)
    custom_id = raw.get("custom_id")
    cid = custom_id if isinstance(custom_id, str) else None
    unknown = sorted(set(raw) - {"custom_id", "method", "url", "body"})
    if cid is None or unknown:
        what = f"unknown field '{unknown[0]}'" if unknown else "custom_id must be a string"
        raise LineError(what, number, cid, param=unknown[0] if unknown else "custom_id")
    if cid in seen:
        raise LineError(f"custom_id {cid!r} is used by an earlier line (each must be unique)",
                        number, cid, param="custom_id")
    seen.add(cid)
    if raw.get("method") != "POST":
        raise LineError(f"method must be \"POST\" (got {raw.get('method')!r})", number, cid,
                        param="method")
    url, body = raw.get("url"), raw.get("body")
    path = route_path(app, "POST", url) if isinstance(url, str) else None
    if path not in (served := served_batch_routes(app)):
        raise LineError(f"url {url!r} is not a batch route of this model; it serves: "
                        f"{', '.join(served)}", number, cid, code=404,
                        param="url")
    if not isinstance(body, dict):
        raise LineError("body must be a JSON object", number, cid, param="body")
    if body.get("stream") is True:
        raise LineError("body.stream: a batch line is answered whole (stream the batch job "
                        "with \"stream\": true in the job's input)", number, cid,
                        param="body.stream")
    try:
        check_openai_body(settings, body, prefix="body.")
    except InvalidInput as exc:
        raise LineError(exc.message, number, cid, code=exc.code, param=exc.param) from None
    return RequestLine(number, cid, path, body)


def output_line(job_id: str, number: int, custom_id: str | None, status: int,
                request_id: str, body: Any, error: WorkerError | None = None) -> dict[str, Any]:
    """One line of the Batch API's output. A failed line carries vLLM's error object both in
    its response body (as OpenAI's output does) and in `error` (as `vllm run-batch`'s does)."""
    if error is not None:
        body = {"error": dict(error.to_error())}
    return {
        "id": f"batch_req_{job_id}_{number}", "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None if error is None else body["error"],
    }


def error_line(job_id: str, error: LineError) -> dict[str, Any]:
    return output_line(job_id, error.number, error.custom_id, error.code,
                       f"{job_id}-{error.number}", None, error)
