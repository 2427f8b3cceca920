"""Entry point of the worker: `python src/handler.py`.

On a queue endpoint (the platform's webhooks are set) it serves jobs through the runpod SDK's
job loop; locally it runs one job from `--test_input '{...}'` or `test_input.json` and prints
the result (`worker_vllm.queue.serve`). On a load-balancing endpoint (ENDPOINT_TYPE=lb, or
PORT_HEALTH set) it serves vLLM's app over HTTP (`worker_vllm.lb`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

# huggingface_hub reads this at import: use its high-throughput (Xet) transfer for downloads.
os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")

from worker_vllm.logs import setup_logging

setup_logging()
log = logging.getLogger("worker_vllm.handler")


SDK_TEST_SERVER = ("--rp_serve_api (the runpod SDK's local test server) is not how this worker "
                   "is tried locally: that server differs from the platform (no /cancel, "
                   "/stream returns at the end, generator errors become HTTP 500). Run "
                   "`python src/local_endpoint.py` instead: RunPod's endpoint API on localhost "
                   "with this worker, unmodified, behind it (see the README).")


def main() -> int:
    if any(arg.startswith("--rp_serve_api") for arg in sys.argv[1:]):
        log.error("%s", SDK_TEST_SERVER)
        return 2
    if front_end(os.environ) == "lb":
        from worker_vllm.lb.serve import serve_lb

        return serve_lb(os.environ)
    from worker_vllm.queue.serve import serve_queue

    return serve_queue(sys.argv[1:], os.environ)


def front_end(env: Mapping[str, str]) -> str:
    """ENDPOINT_TYPE when it is `queue` or `lb`; else what the platform set: its job webhook
    on queue endpoints, PORT_HEALTH on load-balancing ones. (An invalid ENDPOINT_TYPE is
    reported by the start-up that follows, as any invalid setting is.)"""
    from worker_vllm.config.settings import is_unset, load_worker_settings
    from worker_vllm.errors import ConfigError

    try:
        chosen = load_worker_settings(dict(env)).endpoint_type
    except ConfigError:
        chosen = "auto"
    if chosen != "auto":
        return chosen
    if env.get("RUNPOD_WEBHOOK_GET_JOB"):
        return "queue"
    return "lb" if not is_unset(env.get("PORT_HEALTH")) else "queue"


# vLLM spawns its engine core with multiprocessing "spawn", which re-imports __main__:
# without this guard the child would build a second engine.
if __name__ == "__main__":
    sys.exit(main())
