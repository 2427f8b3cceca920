"""Leaving without leftovers: whatever ends the worker, the processes it started end too.

The runpod SDK pings from a separate multiprocessing process and vLLM runs its engine core
in another; ``os._exit`` skips the clean-ups that would end them, so they are ended here.
"""

from __future__ import annotations

import logging
import os

import psutil

log = logging.getLogger(__name__)


def end_children(timeout: float = 5.0) -> None:
    """Terminate every descendant process, then kill those still running after `timeout`."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            # multiprocessing's resource tracker ignores SIGTERM (it ends when this process
            # does); it holds nothing to save: killed at once rather than waited for.
            if "multiprocessing.resource_tracker" in " ".join(child.cmdline()):
                child.kill()
            else:
                child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            log.warning("Process %d (%s) did not end within %.0f s: killing it", child.pid,
                        child.name(), timeout)
            child.kill()
        except psutil.Error:
            pass


def exit_now(code: int) -> None:
    """Exit at once (from any thread), ending the worker's child processes first (quickly:
    this is the way out when something is already broken)."""
    end_children(timeout=1.0)
    logging.shutdown()
    os._exit(code)
