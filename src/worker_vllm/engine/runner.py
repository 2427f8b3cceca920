"""The engine facade: vLLM's AsyncLLMEngine on its own loop thread, plain data out.

Every engine operation the worker uses is a method here; callers in any event loop use it
(see ``worker_vllm.loop_thread``). Generation yields ``outputs.Step``, not vLLM's output classes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams

from worker_vllm.engine.load import EngineLoads, LoadFeed, NoPrometheus
from worker_vllm.engine.outputs import Step, plain_step
from worker_vllm.engine.watchdog import watch
from worker_vllm.engine_state import EngineCapacity
from worker_vllm.loop_thread import LoopThread, Relayed

log = logging.getLogger(__name__)


def freeze_vllm_env() -> None:
    """vLLM reads its environment variables from here on once each (its own cache, which its
    engine core turns on once started): its output path reads one per output of every request
    (`VLLM_COMPUTE_NANS_IN_LOGITS`), 2.7% of the worker's main-process samples under 64
    streamed completion jobs (py-spy, 2-core x86-64). For a serving process only: the
    environment must not change after this."""
    from vllm import envs

    envs.enable_envs_cache()


def cache_key() -> str:
    """vLLM's version and the device: caches of one never serve another."""
    import re

    import torch
    from vllm import __version__

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)}-cuda{torch.version.cuda}"
    else:
        device = "cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"vllm-{__version__}-{device}")


def _engine_kwargs(feed: LoadFeed) -> dict[str, Any]:
    """As `vllm serve` builds its engine: vLLM picks the defaults of `max_num_seqs` and
    `max_num_batched_tokens` by usage context and device (an H100 runs 1024 sequences as an API
    server; the engine's own context would give 128 on every GPU). No Prometheus metrics: no
    route of either front-end serves `/metrics`."""
    from vllm.usage.usage_lib import UsageContext

    return {"usage_context": UsageContext.OPENAI_API_SERVER,
            "stat_loggers": [feed.factory(), NoPrometheus]}


def unmodelled_cache(model_config: Any, kv_tokens: int) -> str | None:
    """Why one KV projection (every request holding its tokens in blocks of one pool) does not
    model this model's cache, or None. Encoder-only models have no KV cache (their attention
    layers declare none); sliding-window, hybrid (Mamba) and encoder-decoder models keep
    several KV-cache groups in one block pool, each request a block table in each."""
    if kv_tokens <= 0:
        return "no KV cache (an encoder-only or attention-free model)"
    kind = model_config.attn_type
    if kind != "decoder":
        return f"a {kind.replace('_', '-')} model's KV cache"
    if model_config.get_sliding_window() is None:
        return None
    layer_types = set(getattr(model_config.hf_text_config, "layer_types", None) or ())
    if len(layer_types) > 1:
        return "several KV-cache groups (sliding-window and full-attention layers)"
    if layer_types <= {"full_attention", "attention"} and layer_types:
        return None  # a window in the config that no layer uses
    return "a sliding-window KV cache (a request holds at most its window)"


class EngineRunner:
    """An AsyncLLMEngine on a private thread and event loop, usable from any other loop."""

    def __init__(self, args: AsyncEngineArgs, loop: LoopThread | None = None) -> None:
        """`loop`: a loop thread that already serves something (an HTTP server): the engine
        is then built on another thread, so that loop keeps serving while the model loads."""
        self.loop = loop or LoopThread("vllm-engine-loop", uvloop=True)  # as vllm serve's
        self.closing = False
        # The engine's load after each step (vLLM's scheduler statistics).
        self.loads = EngineLoads()
        feed = LoadFeed(self.loads)
        kwargs = _engine_kwargs(feed)
        build = self._build_beside(args, kwargs) if loop is not None else self._build(args, kwargs)
        try:
            self.engine = self.loop.submit(build).result()
        except BaseException:
            self.loop.stop()
            raise
        feed.track(self.engine)
        self.model_config = self.engine.model_config
        self.max_model_len: int = self.model_config.max_model_len
        self.served_model_names: list[str] = list(
            self.model_config.served_model_name
            if isinstance(self.model_config.served_model_name, list)
            else [self.model_config.served_model_name]
        )

    @staticmethod
    async def _build(args: AsyncEngineArgs, kwargs: dict[str, Any]) -> Any:
        return AsyncLLMEngine.from_engine_args(args, **kwargs)

    @staticmethod
    async def _build_beside(args: AsyncEngineArgs, kwargs: dict[str, Any]) -> Any:
        engine = await asyncio.to_thread(AsyncLLMEngine.from_engine_args, args, **kwargs)
        # Built off the loop, vLLM defers its output handler to the first request; start it
        # now, as a build on the loop does, so an engine core failure is seen at once.
        engine._run_output_handler()
        return engine

    def unfinished_requests_now(self) -> int:
        """The engine's count of unfinished requests; call on the engine loop only."""
        return self.engine.get_num_unfinished_requests()

    def generate(self, prompt: dict[str, Any], params: SamplingParams, request_id: str,
                 **kwargs: Any) -> Relayed[Step]:
        """The request's outputs as plain steps, made on the engine's loop and relayed to the
        caller's: iterated, or pushed to a stream flush (no task step per step on the job
        loop). Closing it (``aclose``) aborts the request: a caller that stops early must."""

        async def steps() -> AsyncIterator[Step]:
            async for output in self.engine.generate(prompt, params, request_id, **kwargs):
                yield plain_step(output)

        return self.loop.relayed(steps)

    async def num_unfinished_requests(self) -> int:
        async def count() -> int:
            return self.engine.get_num_unfinished_requests()

        return await self.loop.call(count)

    async def supported_tasks(self) -> tuple[str, ...]:
        return tuple(await self.loop.call(self.engine.get_supported_tasks))

    async def check_health(self) -> None:
        await self.loop.call(self.engine.check_health)

    def capacity(self) -> EngineCapacity:
        """What the engine can run at once, and whether one KV projection models its cache."""
        config = self.engine.vllm_config
        # vLLM keeps one block as its null block.
        blocks = max(0, (config.cache_config.num_gpu_blocks or 0) - 1)
        block = config.cache_config.block_size
        scheduler = config.scheduler_config
        return EngineCapacity(scheduler.max_num_seqs, blocks * block, block,
                              scheduler.max_num_batched_tokens,
                              unmodelled_cache(config.model_config, blocks * block),
                              config.model_config.max_model_len)

    @property
    def errored(self) -> bool:
        return bool(self.engine.errored)

    def get_tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    def chat_content_format(self, chat_template: str | None) -> str:
        """"string" or "openai": how the chat template expects message content (vLLM's own
        detection, as its chat route uses it)."""
        from vllm.renderers.hf import resolve_chat_template_content_format

        return resolve_chat_template_content_format(
            chat_template, None, "auto", self.get_tokenizer(), model_config=self.model_config)

    def watch(self, on_dead: Callable[[str], None], interval: float = 1.0,
              probe_every: float = 0.0, probe_timeout: float = 60.0) -> None:
        """Call `on_dead(reason)` once the engine has died (see ``watchdog.watch``)."""
        watch(self, on_dead, interval, probe_every, probe_timeout)

    def shutdown(self) -> None:
        self.closing = True
        try:
            self.loop.submit(self._stop_output_handler()).result(timeout=5)
        except Exception:
            log.debug("could not stop the output handler first", exc_info=True)
        try:
            self.engine.shutdown()
        finally:
            self.loop.stop()
            # Finalise now: AsyncLLM.__del__ fails noisily once the interpreter is exiting.
            del self.engine
            gc.collect()

    async def _stop_output_handler(self) -> None:
        # vLLM stops the engine core before this task, which then logs the core's death as an
        # error; stopping it first makes a clean shutdown quiet.
        task = getattr(self.engine, "output_handler", None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
