"""Leaving without leftovers: whatever ends the worker, the processes it started end too.

The runpod SDK pings from a separate multiprocessing process and vLLM runs its engine core
in another; ``os._exit`` skips the clean-ups that would end them, so they are ended here.
"""

from __future__ import annotations

import contextlib
import logging
import os

import psutil

log = logging.getLogger(__name__)

# How long to wait for killed processes to be gone.
KILLED_TEARDOWN_S = 30.0

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


def _started() -> list[psutil.Process]:
    """The processes the worker started that still run: its descendants, the remembered
    ones (``is_running`` also checks the start time, so a reused pid is not taken for one)
    and, when it leads its process group (a terminal's job, a container's first process),
    the group's other members: processes whose parents ended were re-parented, and a dying
    one may have started another (multiprocessing's resource tracker) meanwhile."""
    found = {p.pid: p for p in _seen.values() if p.is_running()}
    try:
        found.update((p.pid, p) for p in psutil.Process().children(recursive=True))
    except psutil.Error:
        pass
    if os.getpgrp() == os.getpid():
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid != os.getpid() and os.getpgid(proc.pid) == os.getpid() \
                        and proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
    return list(found.values())


def _is_tracker(proc: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _end(procs: list[psutil.Process], timeout: float) -> None:
    """Terminate `procs` (kill resource trackers: they ignore SIGTERM and hold nothing to
    save), kill those still running after `timeout`, and wait until they are gone."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if _is_tracker(proc):
                proc.kill()
            else:
                proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            log.warning("Process %d (%s) did not end within %.0f s: killing it", proc.pid,
                        proc.name(), timeout)
            proc.kill()
    # A killed process cannot refuse, but the kernel may take seconds to tear down one that
    # holds a model's memory on a busy machine (one was still there 5 s after SIGKILL, on a
    # 2-core CPU running the test suite).
    _, left = psutil.wait_procs(alive, timeout=KILLED_TEARDOWN_S)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            log.warning("Process %d (%s) was killed and is still there after %.0f s",
                        proc.pid, proc.name(), KILLED_TEARDOWN_S)


def end_children(timeout: float = 5.0) -> None:
    """End every process the worker started and return once they are gone: first all but
    multiprocessing's resource trackers (a process that ends may start a new tracker), then
    whatever is left, trackers included."""
    _end([p for p in _started() if not _is_tracker(p)], timeout)
    _end(_started(), timeout)


def exit_now(code: int) -> None:
    """Exit at once (from any thread), ending the worker's child processes first (quickly:
    this is the way out when something is already broken)."""
    end_children(timeout=1.0)
    logging.shutdown()
    os._exit(code)
