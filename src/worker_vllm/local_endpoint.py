"""A local endpoint: RunPod's hosted endpoint API on localhost, driving a real worker process.

Clients (curl, ``runpod.Endpoint``, the ``openai`` SDK) talk to ``/v2/{endpoint_id}/...`` as they
would to ``api.runpod.ai``; the worker (``python src/handler.py``, unmodified) runs its real
runpod SDK job loop against the worker-facing webhooks under ``/_worker/``: job-take(-batch),
job-stream, job-done, the job-stop long-poll and ping.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from . import demo_model

log = logging.getLogger("worker_vllm.local_endpoint")

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
RUN_LIMIT = 10 * 1024 * 1024  # documented payload limits of /run and /runsync
RUNSYNC_LIMIT = 20 * 1024 * 1024
DEFAULT_EXECUTION_TIMEOUT_MS = 600_000
DEFAULT_TTL_MS = 24 * 3600 * 1000
RUNSYNC_DEFAULT_WAIT_MS = 90_000
LONG_POLL_S = 5.0  # job-take / job-stop hold time (the SDK's HTTP timeouts are longer)


@dataclass
class Job:
    id: str
    input: Any
    execution_timeout: float  # seconds
    ttl: float  # seconds
    webhook: str | None = None
    status: str = "IN_QUEUE"
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    output: Any = None
    error: Any = None
    chunks: list[Any] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each (monotonic)
    streamed: int = 0  # chunks already returned by /stream
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    def view(self) -> dict[str, Any]:
        now = time.monotonic()
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            body["delayTime"] = round((self.started - self.created) * 1000)
            body["executionTime"] = round(((self.finished or now) - self.started) * 1000)
        if self.status == "COMPLETED":
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


class Endpoint:
    """Job queue and state: the part of the platform one worker sees."""

    def __init__(self, max_queue: int, stream_post_delay: float = 0.0) -> None:
        # Seconds each job-stream POST is held before it is answered: the platform's round
        # trip, which the worker's SDK awaits before it takes the next yield.
        self.stream_post_delay = stream_post_delay
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[str] = collections.deque()
        self.max_queue = max_queue
        self.queued = asyncio.Event()
        self.to_stop: set[str] = set()
        self.stop_requested = asyncio.Event()
        self.counts = collections.Counter[str]()
        self.last_seen = 0.0  # last time the worker called in

    # ----- client side ---------------------------------------------------------------
    def submit(self, body: dict[str, Any]) -> Job:
        policy = body.get("policy") or {}
        job = Job(
            id=f"{uuid.uuid4()}-local",
            input=body.get("input"),
            execution_timeout=float(policy.get("executionTimeout", DEFAULT_EXECUTION_TIMEOUT_MS))
            / 1000,
            ttl=float(policy.get("ttl", DEFAULT_TTL_MS)) / 1000,
            webhook=body.get("webhook"),
        )
        self.jobs[job.id] = job
        self.queue.append(job.id)
        self.queued.set()
        return job

    def finish(self, job: Job, status: str, *, output: Any = None, error: Any = None) -> None:
        if job.status in FINAL:
            return  # a late result of a cancelled or timed-out job is dropped
        job.status, job.output, job.error = status, output, error
        job.finished = time.monotonic()
        self.counts[status.lower()] += 1
        if job.id in self.queue:
            self.queue.remove(job.id)
        job.notify()
        if job.webhook:
            asyncio.get_running_loop().create_task(self._post_webhook(job))

    def stop(self, job: Job, status: str) -> None:
        was_running = job.status == "IN_PROGRESS"
        self.finish(job, status)
        if was_running:
            self.to_stop.add(job.id)
            self.stop_requested.set()

    async def _post_webhook(self, job: Job) -> None:
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                await client.post(job.webhook, json=job.view())  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            log.warning("webhook for job %s failed: %s", job.id, exc)

    def expire(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.status == "IN_QUEUE" and now - job.created > job.ttl:
                self.finish(job, "TIMED_OUT", error="The job's ttl expired before it started")
            if job.status in FINAL and now - (job.finished or now) > job.ttl:
                del self.jobs[job.id]

    # ----- worker side ---------------------------------------------------------------
    async def take(self, batch_size: int) -> list[Job]:
        self.last_seen = time.monotonic()
        if not self.queue:
            self.queued.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LONG_POLL_S):
                    await self.queued.wait()
        taken = []
        while self.queue and len(taken) < batch_size:
            job = self.jobs.get(self.queue.popleft())
            if job is None or job.status != "IN_QUEUE":
                continue
            job.status, job.started = "IN_PROGRESS", time.monotonic()
            job.notify()
            asyncio.get_running_loop().create_task(self._enforce_timeout(job))
            taken.append(job)
        return taken

    async def _enforce_timeout(self, job: Job) -> None:
        await asyncio.sleep(job.execution_timeout)
        if job.status == "IN_PROGRESS":
            self.stop(job, "TIMED_OUT")

    async def stops(self) -> list[str]:
        if not self.to_stop:
            self.stop_requested.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LONG_POLL_S):
                    await self.stop_requested.wait()
        ids, self.to_stop = sorted(self.to_stop), set()
        return ids

    def in_progress(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.status == "IN_PROGRESS"]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _openai_error(status: int, message: str, type_: str = "invalid_request_error",
                  param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": status}},
        status_code=status,
    )


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


async def _json_body(request: Request, limit: int) -> dict[str, Any] | Response:
    raw = await request.body()
    if len(raw) > limit:
        return _error(413, f"Payload of {len(raw)} bytes exceeds the limit of {limit} bytes")
    try:
        # Standard JSON only: NaN, Infinity and lone surrogates cannot be handed on.
        body = json.loads(raw or b"{}", parse_constant=_reject_constant)
    except ValueError as exc:
        return _error(400, f"The body is not valid JSON: {exc}")
    if _lone_surrogate(body):
        return _error(400, "The body is not valid JSON: a string holds a lone surrogate")
    if not isinstance(body, dict):
        return _error(400, "The body must be a JSON object")
    return body


def _job_error_to_openai(error: Any) -> JSONResponse:
    """The worker's error (its JSON text, as the SDK stores it) as an OpenAI error response."""
    detail: Any = error
    if isinstance(error, str):
        with contextlib.suppress(ValueError):
            detail = json.loads(error)
    if isinstance(detail, dict) and isinstance(detail.get("error"), dict):
        detail = detail["error"]
    if not isinstance(detail, dict) or "message" not in detail:
        return _openai_error(500, str(error), "internal_error")
    code = detail.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return _openai_error(status, detail["message"], detail.get("type", "internal_error"),
                         detail.get("param"))


def _sse_text(chunk: Any) -> str:
    return chunk if isinstance(chunk, str) else f"data: {json.dumps(chunk)}\n\n"


class _AuthMiddleware:
    """Bearer-key check as a pure ASGI middleware: Starlette's @app.middleware("http") wraps
    every request and streamed body in extra tasks, a large share of this server's CPU."""

    def __init__(self, app: Any, api_key: str | None, worker_key: str) -> None:
        self.app, self.api_key, self.worker_key = app, api_key, worker_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            given = dict(scope["headers"]).get(b"authorization", b"").decode(
                "latin-1").removeprefix("Bearer ")
            denied: Response | None = None
            if path.startswith("/_worker/"):
                if given != self.worker_key:
                    denied = _error(401, "Unknown worker")
            elif self.api_key and given != self.api_key:
                denied = (_openai_error(401, "Invalid or missing API key", "authentication_error")
                          if "/openai/" in path else _error(401, "Invalid or missing API key"))
            if denied is not None:
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(endpoint: Endpoint, api_key: str | None, worker_key: str,
               lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="worker-vllm local endpoint", lifespan=lifespan)
    app.add_middleware(_AuthMiddleware, api_key=api_key, worker_key=worker_key)

    def job_or_404(job_id: str) -> Job | Response:
        job = endpoint.jobs.get(job_id)
        return job if job is not None else _error(404, f"Job {job_id} not found")

    # ----- public API --------------------------------------------------------------
    async def accept(request: Request, limit: int) -> Job | Response:
        """Validate a /run or /runsync request and queue its job."""
        body = await _json_body(request, limit)
        if isinstance(body, Response):
            return body
        if "input" not in body:
            return _error(400, 'The body needs an "input" field')
        if len(endpoint.queue) >= endpoint.max_queue:
            return _error(429, f"The queue is full ({endpoint.max_queue} jobs)")
        return endpoint.submit(body)

    @app.post("/v2/{endpoint_id}/run")
    async def run(request: Request) -> Response:
        job = await accept(request, RUN_LIMIT)
        if isinstance(job, Response):
            return job
        return JSONResponse({"id": job.id, "status": job.status})

    @app.post("/v2/{endpoint_id}/runsync")
    async def runsync(request: Request, wait: int = RUNSYNC_DEFAULT_WAIT_MS) -> Response:
        job = await accept(request, RUNSYNC_LIMIT)
        if isinstance(job, Response):
            return job
        deadline = time.monotonic() + wait / 1000
        while job.status not in FINAL and (left := deadline - time.monotonic()) > 0:
            await job.wait_change(left)
        return JSONResponse(job.view())

    @app.get("/v2/{endpoint_id}/status/{job_id}")
    async def status(job_id: str) -> Response:
        job = job_or_404(job_id)
        return job if isinstance(job, Response) else JSONResponse(job.view())

    @app.get("/v2/{endpoint_id}/stream/{job_id}")
    async def stream(job_id: str) -> Response:
        job = job_or_404(job_id)
        if isinstance(job, Response):
            return job
        if job.streamed == len(job.chunks) and job.status not in FINAL:
            await job.wait_change(2.0)  # brief hold, well inside clients' 10 s timeout
        new = job.chunks[job.streamed:]
        job.streamed += len(new)
        body = {"status": job.status, "stream": [{"output": c} for c in new]}
        if job.error is not None:
            body["error"] = job.error
        return JSONResponse(body)

    @app.post("/v2/{endpoint_id}/cancel/{job_id}")
    async def cancel(job_id: str) -> Response:
        job = job_or_404(job_id)
        if isinstance(job, Response):
            return job
        endpoint.stop(job, "CANCELLED")
        return JSONResponse({"id": job.id, "status": job.status})

    @app.post("/v2/{endpoint_id}/purge-queue")
    async def purge_queue() -> Response:
        removed = 0
        for job_id in list(endpoint.queue):
            job = endpoint.jobs.get(job_id)
            if job is not None and job.status == "IN_QUEUE":
                endpoint.finish(job, "CANCELLED")
                removed += 1
        endpoint.queue.clear()
        return JSONResponse({"removed": removed, "status": "completed"})

    @app.get("/v2/{endpoint_id}/health")
    async def health() -> Response:
        running = len(endpoint.in_progress())
        alive = time.monotonic() - endpoint.last_seen < 2 * LONG_POLL_S + 5
        in_queue = sum(1 for j in endpoint.jobs.values() if j.status == "IN_QUEUE")
        return JSONResponse({
            "jobs": {"completed": endpoint.counts["completed"],
                     "failed": endpoint.counts["failed"] + endpoint.counts["timed_out"],
                     "inProgress": running, "inQueue": in_queue, "retried": 0},
            "workers": {"idle": int(alive and not running), "running": int(running > 0)},
        })

    # Inferred from the platform's documented behaviour, not from its code: a request to
    # /openai/v1/<path> becomes a job {"openai_route": "/v1/<path>", "openai_input": body},
    # and a streamed job's yields (SSE text) are relayed as the text/event-stream body.
    @app.api_route("/v2/{endpoint_id}/openai/v1/{path:path}", methods=["GET", "POST"])
    async def openai_route(request: Request, path: str) -> Response:
        body: dict[str, Any] | None = None
        if request.method == "POST":
            parsed = await _json_body(request, RUNSYNC_LIMIT)
            if isinstance(parsed, Response):
                return _openai_error(parsed.status_code, json.loads(parsed.body)["error"])
            body = parsed
        if len(endpoint.queue) >= endpoint.max_queue:
            return _openai_error(429, "The queue is full", "rate_limit_error")
        job_input: dict[str, Any] = {"openai_route": f"/v1/{path}"}
        if body is not None:
            job_input["openai_input"] = body
        job = endpoint.submit({"input": job_input})
        if body is not None and body.get("stream"):
            return await _stream_openai(job, request)
        while job.status not in FINAL:
            if await request.is_disconnected():
                # vLLM's own server aborts a request whose client went away; so does this.
                endpoint.stop(job, "CANCELLED")
                return Response(status_code=499)
            await job.wait_change(1.0)
        if job.status != "COMPLETED":
            return _job_error_to_openai(job.error or f"The job ended {job.status}")
        outputs = job.output if isinstance(job.output, list) else [job.output]
        return JSONResponse(outputs[0] if outputs else None)

    async def _stream_openai(job: Job, request: Request) -> Response:
        # Wait for the first chunk (or the end) so an error can still get its HTTP status.
        while not job.chunks and job.status not in FINAL:
            if await request.is_disconnected():
                endpoint.stop(job, "CANCELLED")
                return Response(status_code=499)
            await job.wait_change(1.0)
        if not job.chunks and job.status != "COMPLETED":
            return _job_error_to_openai(job.error or f"The job ended {job.status}")

        async def relay():
            sent = 0
            try:
                while True:
                    while sent < len(job.chunks):
                        yield _sse_text(job.chunks[sent])
                        sent += 1
                    if job.status in FINAL:
                        if job.status != "COMPLETED":
                            err = json.loads(_job_error_to_openai(job.error or job.status).body)
                            yield f"data: {json.dumps(err)}\n\n"
                        return
                    await job.wait_change(30)
            finally:
                # The client went away (the response was closed early): cancel its job.
                if job.status not in FINAL:
                    endpoint.stop(job, "CANCELLED")

        return StreamingResponse(relay(), media_type="text/event-stream")

    # ----- worker-facing webhooks --------------------------------------------------
    @app.get("/_worker/job-take/{worker_id}")
    async def job_take(worker_id: str) -> Response:
        jobs = await endpoint.take(1)
        if not jobs:
            return Response(status_code=204)
        return JSONResponse({"id": jobs[0].id, "input": jobs[0].input})

    @app.get("/_worker/job-take-batch/{worker_id}")
    async def job_take_batch(worker_id: str, batch_size: int = 1) -> Response:
        jobs = await endpoint.take(batch_size)
        if not jobs:
            return Response(status_code=204)
        return JSONResponse([{"id": j.id, "input": j.input} for j in jobs])

    @app.get("/_worker/job-stop/{worker_id}")
    async def job_stop(worker_id: str) -> Response:
        ids = await endpoint.stops()
        return JSONResponse({"jobsToStop": ids}) if ids else Response(status_code=204)

    async def _worker_body(request: Request) -> dict[str, Any]:
        # The SDK sends JSON with a form content type.
        return json.loads(await request.body() or b"{}")

    @app.post("/_worker/job-stream/{worker_id}/{job_id}")
    async def job_stream(request: Request, job_id: str) -> Response:
        job = endpoint.jobs.get(job_id)
        body = await _worker_body(request)
        if job is not None and job.status == "IN_PROGRESS" and "output" in body:
            job.chunks.append(body["output"])
            job.chunk_times.append(time.monotonic())
            job.notify()
        if endpoint.stream_post_delay:
            await asyncio.sleep(endpoint.stream_post_delay)
        return Response(status_code=200)

    @app.post("/_worker/job-done/{worker_id}/{job_id}")
    async def job_done(request: Request, job_id: str) -> Response:
        job = endpoint.jobs.get(job_id)
        body = await _worker_body(request)
        if job is not None:
            if body.get("error"):
                endpoint.finish(job, "FAILED", error=body["error"])
            else:
                endpoint.finish(job, "COMPLETED", output=body.get("output"))
        return Response(status_code=200)

    @app.get("/_worker/ping/{worker_id}")
    async def ping() -> Response:
        endpoint.last_seen = time.monotonic()
        return Response(status_code=200)

    return app


def worker_env(base_url: str, worker_key: str, base: dict[str, str] | None = None
               ) -> dict[str, str]:
    """The platform's env for a worker that talks to this endpoint."""
    env = dict(os.environ if base is None else base)
    env.update(
        RUNPOD_WEBHOOK_GET_JOB=f"{base_url}/_worker/job-take/$ID?local=1",
        RUNPOD_WEBHOOK_POST_OUTPUT=f"{base_url}/_worker/job-done/$RUNPOD_POD_ID/$ID?local=1",
        RUNPOD_WEBHOOK_POST_STREAM=f"{base_url}/_worker/job-stream/$RUNPOD_POD_ID/$ID?local=1",
        RUNPOD_WEBHOOK_PING=f"{base_url}/_worker/ping/$RUNPOD_POD_ID",
        RUNPOD_AI_API_KEY=worker_key,
        RUNPOD_POD_ID=env.get("RUNPOD_POD_ID", "local-worker"),
        # The production start-up checks need internet and a GPU: off for local runs.
        RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true",
        RUNPOD_SKIP_GPU_CHECK="true",
    )
    env.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    return env


async def _housekeeping(endpoint: Endpoint) -> None:
    while True:
        await asyncio.sleep(1)
        endpoint.expire()


class WorkerProcess:
    """The worker process, restarted when it exits (as the platform replaces workers)."""

    def __init__(self, env: dict[str, str], endpoint: Endpoint, restart: bool) -> None:
        self.env, self.endpoint, self.restart = env, endpoint, restart
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.starts = 0

    def start(self) -> None:
        handler = Path(__file__).resolve().parents[1] / "handler.py"
        self.proc = subprocess.Popen([sys.executable, str(handler)], env=self.env)
        self.starts += 1
        log.info("Worker pid %s is starting", self.proc.pid)

    async def supervise(self) -> None:
        while not self.stopping:
            assert self.proc is not None
            while self.proc.poll() is None:
                await asyncio.sleep(0.5)
            if self.stopping:
                return
            code = self.proc.returncode
            self.endpoint.last_seen = 0.0  # no worker until the next one calls in
            log.error("The worker process exited with code %s", code)
            for job in self.endpoint.in_progress():
                self.endpoint.finish(job, "FAILED", error=f"The worker exited with code {code}")
            if not self.restart:
                return
            await asyncio.sleep(min(30, 2 ** min(self.starts, 5)))  # back off on repeated exits
            if not self.stopping:
                self.start()

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer <key>' (default: no auth)")
    parser.add_argument("--max-queue", type=int, default=1000,
                        help="jobs waiting at most; more get HTTP 429")
    parser.add_argument("--no-worker", action="store_true",
                        help="start no worker; print the env for one started separately")
    parser.add_argument("--stream-post-delay-ms", type=float, default=0.0,
                        help="hold each job-stream POST this long before answering "
                             "(simulates the platform's round trip; default 0)")
    parser.add_argument("--no-restart", action="store_true",
                        help="do not restart the worker when it exits (the platform does)")
    parser.add_argument("--worker-key", default=None,
                        help="key the worker authenticates with (default: random)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    worker_key = args.worker_key or secrets.token_urlsafe(16)
    base_url = f"http://{args.host}:{args.port}"
    endpoint = Endpoint(args.max_queue, args.stream_post_delay_ms / 1000)
    worker: WorkerProcess | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        nonlocal worker
        housekeeping = asyncio.get_running_loop().create_task(_housekeeping(endpoint))
        env = worker_env(base_url, worker_key)
        if args.no_worker:
            keys = [k for k in env if k.startswith("RUNPOD_")]
            print("Start a worker with:\n" + "\n".join(f"export {k}='{env[k]}'" for k in keys)
                  + "\npython src/handler.py", flush=True)
        else:
            if not env.get("MODEL_NAME") and not env.get("MODEL"):
                log.info("MODEL_NAME is not set: the worker serves the built-in demo model")
                env.update(demo_model.demo_env(env))
            worker = WorkerProcess(env, endpoint, restart=not args.no_restart)
            worker.start()
            asyncio.get_running_loop().create_task(worker.supervise())
        log.info("Endpoint: %s/v2/local (any endpoint id works)", base_url)
        yield
        housekeeping.cancel()
        if worker is not None:
            worker.stop()

    app = create_app(endpoint, args.api_key, worker_key, lifespan)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
