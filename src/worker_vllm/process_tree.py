"""Leaving without leftovers: whatever ends the worker, the processes it started end too.

The runpod SDK pings from a separate multiprocessing process and vLLM runs its engine core
in another; ``os._exit`` skips the clean-ups that would end them, so they are ended here.
"""

from __future__ import annotations

import logging
import os

import psutil

log = logging.getLogger(__name__)

# Descendants seen so far (``note_descendants``), by pid.
_seen: dict[int, psutil.Process] = {}


def note_descendants() -> None:
    """Remember the processes started so far, so that they are ended at exit even once they
    are no longer descendants: a signal to the whole process group (Ctrl-C) ends vLLM's
    engine core, whose own worker process is then re-parented and lives on."""
    try:
        for child in psutil.Process().children(recursive=True):
            _seen[child.pid] = child
    except psutil.Error:
        pass


def _descendants() -> list[psutil.Process]:
    """Descendants now, and remembered ones still running (``is_running`` also checks the
    start time, so a reused pid is not taken for one)."""
    found = {p.pid: p for p in _seen.values() if p.is_running()}
    try:
        found.update((p.pid, p) for p in psutil.Process().children(recursive=True))
    except psutil.Error:
        pass
    return list(found.values())


def end_children(timeout: float = 5.0) -> None:
    """Terminate every descendant process (and every remembered one), then kill those still
    running after `timeout`."""
    children = _descendants()
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
