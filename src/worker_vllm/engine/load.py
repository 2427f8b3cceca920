"""The engine's load after each step (``worker_vllm.engine_state``), from vLLM's own bookkeeping.

``AsyncLLM`` hands every step's ``SchedulerStats`` (running and waiting requests, KV-cache
usage) and ``IterationStats`` (finished requests, preemptions) to its stat loggers; ``LoadFeed``
is one of them. When its follower asks for them (``EngineLoads.wants_sizes``), it also reads
the sizes of the requests in flight from the engine's output processor (prompt length, tokens
generated, ``max_tokens``), which lives in this process: a pass over every request, so only
at steps where they can matter. It runs on the engine's loop thread (where those requests
are kept): it only builds a snapshot and hands it on; its listeners must be cheap and
thread-safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerBase

from worker_vllm.engine_state import EngineLoad, RequestSize


@dataclass(eq=False)  # hashable by identity: the runner keeps a set of them
class LoadWatch:
    """The most requests seen running and waiting in the engine, step by step, while it is
    watched; ``wake``, when set, is called after each step (on the engine's thread)."""

    running_max: int = 0
    waiting_max: int = 0
    wake: Callable[[], None] | None = None

    def saw(self, load: EngineLoad) -> None:
        self.running_max = max(self.running_max, load.running)
        self.waiting_max = max(self.waiting_max, load.waiting)
        if self.wake is not None:
            self.wake()


class LoadFollower(Protocol):
    """Told of every engine step (on the engine's thread); it may want the sizes of the
    requests in flight at that step (asked with the step's counts)."""

    def wants_sizes(self, load: EngineLoad) -> bool: ...

    def observe(self, load: EngineLoad) -> None: ...


class EngineLoads:
    """The engine's load after its latest step, and who follows it: one ``LoadFollower``
    (``follow``) and watches (``watching``)."""

    def __init__(self) -> None:
        self.latest = EngineLoad()
        self.follower: LoadFollower | None = None
        self._watches: set[LoadWatch] = set()

    def follow(self, follower: LoadFollower) -> None:
        self.follower = follower

    def wants_sizes(self, load: EngineLoad) -> bool:
        return self.follower is not None and self.follower.wants_sizes(load)

    def saw(self, load: EngineLoad) -> None:
        self.latest = load
        for watch in tuple(self._watches):  # one C call: safe beside adds on other threads
            watch.saw(load)
        if self.follower is not None:
            self.follower.observe(load)

    @contextlib.contextmanager
    def watching(self, wake: Callable[[], None] | None = None) -> Iterator[LoadWatch]:
        """Follow the load step by step while the block runs (``wake``: see LoadWatch)."""
        watch = LoadWatch()
        watch.saw(self.latest)
        watch.wake = wake
        self._watches.add(watch)
        try:
            yield watch
        finally:
            self._watches.discard(watch)


class LoadFeed(StatLoggerBase):
    """A vLLM stat logger that reports each step's ``EngineLoad`` to ``loads``."""

    def __init__(self, loads: EngineLoads) -> None:
        self.loads = loads
        self.preempted = 0
        # The engine's output processor's requests (``track``), read on its loop only.
        self.requests: Mapping[str, Any] = {}

    def track(self, engine: Any) -> None:
        self.requests = engine.output_processor.request_states

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        finished: tuple[RequestSize, ...] = ()
        if iteration_stats is not None:
            self.preempted += iteration_stats.num_preempted_reqs
            finished = tuple(RequestSize(r.num_prompt_tokens, r.num_generation_tokens,
                                         r.max_tokens_param or 0)
                             for r in iteration_stats.finished_requests)
        load = EngineLoad(running=scheduler_stats.num_running_reqs,
                          waiting=scheduler_stats.num_waiting_reqs,
                          kv_usage=scheduler_stats.kv_cache_usage, preempted=self.preempted,
                          finished=finished)
        if self.loads.wants_sizes(load):
            requests = tuple(self.requests.values())
            load = dataclasses.replace(load, in_flight=tuple(_size(r) for r in requests),
                                       in_flight_ids=tuple(r.external_req_id for r in requests))
        self.loads.saw(load)

    def log_engine_initialized(self) -> None:
        pass

    def factory(self) -> Callable[[Any, int], StatLoggerBase]:
        """What ``AsyncLLM(stat_loggers=[...])`` takes: (vllm_config, engine index) -> logger.
        One engine per worker, so every index gets this one."""
        return lambda _config, _index: self


def _size(request: Any) -> RequestSize:
    """A request of the output processor (``RequestState``) as its sizes."""
    stats = request.stats
    return RequestSize(request.prompt_len or 0, stats.num_generation_tokens if stats else 0,
                       request.max_tokens_param or 0)


class NoPrometheus(PrometheusStatLogger):
    """Stands in for vLLM's Prometheus logger, whose figures no route of the worker serves
    (`/metrics` is an operator route, answered 404 on both front-ends): vLLM adds its own
    unless given a logger of that type. Its recording held 2.5% of the worker's main-process
    samples under 64 streamed completion jobs (py-spy, 2-core x86-64)."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
        pass  # registers no metric

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass
