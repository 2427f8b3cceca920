"""The queue front-end: RunPod's job queue through the runpod SDK's job loop (``sdk``), and how
many jobs the worker takes (``admission``, sized by ``projection`` from the engine's load as
plain data, ``worker_vllm.engine_state``; tuned in one block: ``tuning``). Plain data and
arithmetic except ``serve`` and ``sdk``: the admission imports neither vLLM nor the SDK."""
