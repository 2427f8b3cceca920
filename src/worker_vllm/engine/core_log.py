"""vLLM's own start-up phase figures, read from the lines its engine logs.

Weight loading, profiling, compilation and CUDA-graph capture run in vLLM's engine-core
process, which reports them only in its log. The worker process copies its standard error
(which that process inherits) through a pipe and picks those figures out as they pass; the
patterns follow vLLM's messages of the pinned release.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading
import time
from collections import defaultdict

# phase -> vLLM's log message giving its seconds
PATTERNS = {
    "weight loading": re.compile(r"Loading weights took ([\d.]+) seconds"),
    "compilation": re.compile(r"torch\.compile took ([\d.]+) s in total"),
    "compiled graphs loaded from cache": re.compile(
        r"Directly load the compiled graph.* took ([\d.]+) s"),
    "profiling and warm-up run": re.compile(r"Initial profiling/warmup run took ([\d.]+) s"),
    "CUDA graph capture": re.compile(r"Graph capturing finished in ([\d.]+) secs"),
    "engine init (profile, KV cache, warm-up)": re.compile(
        r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
}


# An exception line logged by vLLM's engine processes, and the generic ones that only point
# back at the first.
_ERROR = re.compile(r"\] (\w+(?:Error|Exception)): (.+)$")
_GENERIC = ("initialization failed", "See root cause", "See stack trace")


# phase -> (the line that starts it, the line that ends it), for phases vLLM logs no figure of
# (on CPU, compilation runs inside the model warm-up).
SPANS = {
    "compilation (model warm-up)": (
        re.compile(r"Warming up model for the compilation"),
        re.compile(r"(saved|loaded) AOT compiled function|Initial profiling/warmup run took")),
}


class EngineCoreLog:
    """Copies this process's stderr (fd 2) through a pipe, collecting vLLM's phase figures.

    The copy runs for the life of the process: the engine core keeps writing to the pipe.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._started = False
        self.root_cause: str | None = None  # the first specific error the engine logged
        self._span_started: dict[str, float] = {}

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        read_fd, write_fd = os.pipe()
        self._original = os.dup(2)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._copy, args=(read_fd, self._original),
                                        daemon=True, name="stderr-copy")
        self._thread.start()
        # The copy is a daemon thread: without this, the last lines written before the
        # process exits (the start-up error, above all) could be lost.
        atexit.register(self.stop)

    def stop(self, timeout: float = 1.0) -> None:
        """Write stderr directly again and let the copy pass on what it still holds."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self._original, 2)  # closes this process's end of the pipe
        self._thread.join(timeout)  # ends at once unless a child still holds the pipe

    def _copy(self, read_fd: int, out_fd: int) -> None:
        pending = b""
        while chunk := os.read(read_fd, 65536):
            try:
                os.write(out_fd, chunk)
            except OSError:
                pass  # keep draining: a full pipe would block every writer
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._scan(line.decode("utf-8", "replace"))

    def _scan(self, line: str) -> None:
        if self.root_cause is None and " ERROR " in line and (match := _ERROR.search(line)):
            if not any(g in match.group(2) for g in _GENERIC):
                self.root_cause = f"{match.group(1)}: {match.group(2).strip()}"
        for phase, pattern in PATTERNS.items():
            if match := pattern.search(line):
                with self._lock:
                    self.seconds[phase] += float(match.group(1))
        for phase, (start, end) in SPANS.items():
            if start.search(line):
                self._span_started[phase] = time.monotonic()
            elif phase in self._span_started and end.search(line):
                with self._lock:
                    self.seconds[phase] += time.monotonic() - self._span_started.pop(phase)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 2) for k, v in self.seconds.items()}
