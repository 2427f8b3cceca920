"""The core behind the load-balancing front-end: built on the server's loop thread, then
handed to the HTTP app (this module imports vLLM, through the start-up)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from worker_vllm.config.serve_env import LB_SERVER_FLAGS
from worker_vllm.engine import freeze_vllm_env
from worker_vllm.lb.server import HTTPServers
from worker_vllm.loop_thread import LoopThread
from worker_vllm.startup.build import Core, build_core
from worker_vllm.startup.engine_death import on_engine_death
from worker_vllm.startup.phases import StartupPhases

log = logging.getLogger("worker_vllm.lb")


def start_core(env: Mapping[str, str], phases: StartupPhases, loop: LoopThread,
               servers: HTTPServers) -> Core:
    """The engine warmed up on `loop` and served by `servers`; StartupFailure if it cannot."""
    core = build_core(env, read_engine_log=True, phases=phases, loop=loop,
                      server=LB_SERVER_FLAGS)
    freeze_vllm_env()
    servers.apply(core.args)
    for app in servers.apps:
        app.ready(core.app, core.runner)
    # A dead or stuck engine turns /ping unhealthy: the platform replaces the worker.
    on_engine_death(core.runner, core.settings,
                    first=lambda reason: [app.engine_dead(reason) for app in servers.apps],
                    exit_after=None)
    log.info("Serving vLLM's app: %s", ", ".join(core.app.route_list()))
    return core
