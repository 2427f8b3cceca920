"""uvicorn on the engine's loop thread: requests reach vLLM's app with no hop between loops,
as under `vllm serve`. The servers listen before vLLM is imported, so /ping answers 204 within
seconds of the process start; vLLM's server flags (log level, access log, header limits) are
applied once the settings are parsed."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any

import uvicorn

from worker_vllm.lb.app import LoadBalancerApp

log = logging.getLogger("worker_vllm.lb")


class _NoPingLines(logging.Filter):
    """The platform pings every few seconds: keep those lines out of the access log."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        super().__init__()
        self.paths = paths

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) >= 3 and args[2] in self.paths)


class HTTPServers:
    """The app's server on `port` and, when /ping has its own port, the ping server.
    `health_path`: where the platform checks health (HEALTH_CHECK_PATH), besides /ping."""

    def __init__(self, loop: Any, port: int, health_port: int, drain_timeout: float,
                 health_path: str = "/ping") -> None:
        self.loop = loop  # a LoopThread
        paths = tuple(dict.fromkeys(("/ping", health_path)))
        self.app = LoadBalancerApp(paths if health_port == port else ())
        self.servers = [self._server(self.app, port, drain_timeout)]
        if health_port != port:
            self.servers.append(self._server(LoadBalancerApp(paths), health_port,
                                             drain_timeout))
        self._tasks: list[Future] = []
        _log_like_the_worker(paths)

    @staticmethod
    def _server(app: LoadBalancerApp, port: int, drain_timeout: float) -> uvicorn.Server:
        config = uvicorn.Config(app, host="0.0.0.0", port=port, lifespan="on",
                                timeout_graceful_shutdown=drain_timeout, log_config=None)
        return uvicorn.Server(config)

    def start(self, timeout: float = 30.0) -> None:
        """Listen; returns once every server accepts connections."""
        self._tasks = [self.loop.submit(server.serve()) for server in self.servers]
        deadline = time.monotonic() + timeout
        while not all(server.started for server in self.servers):
            for task in self._tasks:
                if task.done():
                    task.result()  # raises why it stopped (a port in use, ...)
                    raise RuntimeError("The HTTP server stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError("The HTTP server did not start listening")
            time.sleep(0.01)

    @property
    def apps(self) -> list[LoadBalancerApp]:
        """Every app whose state /ping reports."""
        return [server.config.app for server in self.servers]

    def apply(self, args: Any) -> None:
        """vLLM's server flags, from the parsed `vllm serve` arguments: they apply to the
        connections accepted from now on."""
        logging.getLogger("uvicorn").setLevel(str(args.uvicorn_log_level).upper())
        logging.getLogger("uvicorn.access").disabled = bool(args.disable_uvicorn_access_log)
        for server in self.servers:
            config = server.config
            if args.h11_max_incomplete_event_size is not None:
                config.h11_max_incomplete_event_size = args.h11_max_incomplete_event_size
            if args.h11_max_header_count is not None:
                config.h11_max_header_count = args.h11_max_header_count

    def stop(self) -> None:
        """Stop accepting; requests in flight finish (up to the drain timeout); returns when
        every server has stopped."""
        for server in self.servers:
            server.should_exit = True
        for task in self._tasks:
            try:
                task.result(timeout=3600)
            except Exception:
                log.warning("The HTTP server stopped with an error", exc_info=True)


def _log_like_the_worker(health_paths: tuple[str, ...]) -> None:
    """uvicorn's lines (its access log included) through the worker's log handler."""
    worker = logging.getLogger("worker_vllm")
    server = logging.getLogger("uvicorn")
    server.handlers[:] = list(worker.handlers)
    server.setLevel(logging.INFO)
    server.propagate = False
    logging.getLogger("uvicorn.access").addFilter(_NoPingLines(health_paths))
