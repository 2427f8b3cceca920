"""How many of a batch job's lines run at once: the engine decides, step by step.

A line starts while vLLM's scheduler has no request waiting and its KV cache has room, so a
batch fills what the engine can run and no more: requests of the worker's other jobs, when
they come, wait behind no batch line in the scheduler (it serves in arrival order). The lines
in flight at most double the engine's running requests (lines not yet in the engine do not
show in its counts), never exceed ``max_num_seqs``, and one line always runs.
"""

from __future__ import annotations

from worker_vllm.engine.load import EngineLoad

# KV-cache use past which no line starts: running requests still grow into the rest.
KV_START_LIMIT = 0.9


class LineWindow:
    def __init__(self, max_num_seqs: int) -> None:
        self.cap = max(1, max_num_seqs)

    def room(self, in_flight: int, load: EngineLoad) -> int:
        """Lines that may start now, with `in_flight` of the batch's lines running."""
        if in_flight == 0:
            return 1
        if load.waiting > 0 or load.kv_usage >= KV_START_LIMIT:
            return 0
        return max(0, min(self.cap, 2 * max(1, load.running)) - in_flight)
