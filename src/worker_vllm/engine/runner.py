"""The engine on its own thread and event loop, usable from any other loop.

The runpod SDK runs each phase (fitness checks, the job loop, local test mode) under a fresh
``asyncio.run``; vLLM's ``AsyncLLM`` binds its output-handler task to the loop of its first
request, so an engine shared between loops would break after the warm-up. Callers in any loop
reach the engine through ``call`` / ``stream``, which cost one thread-safe hand-off per engine
output.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
from vllm.sampling_params import RequestOutputKind

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


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


class EngineRunner:
    """An AsyncLLMEngine on a private thread and event loop, usable from any other loop."""

    def __init__(self, args: AsyncEngineArgs) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-engine-loop", daemon=True
        )
        self._thread.start()
        self._closing = False
        try:
            self.engine = self._submit(self._build(args)).result()
        except BaseException:
            self._stop_loop()
            raise
        self.model_config = self.engine.model_config
        self.max_model_len: int = self.model_config.max_model_len
        self.served_model_names: list[str] = list(
            self.model_config.served_model_name
            if isinstance(self.model_config.served_model_name, list)
            else [self.model_config.served_model_name]
        )

    @staticmethod
    async def _build(args: AsyncEngineArgs) -> Any:
        return AsyncLLMEngine.from_engine_args(args)

    def _submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    # ----- bridging into the engine loop -------------------------------------------------
    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await `make()` on the engine loop; cancelling the caller cancels it there."""

        async def run() -> T:
            return await make()

        return await asyncio.wrap_future(self._submit(run()))

    async def stream(self, make: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
        """Iterate `make()` on the engine loop and relay its items to the caller's loop.

        Closing or cancelling the consumer cancels the producer on the engine loop (vLLM then
        aborts the request) and waits until that has happened before returning.
        """
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()

        def put(item: Any, exc: BaseException | None = None) -> None:
            caller.call_soon_threadsafe(queue.put_nowait, (item, exc))

        async def pump() -> None:
            try:
                async for item in make():
                    put(item)
            except BaseException as exc:  # CancelledError too: the consumer must hear of it
                put(_DONE, exc)
                raise
            put(_DONE)

        future = self._submit(pump())
        finished = False
        try:
            while True:
                item, exc = await queue.get()
                if item is _DONE:
                    finished = True
                    if exc is not None and not isinstance(exc, asyncio.CancelledError):
                        raise exc
                    return
                yield item
        finally:
            if not finished:
                future.cancel()
                await self._drain_until_done(queue)

    @staticmethod
    async def _drain_until_done(queue: asyncio.Queue, limit: float = 10.0) -> None:
        """Wait for the producer's end marker, i.e. until vLLM has aborted the request."""
        try:
            async with asyncio.timeout(limit):
                while (await queue.get())[0] is not _DONE:
                    pass
        except TimeoutError:
            log.warning("Engine request did not confirm its abort within %.0f s", limit)

    # ----- engine operations --------------------------------------------------------------
    def generate(
        self,
        prompt: dict[str, Any],
        params: SamplingParams,
        request_id: str,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        return self.stream(lambda: self.engine.generate(prompt, params, request_id, **kwargs))

    async def num_unfinished_requests(self) -> int:
        async def count() -> int:
            return self.engine.get_num_unfinished_requests()

        return await self.call(count)

    async def running_request_ids(self) -> list[str]:
        """External ids of the requests the engine is working on (for logs and tests)."""

        async def ids() -> list[str]:
            states = self.engine.output_processor.request_states.values()
            return [getattr(st, "external_req_id", None) or st.request_id for st in states]

        return await self.call(ids)

    async def supported_tasks(self) -> tuple[str, ...]:
        return tuple(await self.call(self.engine.get_supported_tasks))

    async def check_health(self) -> None:
        await self.call(self.engine.check_health)

    def capacity(self) -> tuple[int, int]:
        """(max_num_seqs, tokens the KV cache holds): what the engine can run at once."""
        config = self.engine.vllm_config
        blocks = config.cache_config.num_gpu_blocks or 0
        return config.scheduler_config.max_num_seqs, blocks * config.cache_config.block_size

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
        """Call `on_dead(reason)` (from the engine thread) once the engine has died.

        vLLM offers no event for this: `errored` is polled cheaply. An engine core whose input
        thread died never sets it, so every `probe_every` seconds (0: never) a one-token
        request must finish within `probe_timeout` seconds, or the engine counts as dead.
        """

        async def watchdog() -> None:
            loop = asyncio.get_running_loop()
            last_probe = loop.time()
            probes = 0
            while not self.engine.errored:
                await asyncio.sleep(interval)
                if self._closing:
                    return  # a shutdown, not a death
                if probe_every and loop.time() - last_probe >= probe_every:
                    probes += 1
                    if not await self._probe(f"health-probe-{probes}", probe_timeout) \
                            and not self._closing:
                        on_dead(f"a health probe got no answer within {probe_timeout:.0f} s")
                        return
                    last_probe = loop.time()
            if not self._closing:
                on_dead("the engine reported an error")

        self._submit(watchdog())

    async def _probe(self, request_id: str, timeout: float) -> bool:
        """Whether a one-token request completes in time (on the engine loop)."""
        if "generate" not in await self.engine.get_supported_tasks():
            try:
                async with asyncio.timeout(timeout):
                    await self.engine.check_health()
                return True
            except Exception:
                return False
        params = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)
        token = self.get_tokenizer().bos_token_id or 0
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.engine.generate({"prompt_token_ids": [token]}, params,
                                                    request_id):
                    pass
            return True
        except TimeoutError:
            return False
        except Exception:
            log.warning("health probe failed", exc_info=True)
            return False

    def shutdown(self) -> None:
        self._closing = True
        async def stop_output_handler() -> None:
            # vLLM stops the engine core before this task, which then logs the core's death
            # as an error; stopping it first makes a clean shutdown quiet.
            task = getattr(self.engine, "output_handler", None)
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        try:
            self._submit(stop_output_handler()).result(timeout=5)
        except Exception:
            log.debug("could not stop the output handler first", exc_info=True)
        try:
            self.engine.shutdown()
        finally:
            self._stop_loop()
            # Finalise now: AsyncLLM.__del__ fails noisily once the interpreter is exiting.
            del self.engine
            gc.collect()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
