"""The worker-facing webhooks the runpod SDK's job loop calls: job-take(-batch), job-stop
(long-poll), job-stream, job-done and ping."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from .messages import worker_body
from .state import Endpoint

# What the platform takes from a worker (RunPod's docs: one streamed chunk at most 1 MB, a
# result at most 20 MB), read as decimal megabytes, the stricter reading.
STREAM_MESSAGE_LIMIT = 1_000_000
RESULT_LIMIT = 20_000_000


def _too_large(what: str, size: int, limit: int) -> Response:
    return JSONResponse({"error": f"{what} of {size} bytes exceeds the limit of {limit} bytes"},
                        status_code=413)

router = APIRouter(prefix="/_worker")

@router.get("/job-take/{worker_id}")
async def job_take(request: Request, worker_id: str) -> Response:
    endpoint: Endpoint = request.app.state.endpoint
    jobs = await endpoint.take(1, worker_id, request.is_disconnected)
    if not jobs:
        return Response(status_code=204)
    return JSONResponse({"id": jobs[0].id, "input": jobs[0].input})

@router.get("/job-take-batch/{worker_id}")
async def job_take_batch(request: Request, worker_id: str, batch_size: int = 1
                         ) -> Response:
    endpoint: Endpoint = request.app.state.endpoint
    jobs = await endpoint.take(batch_size, worker_id, request.is_disconnected)
    if not jobs:
        return Response(status_code=204)
    return JSONResponse([{"id": j.id, "input": j.input} for j in jobs])

@router.get("/job-stop/{worker_id}")
async def job_stop(request: Request, worker_id: str) -> Response:
    endpoint: Endpoint = request.app.state.endpoint
    ids = await endpoint.stops()
    return JSONResponse({"jobsToStop": ids}) if ids else Response(status_code=204)

@router.post("/job-stream/{worker_id}/{job_id}")
async def job_stream(request: Request, job_id: str) -> Response:
    endpoint: Endpoint = request.app.state.endpoint
    job = endpoint.jobs.get(job_id)
    raw = await request.body()
    if len(raw) > STREAM_MESSAGE_LIMIT:
        if job is not None:
            job.refused.append(f"stream message of {len(raw)} bytes")
        return _too_large("Stream message", len(raw), STREAM_MESSAGE_LIMIT)
    body = worker_body(raw)
    if job is not None and job.status == "IN_PROGRESS" and "output" in body:
        job.chunks.append(body["output"])
        job.chunk_times.append(time.monotonic())
        job.notify()
    if endpoint.stream_post_delay:
        await asyncio.sleep(endpoint.stream_post_delay)
    return Response(status_code=200)

@router.post("/job-done/{worker_id}/{job_id}")
async def job_done(request: Request, job_id: str) -> Response:
    endpoint: Endpoint = request.app.state.endpoint
    job = endpoint.jobs.get(job_id)
    raw = await request.body()
    if len(raw) > RESULT_LIMIT:
        # The hosted platform's handling of the job then is not documented: here it fails,
        # so that a client (and a test) sees that the result was lost.
        if job is not None:
            job.refused.append(f"result of {len(raw)} bytes")
            endpoint.finish(job, "FAILED", error=f"The worker's result of {len(raw)} bytes "
                            f"was refused: over the limit of {RESULT_LIMIT} bytes")
        return _too_large("Result", len(raw), RESULT_LIMIT)
    body = worker_body(raw)
    if job is not None:
        if body.get("error"):
            endpoint.finish(job, "FAILED", error=body["error"])
        else:
            endpoint.finish(job, "COMPLETED", output=body.get("output"))
    return Response(status_code=200)

@router.get("/ping/{worker_id}")
async def ping(request: Request) -> Response:
    endpoint: Endpoint = request.app.state.endpoint
    endpoint.last_seen = time.monotonic()
    # The SDK's heartbeat lists the jobs in progress (comma-separated ids, absent for none).
    listed = set(filter(None, request.query_params.get("job_id", "").split(",")))
    for job in endpoint.jobs.values():
        if job.started is not None:
            job.heard_heartbeat(job.id in listed)
    return Response(status_code=200)
