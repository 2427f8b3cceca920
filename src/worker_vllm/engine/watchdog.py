"""Tells when the engine has died: vLLM offers no event for it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

# The runner (`EngineRunner`) is passed in: its `engine`, `loop`, `closing`, `get_tokenizer`.
Runner = Any

log = logging.getLogger(__name__)


def watch(runner: Runner, on_dead: Callable[[str], None], interval: float = 1.0,
          probe_every: float = 0.0, probe_timeout: float = 60.0) -> None:
    """Call `on_dead(reason)` (from the engine thread) once the engine has died.

    `errored` is polled cheaply. An engine core whose input thread died never sets it, so
    every `probe_every` seconds (0: never) a one-token request must finish within
    `probe_timeout` seconds, or the engine counts as dead.
    """
    engine = runner.engine

    async def watchdog() -> None:
        loop = asyncio.get_running_loop()
        last_probe = loop.time()
        probes = 0
        while not engine.errored:
            await asyncio.sleep(interval)
            if runner.closing:
                return  # a shutdown, not a death
            if probe_every and loop.time() - last_probe >= probe_every:
                probes += 1
                if not await _probe(runner, f"health-probe-{probes}", probe_timeout) \
                        and not runner.closing:
                    on_dead(f"a health probe got no answer within {probe_timeout:.0f} s")
                    return
                last_probe = loop.time()
        if not runner.closing:
            on_dead("the engine reported an error")

    runner.loop.submit(watchdog())


async def _probe(runner: Runner, request_id: str, timeout: float) -> bool:
    """Whether a one-token request completes in time (on the engine loop)."""
    engine = runner.engine
    if "generate" not in await engine.get_supported_tasks():
        try:
            async with asyncio.timeout(timeout):
                await engine.check_health()
            return True
        except Exception:
            return False
    params = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)
    token = runner.get_tokenizer().bos_token_id or 0
    try:
        async with asyncio.timeout(timeout):
            async for _ in engine.generate({"prompt_token_ids": [token]}, params, request_id):
                pass
        return True
    except TimeoutError:
        return False
    except Exception:
        log.warning("health probe failed", exc_info=True)
        return False
