"""The engine's load and capacity as plain data (no vLLM import): what the engine package
reads from vLLM after each step and at start-up, and what the admission decides from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# KV-cache use past which no job (without a KV projection: no KV cache, several KV-cache
# groups) and no batch line starts beside other requests: the running ones grow into the rest.
# A tuning value of the admission (see worker_vllm.queue.tuning), kept here for batch jobs too.
KV_START_LIMIT = 0.9


class RequestSize(NamedTuple):
    """One request's tokens: its prompt, those generated so far, and its ``max_tokens`` (0
    for a request that generates nothing, such as a pooling one)."""

    prompt: int
    generated: int
    max_tokens: int


@dataclass(frozen=True)
class EngineLoad:
    """The engine after one step."""

    running: int = 0
    waiting: int = 0
    # Share of the KV cache's blocks in use (0..1).
    kv_usage: float = 0.0
    # Requests the scheduler preempted so far (their KV blocks were taken back).
    preempted: int = 0
    # Every request added to the engine and not finished (running, waiting, or just added);
    # None where nobody asked for them at this step.
    in_flight: tuple[RequestSize, ...] | None = None
    # The id each of those requests was added with (vLLM's external id: the n children of one
    # request share it; a worker's request ids name their job); None: one request each.
    in_flight_ids: tuple[str, ...] | None = None
    # The requests that finished in this step.
    finished: tuple[RequestSize, ...] = ()


@dataclass(frozen=True)
class EngineCapacity:
    """What the engine can hold, read once it started."""

    max_num_seqs: int
    # Tokens the KV cache holds (0: no KV cache, as for encoder-only models) and per block.
    kv_tokens: int
    block_tokens: int
    # Tokens one engine step computes at most (a preempted request's recomputation is one
    # prefill of its tokens: within this, at most one step's work).
    max_num_batched_tokens: int = 2048
    # Why the KV projection cannot model this engine's cache (None: it can): the admission
    # then follows the engine's own counts.
    unmodelled: str | None = None
    # The longest request the engine takes, prompt and output (0: unknown).
    max_model_len: int = 0
