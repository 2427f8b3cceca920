"""The load-balancing front-end's life: listen, start the core, serve, drain on SIGTERM.

The HTTP server listens before vLLM is even imported, so the platform sees /ping answer 204
within seconds of the process start; /ping turns 200 once the engine has served its warm-up
request. SIGTERM: stop accepting, let requests in flight finish (LB_DRAIN_TIMEOUT_S), shut
the engine down, exit 0 with no process left behind.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping

from worker_vllm.config.settings import WorkerSettings, is_unset, load_worker_settings
from worker_vllm.errors import ConfigError, WorkerError
from worker_vllm.lb.server import HTTPServers
from worker_vllm.loop_thread import LoopThread, wait_handling_signals
from worker_vllm.process_tree import end_children, exit_now
from worker_vllm.startup.errors import StartupFailure, startup_failure_action
from worker_vllm.startup.phases import StartupPhases

log = logging.getLogger("worker_vllm.lb")

# RunPod's default port of a load-balancing worker (vLLM's own default, 8000, is not used).
DEFAULT_PORT = 80


def lb_ports(env: Mapping[str, str]) -> tuple[int, int]:
    """(PORT, PORT_HEALTH): the app's port (default 80) and /ping's (default PORT)."""
    ports = []
    for name, default in (("PORT", DEFAULT_PORT), ("PORT_HEALTH", None)):
        raw = env.get(name)
        if is_unset(raw):
            ports.append(default if default is not None else ports[0])
            continue
        try:
            ports.append(int(str(raw).strip()))
        except ValueError:
            raise ConfigError(f"Invalid value {raw!r} for {name}: expected a port number"
                              ) from None
    return ports[0], ports[1]


def health_path(env: Mapping[str, str]) -> str:
    """HEALTH_CHECK_PATH: where the platform checks the worker's health (default /ping)."""
    raw = env.get("HEALTH_CHECK_PATH")
    if is_unset(raw):
        return "/ping"
    path = str(raw).strip()
    if not path.startswith("/") or any(c in path for c in "?# "):
        raise ConfigError(f"Invalid value {raw!r} for HEALTH_CHECK_PATH: expected a path "
                          "such as /ping")
    return path


def _drain_timeout(env: Mapping[str, str]) -> float:
    try:
        return load_worker_settings(dict(env)).lb_drain_timeout_s
    except WorkerError:  # reported by the start-up that follows
        return WorkerSettings.model_fields["lb_drain_timeout_s"].default


def serve_lb(env: Mapping[str, str]) -> int:
    """The process's exit code."""
    phases = StartupPhases()
    try:
        port, health_port = lb_ports(env)
        health = health_path(env)
    except ConfigError as exc:
        log.error("%s", exc.message)
        return 1
    loop = LoopThread("vllm-engine-loop", uvloop=True)  # as under `vllm serve`
    servers = HTTPServers(loop, port, health_port, _drain_timeout(env), health)
    with phases.phase("HTTP server"):
        servers.start()
    # Cold start on RunPod counts from the first 204 to the first 200.
    phases.details["first_ping_possible_s"] = round(time.time() - phases.process_start, 2)
    log.info("Listening on port %d (%s on port %d), %.2f s after the process started: "
             "204 until the engine is ready", port, health, health_port,
             phases.details["first_ping_possible_s"])
    shutdown = Shutdown()
    try:
        # vLLM is imported here, after the server listens.
        from worker_vllm.lb.core import start_core

        core = start_core(env, phases, loop, servers)
    except StartupFailure as exc:
        return _serve_startup_error(servers, exc, env, shutdown)
    shutdown.wait()
    log.info("SIGTERM: no new connections; requests in flight may take up to %.0f s",
             core.settings.lb_drain_timeout_s)
    servers.stop()
    core.close()
    end_children()
    log.info("Stopped")
    return 0


class Shutdown:
    """SIGTERM (or SIGINT): once the worker serves, `wait` returns and the drain begins;
    before that there is nothing to drain, and the process exits at once."""

    def __init__(self) -> None:
        self.serving = False
        self._event = threading.Event()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.serving:
            self._event.set()
            return
        log.info("Signal %d before the worker was serving: exiting", signum)
        exit_now(0)

    def wait(self) -> None:
        self.serving = True
        wait_handling_signals(self._event.wait)


def _serve_startup_error(servers: HTTPServers, failure: StartupFailure,
                         env: Mapping[str, str], shutdown: Shutdown) -> int:
    """Keep serving: /ping 200 with the error, every request 503 with it (no restart loop
    of workers that fail the same way). ON_STARTUP_ERROR=exit exits 1 instead."""
    error = failure.error()
    log.error("Start-up failed: %s", error.message)
    end_children()  # an engine core that half started
    if startup_failure_action(env) == "exit":
        servers.stop()
        return 1
    for app in servers.apps:
        app.failed(error)
    log.error("Every request answers 503 with this error and /ping reports it; fix the "
              "setting and redeploy (ON_STARTUP_ERROR=exit makes the worker exit instead)")
    shutdown.wait()
    servers.stop()
    return 0
