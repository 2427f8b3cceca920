"""Entry point of the worker: `python src/handler.py`.

On RunPod (the platform's webhooks are set) it serves jobs through the runpod SDK's job loop.
Locally it runs one job from `--test_input '{...}'` or `test_input.json` and prints the result
(see `worker_vllm.serve_queue`).
"""

from __future__ import annotations

import logging
import os
import sys

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
    from worker_vllm.serve_queue import serve_queue

    return serve_queue(sys.argv[1:], os.environ)


# vLLM spawns its engine core with multiprocessing "spawn", which re-imports __main__:
# without this guard the child would build a second engine.
if __name__ == "__main__":
    sys.exit(main())
