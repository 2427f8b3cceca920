"""vLLM's request outputs as plain data: what the job path reads of a generation step.

`RequestOutput`, `CompletionOutput` and `Logprob` are vLLM's classes and change between
releases; nothing outside this package reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# One token position's logprobs as a job shows them: the chosen token's
# {"token_id", "token", "logprob", "rank"} (when known) and "top_logprobs".
LogprobEntry = dict[str, Any]


@dataclass(slots=True)
class Completion:
    """New output of one choice since the previous step (or all of it, when not streamed)."""

    index: int
    text: str
    token_ids: Sequence[int]
    logprobs: list[LogprobEntry | None] | None
    finish_reason: str | None


@dataclass(slots=True)
class Step:
    """One engine output of a request: its choices' new output, the prompt's logprobs."""

    completions: list[Completion]
    prompt_logprobs: list[LogprobEntry | None] | None


def logprob_entry(position: dict[int, Any] | None, chosen: int | None = None
                  ) -> LogprobEntry | None:
    """One token position's logprobs: the chosen token and the top alternatives."""
    if position is None:
        return None
    top = [{"token_id": tid, "token": lp.decoded_token, "logprob": lp.logprob, "rank": lp.rank}
           for tid, lp in position.items()]
    entry: LogprobEntry = {"top_logprobs": sorted(top, key=lambda t: -t["logprob"])}
    if chosen is not None and chosen in position:
        lp = position[chosen]
        entry = {"token_id": chosen, "token": lp.decoded_token, "logprob": lp.logprob,
                 "rank": lp.rank, **entry}
    return entry


def _entries(positions: Any, token_ids: Sequence[int] | None) -> list[LogprobEntry | None]:
    return [logprob_entry(pos, tid) for pos, tid in zip(positions, token_ids or [],
                                                        strict=False)]


def plain_step(output: Any) -> Step:
    """A vLLM RequestOutput as a Step."""
    completions = [
        Completion(
            index=out.index,
            text=out.text,
            token_ids=out.token_ids,
            logprobs=None if out.logprobs is None else _entries(out.logprobs, out.token_ids),
            finish_reason=out.finish_reason,
        )
        for out in output.outputs
    ]
    prompt = output.prompt_logprobs
    return Step(completions,
                None if prompt is None else _entries(prompt, output.prompt_token_ids))
