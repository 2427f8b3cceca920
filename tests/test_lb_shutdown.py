"""The load-balancing worker's shutdown signal (`lb/serve.py:Shutdown`), in a process of its
own: Python runs a signal's handler in the main thread only, and a signal the kernel hands to
another thread (vLLM's and uvicorn's threads run beside it) waits until the main thread next
runs Python code."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# The main thread waits as the serving worker does; a second thread takes a SIGINT meant for
# the process (delivered to it, as the kernel may do), and a third, after 20 s, signals the
# main thread itself so that an untimed wait ends anyway. The script prints how long the wait
# took.
SCRIPT = textwrap.dedent("""
    import signal, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    from worker_vllm.lb.serve import Shutdown

    shutdown = Shutdown()
    main = threading.main_thread().ident
    signal.signal(signal.SIGUSR1, lambda *_: None)

    def elsewhere():
        time.sleep(0.5)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    def rescue():
        time.sleep(20)
        signal.pthread_kill(main, signal.SIGUSR1)

    threading.Thread(target=elsewhere, daemon=True).start()
    threading.Thread(target=rescue, daemon=True).start()
    started = time.monotonic()
    shutdown.wait()
    print(round(time.monotonic() - started - 0.5, 2))
""")


def test_a_signal_taken_by_another_thread_ends_the_wait():
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(SRC)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 5, done.stdout
