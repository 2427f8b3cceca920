"""`python src/local_endpoint.py`: the local endpoint with one worker process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from worker_vllm.model import demo as demo_model

from .app import create_app
from .gateway import Gateway, WorkerHealth, create_gateway
from .state import Endpoint
from .worker_process import WorkerProcess, housekeeping, platform_env, queue_worker_exited

log = logging.getLogger("local_platform")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="RunPod's endpoint API on localhost, driving a real worker process.")
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
    parser.add_argument("--take-delay-ms", type=float, default=0.0,
                        help="hold each job-take answer this long after assigning its jobs "
                             "(the platform's latency to the worker; default 0)")
    parser.add_argument("--short-policies", action="store_true",
                        help="accept executionTimeout and ttl below the platform's minimums "
                             "(5 s and 10 s), for tests")
    parser.add_argument("--no-restart", action="store_true",
                        help="do not restart the worker when it exits (the platform does)")
    parser.add_argument("--worker-key", default=None,
                        help="key the worker authenticates with (default: random)")
    parser.add_argument("--lb", action="store_true",
                        help="play a load-balancing endpoint instead: any path is forwarded to "
                             "a worker serving vLLM's app (ENDPOINT_TYPE=lb)")
    parser.add_argument("--health-port", action="store_true",
                        help="with --lb: the worker answers /ping on a port of its own "
                             "(PORT_HEALTH differs from PORT)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    if args.lb:
        serve_lb_gateway(args)
    else:
        serve_queue_endpoint(args)


def _with_demo_model(env: dict[str, str]) -> dict[str, str]:
    if not env.get("MODEL_NAME") and not env.get("MODEL"):
        log.info("MODEL_NAME is not set: the worker serves the built-in demo model")
        env.update(demo_model.demo_env(env))
    return env


def serve_lb_gateway(args: argparse.Namespace) -> None:
    """RunPod's load-balancing gateway in front of one worker in `lb` mode."""
    port = free_port()
    health_port = free_port() if args.health_port else port
    env = _with_demo_model(dict(os.environ, ENDPOINT_TYPE="lb", PORT=str(port),
                                PORT_HEALTH=str(health_port)))
    env.setdefault("RUNPOD_POD_ID", "local-worker")
    # The platform checks the path HEALTH_CHECK_PATH names (default /ping), as the worker
    # reads it from the same environment.
    path = os.environ.get("HEALTH_CHECK_PATH", "").strip() or "/ping"
    health = WorkerHealth(f"http://127.0.0.1:{health_port}{path}")
    gateway = Gateway(f"http://127.0.0.1:{port}", health, args.api_key)
    worker = WorkerProcess(env, lambda _code: None, restart=not args.no_restart)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        worker.start()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(worker.supervise()), loop.create_task(health.poll(worker.end))]
        log.info("Load-balancing endpoint: http://%s:%d/<path> (OpenAI base URL: .../v1)",
                 args.host, args.port)
        yield
        for task in tasks:
            task.cancel()
        worker.stop()

    uvicorn.run(create_gateway(gateway, lifespan), host=args.host, port=args.port,
                log_level="warning")


def serve_queue_endpoint(args: argparse.Namespace) -> None:
    """RunPod's queue endpoint API in front of one worker on the SDK's job loop."""
    worker_key = args.worker_key or secrets.token_urlsafe(16)
    base_url = f"http://{args.host}:{args.port}"
    endpoint = Endpoint(args.max_queue, args.stream_post_delay_ms / 1000,
                        take_delay=args.take_delay_ms / 1000,
                        short_policies=args.short_policies)
    worker: WorkerProcess | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        nonlocal worker
        chores = asyncio.get_running_loop().create_task(housekeeping(endpoint))
        env = platform_env(base_url, worker_key)
        if args.no_worker:
            keys = [k for k in env if k.startswith("RUNPOD_")]
            print("Start a worker with:\n" + "\n".join(f"export {k}='{env[k]}'" for k in keys)
                  + "\npython src/handler.py", flush=True)
        else:
            _with_demo_model(env)
            worker = WorkerProcess(env, queue_worker_exited(endpoint),
                                   restart=not args.no_restart)
            worker.start()
            asyncio.get_running_loop().create_task(worker.supervise())
        log.info("Endpoint: %s/v2/local (any endpoint id works)", base_url)
        yield
        chores.cancel()
        if worker is not None:
            worker.stop()

    app = create_app(endpoint, args.api_key, worker_key, lifespan)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
