"""How many of a batch job's lines run at once: the engine decides, step by step.

While the engine holds nothing but this batch's lines, up to ``max_num_seqs`` more lines than
it can run may wait in its scheduler: a line that ends is replaced within the engine's next
step, as in `vllm run-batch` (which hands the engine every line at once), instead of one
hand-off later (lines that end together would otherwise leave the engine idle while their
successors are rendered and tokenized). Requests waiting in the engine also keep the worker
from taking other jobs (``worker_vllm.queue.admission``): they stay in the platform's queue.
While the engine holds other requests too, a line starts only while no request waits in the
scheduler and the KV cache has room, so requests of the worker's other jobs wait behind no
batch line (the scheduler serves in arrival order). The lines in flight at most double the
engine's requests (lines not yet in the engine do not show in its counts), and one line
always runs. A batch that finds the engine idle starts as many lines as it runs at once
(``max_num_seqs``), as `vllm run-batch` hands it every line, instead of doubling from one
line engine step by step.
"""

from __future__ import annotations

from worker_vllm.engine_state import KV_START_LIMIT, EngineLoad


class LineWindow:
    def __init__(self, max_num_seqs: int) -> None:
        self.cap = max(1, max_num_seqs)

    def room(self, in_flight: int, load: EngineLoad) -> int:
        """Lines that may start now, with `in_flight` of the batch's lines running."""
        in_engine = load.running + load.waiting
        if in_flight == 0:
            return self.cap if in_engine == 0 else 1
        if in_engine <= in_flight:  # nothing but this batch's lines (as far as it shows)
            limit = 2 * self.cap
        elif load.waiting > 0 or load.kv_usage >= KV_START_LIMIT:
            return 0
        else:
            limit = self.cap
        return max(0, min(limit, 2 * max(1, in_engine)) - in_flight)
