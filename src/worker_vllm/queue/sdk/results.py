"""A job's results to the platform within its limits: the SDK's ``handle_job`` (runpod 1.10.0,
``rp_job.handle_job``, given to the job loop through its ``jobs_handler`` config key) with
every message encoded once and weighed.

The SDK posts each yield of a generator handler as a stream message, then (with
``return_aggregate_stream``) all of them again as the job's result, and only logs a post the
platform refused. Here (limits in ``worker_vllm.jobs.output_limits``):

- a message over the stream limit is not streamed: only the result carries it (the routes
  keep streamed messages within it; only a job's single answer gets this far);
- the result repeats the messages when they fit in it. When they do not, a job whose every
  message was streamed ends with its last message alone (a batch's counts and usage; the
  client read the rest from ``/stream``); a job with a message that was never streamed
  fails with an error that says to stream, since the platform could keep none of it.

Each message's JSON is kept and the result is put together from those bytes, so no output
is encoded twice; and no output is formatted into text for a log line (the SDK's
``run_job_generator`` does that at every yield, whatever the log level). The SDK's
``refresh_worker`` and ``rp_debugger`` options are not used by the worker and not handled
here.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import traceback
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from runpod.serverless.modules import rp_http

from worker_vllm.errors import WorkerError, error_result
from worker_vllm.jobs.output_limits import (
    RESULT_BUDGET,
    STREAM_MESSAGE_LIMIT,
    too_large_for_a_message,
    too_large_for_a_result,
)
from worker_vllm.queue.sdk.poster import Poster, PostError

log = logging.getLogger(__name__)


def encode(value: Any) -> bytes:
    """JSON as the SDK posts it (``ensure_ascii=False``), as UTF-8 bytes."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


class JobResult:
    """The job's messages as posted, and the result they make."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.messages = 0
        self.unstreamed = 0
        self.last = b"null"

    def add(self, output: bytes, streamed: bool) -> None:
        self.messages += 1
        self.unstreamed += not streamed
        self.last = output
        self.size += len(output) + 1
        if self.size <= RESULT_BUDGET:
            self.parts.append(output)
        else:
            self.parts = []  # cannot be sent: keep no copy

    def body(self) -> bytes:
        if self.size <= RESULT_BUDGET:
            return b'{"output": [' + b",".join(self.parts) + b"]}"
        if self.unstreamed:
            what = ("The job's output" if self.messages == 1
                    else f"The job's output ({self.messages} messages)")
            error = WorkerError(too_large_for_a_result(what, self.size), code=413,
                                type="output_too_large")
            return encode({"error": str(error_result(error)["error"])})
        log.warning("The job's %d stream messages add up to %d bytes, over the platform's "
                    "limit for a result: the result holds the last message only (the "
                    "client reads them all from /stream)", self.messages, self.size)
        return b'{"output": [' + self.last + b"]}"


# The SDK's ``_transmit``'s request: its form content type and 3 attempts, a 5xx answer tried
# again after FibonacciRetry's waits, any other failure raised at once (the SDK builds an
# aiohttp_retry client for every POST to do this; ``Poster`` is the cheaper client).
_FORM = {"charset": "utf-8", "Content-Type": "application/x-www-form-urlencoded"}
RETRY_WAITS = (2.0, 3.0)


async def transmit(poster: Poster, url: str, body: bytes, request_id: str) -> None:
    """POST ``body`` as the SDK's ``_transmit`` does, the job's id in this request's headers
    (the SDK sets it on the session, shared by every job in flight)."""
    headers = {**_FORM, "X-Request-ID": request_id}
    for wait in (*RETRY_WAITS, None):
        status, answer = await poster.post(url, body, headers)
        if status < 300:
            return
        if status < 500 or wait is None:  # a redirect too: the platform never sends one
            raise PostError(status, f"{answer[:200].decode('utf-8', 'replace')!r}, url={url!r}")
        await asyncio.sleep(wait)


async def post(poster: Poster, url_template: str, job: dict[str, Any], body: bytes,
               is_stream: bool) -> None:
    """One POST as the SDK's ``_handle_result`` makes it, with the body already encoded. A
    POST the platform refused or did not answer is logged, as the SDK does."""
    url = (url_template.replace("$ID", job["id"])
           + f"&isStream={'true' if is_stream else 'false'}")
    try:
        await transmit(poster, url, body, job["id"])
    except (PostError, OSError, TimeoutError) as exc:
        log.error("The platform refused a %d-byte %s for job %s: %s", len(body),
                  "result" if url_template == rp_http.JOB_DONE_URL else "stream message",
                  job["id"], str(exc) or type(exc).__name__)


def _error_of(message: dict[str, Any]) -> dict[str, Any] | None:
    """The SDK's reading of a yield that fails the job."""
    output = message.get("output")
    if isinstance(output, dict) and output.get("error"):
        return {"error": str(output["error"])}
    return {"error": message["error"]} if message.get("error") else None


async def _messages(handler: Callable[..., Any], job: dict[str, Any]
                    ) -> AsyncIterator[dict[str, Any]]:
    """The SDK's ``run_job_generator`` without its debug line per yield: each output as
    ``{"output": ...}``; a handler that raises ends with the SDK's ``{"error": ...}``."""
    try:
        outputs = handler(job)
        if inspect.isasyncgen(outputs):
            async for output in outputs:
                yield {"output": output}
        else:
            for output in outputs:
                yield {"output": output}
    except Exception as err:
        log.error("The job's handler raised: %s", err)
        yield {"error": f"handler: {err} \ntraceback: {traceback.format_exc()}"}


# The poster of each SDK session (JOB_INTAKE=sdk: the SDK's own scaler hands its session).
_posters: weakref.WeakKeyDictionary[Any, Poster] = weakref.WeakKeyDictionary()


def _poster_of(client: Any) -> Poster:
    if isinstance(client, Poster):
        return client
    if (poster := _posters.get(client)) is None:
        poster = _posters[client] = Poster(client.headers)
    return poster


async def handle_job(client: Poster | Any, config: dict[str, Any], job: dict[str, Any]) -> None:
    """Run the job's handler (a generator), stream its messages and post its result.
    ``client``: a Poster, or the SDK's aiohttp session (its headers make one)."""
    poster = _poster_of(client)
    result = JobResult()
    final: bytes | None = None
    async for message in _messages(config["handler"], job):
        if (error := _error_of(message)) is not None:
            final = encode(error)
            break
        output = encode(message["output"])
        streamed = len(output) + 12 <= STREAM_MESSAGE_LIMIT  # 12: '{"output": }'
        if streamed:
            await post(poster, rp_http.JOB_STREAM_URL, job,
                       b'{"output": ' + output + b"}", is_stream=False)
        else:
            log.warning("%s: not streamed; the job's result carries it",
                        too_large_for_a_message("A message of the job", len(output)))
        result.add(output, streamed)
    await post(poster, rp_http.JOB_DONE_URL, job,
               final if final is not None else result.body(), is_stream=True)
