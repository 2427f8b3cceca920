"""The public endpoint API clients call: run, runsync, status, stream, cancel, retry, purge,
health."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .messages import RUN_LIMIT, RUNSYNC_LIMIT, ApiError, json_body
from .state import FINAL, LONG_POLL_S, Endpoint, Job, PolicyError

RUNSYNC_DEFAULT_WAIT_MS = 90_000


router = APIRouter(prefix="/v2/{endpoint_id}")


def job_of(endpoint: Endpoint, job_id: str) -> Job:
    job = endpoint.jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"Job {job_id} not found")
    return job


async def accept(endpoint: Endpoint, request: Request, limit: int, sync: bool) -> Job:
    """Validate a /run or /runsync request and queue its job."""
    body = await json_body(request, limit)
    if "input" not in body:
        raise ApiError(400, 'The body needs an "input" field')
    if len(endpoint.queue) >= endpoint.max_queue:
        raise ApiError(429, f"The queue is full ({endpoint.max_queue} jobs)")
    try:
        return endpoint.submit(body, sync=sync)
    except PolicyError as exc:
        raise ApiError(400, str(exc)) from None

@router.post("/run")
async def run(request: Request) -> JSONResponse:
    endpoint: Endpoint = request.app.state.endpoint
    job = await accept(endpoint, request, RUN_LIMIT, sync=False)
    return JSONResponse({"id": job.id, "status": job.status})

@router.post("/runsync")
async def runsync(request: Request, wait: int = RUNSYNC_DEFAULT_WAIT_MS) -> JSONResponse:
    endpoint: Endpoint = request.app.state.endpoint
    job = await accept(endpoint, request, RUNSYNC_LIMIT, sync=True)
    deadline = time.monotonic() + wait / 1000
    while job.status not in FINAL and (left := deadline - time.monotonic()) > 0:
        await job.wait_change(left)
    return JSONResponse(job.view())

@router.get("/status/{job_id}")
async def status(request: Request, job_id: str) -> JSONResponse:
    endpoint: Endpoint = request.app.state.endpoint
    return JSONResponse(job_of(endpoint, job_id).view())

@router.get("/stream/{job_id}")
async def stream(request: Request, job_id: str) -> JSONResponse:
    endpoint: Endpoint = request.app.state.endpoint
    job = job_of(endpoint, job_id)
    if job.streamed == len(job.chunks) and job.status not in FINAL:
        await job.wait_change(2.0)  # brief hold, well inside clients' 10 s timeout
    new = job.chunks[job.streamed:]
    job.streamed += len(new)
    body = {"status": job.status, "stream": [{"output": c} for c in new]}
    if job.error is not None:
        body["error"] = job.error
    return JSONResponse(body)

@router.post("/cancel/{job_id}")
async def cancel(request: Request, job_id: str) -> JSONResponse:
    endpoint: Endpoint = request.app.state.endpoint
    job = job_of(endpoint, job_id)
    endpoint.stop(job, "CANCELLED")
    return JSONResponse({"id": job.id, "status": job.status})

@router.post("/retry/{job_id}")
async def retry(request: Request, job_id: str) -> JSONResponse:
    endpoint: Endpoint = request.app.state.endpoint
    job = job_of(endpoint, job_id)
    try:
        endpoint.retry(job)
    except PolicyError as exc:
        raise ApiError(400, str(exc)) from None
    return JSONResponse({"id": job.id, "status": job.status})

@router.post("/purge-queue")
async def purge_queue(request: Request) -> JSONResponse:
    endpoint: Endpoint = request.app.state.endpoint
    removed = 0
    for job_id in list(endpoint.queue):
        job = endpoint.jobs.get(job_id)
        if job is not None and job.status == "IN_QUEUE":
            endpoint.finish(job, "CANCELLED")
            removed += 1
    endpoint.queue.clear()
    return JSONResponse({"removed": removed, "status": "completed"})

@router.get("/health")
async def health(request: Request) -> JSONResponse:
    endpoint: Endpoint = request.app.state.endpoint
    running = len(endpoint.in_progress())
    alive = time.monotonic() - endpoint.last_seen < 2 * LONG_POLL_S + 5
    in_queue = sum(1 for j in endpoint.jobs.values() if j.status == "IN_QUEUE")
    return JSONResponse({
        "jobs": {"completed": endpoint.counts["completed"],
                 "failed": endpoint.counts["failed"] + endpoint.counts["timed_out"],
                 "inProgress": running, "inQueue": in_queue,
                 "retried": endpoint.counts["retried"]},
        "workers": {"idle": int(alive and not running), "running": int(running > 0)},
    })
