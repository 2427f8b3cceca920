"""Logging: INFO by default, every line about a job carries its job id."""

from __future__ import annotations

import contextvars
import logging
import os

job_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="-")


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = job_id_var.get()
        return True


def setup_logging() -> None:
    # The SDK logs every streamed chunk at its default level (DEBUG); INFO unless the user asks.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    # Logs go to stderr, so stdout carries only results (local test mode prints JSON there).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    level = os.environ["RUNPOD_LOG_LEVEL"].upper()
    handler = logging.StreamHandler()
    handler.addFilter(_JobIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [job %(job_id)s] %(name)s: %(message)s")
    )
    root = logging.getLogger("worker_vllm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
