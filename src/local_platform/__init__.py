"""A local endpoint: RunPod's hosted endpoint API on localhost, driving a real worker process.

A development tool (not part of the image). Clients (curl, ``runpod.Endpoint``, the ``openai``
SDK) talk to ``/v2/{endpoint_id}/...`` as they would to the hosted API; the worker
(``python src/handler.py``, unmodified) runs its real runpod SDK job loop against the
worker-facing webhooks under ``/_worker/``.
"""

from .app import create_app
from .state import FINAL, Endpoint, Job
from .worker_process import WorkerProcess, platform_env

__all__ = ["FINAL", "Endpoint", "Job", "WorkerProcess", "create_app", "platform_env"]
