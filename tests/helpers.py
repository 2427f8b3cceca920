"""Helpers the tests share (test modules do not import each other)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def job_handler(env: dict[str, str]) -> Iterator[Any]:
    """The core built from `env` and the queue front-end's job handler on it."""
    from worker_vllm.jobs.dispatch import JobHandler
    from worker_vllm.startup.build import build_core

    core = build_core(env)
    try:
        yield JobHandler(core.runner, core.settings, core.app, core.chat_template)
    finally:
        core.close()
