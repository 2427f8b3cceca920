"""The native route: prompt/messages + sampling_params -> {"choices": [...], "usage": {...}}."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from worker_vllm.config.settings import WorkerSettings
from worker_vllm.engine import EngineRunner, VLLMClientError, make_sampling_params
from worker_vllm.errors import InvalidInput
from worker_vllm.jobs.batching import BatchPolicy, batched
from worker_vllm.jobs.limits import check_counts
from worker_vllm.jobs.shapes import NativeInput

log = logging.getLogger(__name__)

# The reference worker's users rely on 100, not vLLM's 16.
DEFAULT_MAX_TOKENS = 100
# One thread: the tokenizer is shared, and one caller at a time keeps it safe.
_TOKENIZER_THREAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")


def _is_number(value: Any, target: float) -> bool:
    return type(value) in (int, float) and value == target


_BEAM_SEARCH = ("use the OpenAI route (/v1/completions or /v1/chat/completions) with "
                '"use_beam_search": true')
# Sampling parameters vLLM removed that RunPod's docs still list: a value that asks for
# nothing different from their old default is accepted and dropped; any other value fails the
# job with what to use instead.
REMOVED_SAMPLING: dict[str, tuple[Any, str]] = {
    "best_of": (lambda v, p: v is None or (_is_number(v, p.get("n", 1)) and v >= 1),
                "best_of was removed from vLLM's sampling parameters: ask for `n` choices "
                f"(with `logprobs` to rank them), or {_BEAM_SEARCH}"),
    "use_beam_search": (lambda v, p: v is False,
                        f"beam search is no longer a sampling parameter in vLLM: {_BEAM_SEARCH}"),
    "length_penalty": (lambda v, p: v is None or _is_number(v, 1),
                       f"length_penalty applies to beam search only: {_BEAM_SEARCH}"),
    "early_stopping": (lambda v, p: v is False,
                       f"early_stopping applies to beam search only: {_BEAM_SEARCH}"),
}


def without_removed_fields(params: dict[str, Any]) -> dict[str, Any]:
    """`params` without vLLM's removed sampling parameters; InvalidInput for one that asks
    for what vLLM no longer does."""
    for name, (harmless, advice) in REMOVED_SAMPLING.items():
        if name in params and not harmless(params[name], params):
            raise InvalidInput(f"sampling_params.{name}={params[name]!r}: {advice}",
                               param=f"sampling_params.{name}")
    return {k: v for k, v in params.items() if k not in REMOVED_SAMPLING}


def build_sampling_params(inp: NativeInput) -> Any:
    """SamplingParams for the job; an invalid field is an InvalidInput naming it."""
    params = without_removed_fields({"max_tokens": DEFAULT_MAX_TOKENS, **inp.sampling_params})
    try:
        return make_sampling_params(params, stream=inp.stream)
    except (ValueError, TypeError, VLLMClientError) as exc:
        param = getattr(exc, "parameter", None) or field_named_in(str(exc), params)
        raise InvalidInput(
            f"Invalid sampling_params: {exc}",
            param=f"sampling_params.{param}" if param else "sampling_params",
        ) from None


def field_named_in(message: str, names: Iterable[str]) -> str | None:
    """The field a vLLM error speaks of (the first named), when it does not say so itself."""
    named = sorted((n for n in names if n in message), key=message.index)
    return named[0] if named else None


# Serialised size of one logprob of a streamed delta (token id, text, logprob, rank).
_LOGPROB_BYTES = 80


def output_weight(output: Any) -> int:
    """About how many bytes a RequestOutput adds to a stream message."""
    total = 0
    for completion in output.outputs:
        total += len(json.dumps(completion.text)) + 8
        for position in completion.logprobs or ():
            total += _LOGPROB_BYTES * (1 + len(position))
    return total


def _logprob_entries(position: dict[int, Any] | None, chosen: int | None = None
                     ) -> dict[str, Any] | None:
    """One token position's logprobs: the chosen token and the top alternatives."""
    if position is None:
        return None
    top = [{"token_id": tid, "token": lp.decoded_token, "logprob": lp.logprob, "rank": lp.rank}
           for tid, lp in position.items()]
    entry: dict[str, Any] = {"top_logprobs": sorted(top, key=lambda t: -t["logprob"])}
    if chosen is not None and chosen in position:
        lp = position[chosen]
        entry = {"token_id": chosen, "token": lp.decoded_token, "logprob": lp.logprob,
                 "rank": lp.rank, **entry}
    return entry


@dataclass
class _Choices:
    """Accumulates per-choice output; merges partial RequestOutputs by choice index."""

    n: int
    output_tokens: int = 0
    finish: dict[int, str] = field(default_factory=dict)
    prompt_logprobs: list[Any] | None = None  # not yet sent
    prompt_logprobs_seen: bool = False

    def take(self, outputs: list[Any]) -> list[dict[str, Any]]:
        choices: list[dict[str, Any]] = [{"tokens": []} for _ in range(self.n)]
        for request_output in outputs:
            if request_output.prompt_logprobs is not None and not self.prompt_logprobs_seen:
                self.prompt_logprobs_seen = True
                self.prompt_logprobs = [
                    _logprob_entries(pos, tid) for pos, tid in
                    zip(request_output.prompt_logprobs, request_output.prompt_token_ids or [],
                        strict=False)]
            for out in request_output.outputs:
                choice = choices[out.index]
                choice["tokens"].append(out.text)
                if out.logprobs is not None:
                    choice.setdefault("logprobs", []).extend(
                        _logprob_entries(pos, tid)
                        for pos, tid in zip(out.logprobs, out.token_ids, strict=False))
                self.output_tokens += len(out.token_ids)
                if out.finish_reason is not None:
                    self.finish[out.index] = out.finish_reason
                    choice["finish_reason"] = out.finish_reason
        return choices

    def result(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        """One yield; the prompt's logprobs go with the first one that has them."""
        out: dict[str, Any] = {"choices": choices, "usage": dict(usage)}
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"], self.prompt_logprobs = self.prompt_logprobs, None
        return out


def _as_template_content(messages: list[dict[str, Any]], content_format: str
                         ) -> list[dict[str, Any]]:
    """Content given as parts: text joined for a template that expects a string (as vLLM's
    chat route does), kept as parts for one that iterates over them."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidInput(
                        "The native route takes text content parts only "
                        '({"type": "text", "text": "..."}); use the OpenAI route for other '
                        "kinds", param=f"messages.{i}.content.{j}")
                texts.append(part["text"])
            if content_format == "string":
                message = {**message, "content": "\n".join(texts)}
            else:
                message = {**message, "content": [{"type": "text", "text": t} for t in texts]}
        out.append(message)
    return out


def tokenize_prompt(runner: EngineRunner, inp: NativeInput, max_tokens: int | None,
                    chat_template: str | None = None) -> list[int]:
    """Token ids of the prompt, checked against the context length (tokenised once only)."""
    tokenizer = runner.get_tokenizer()
    messages = inp.chat_messages()
    if messages is not None:
        messages = _as_template_content(messages, runner.chat_content_format(chat_template))
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True,
                                                 chat_template=chat_template)
        except Exception as exc:
            raise InvalidInput(f"Cannot apply the chat template: {exc}", param="messages") from None
        # The template already holds any BOS token; do not add it twice.
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(inp.prompt)
    limit = runner.max_model_len
    if len(ids) >= limit:
        raise InvalidInput(
            f"The prompt is {len(ids)} tokens; the model's context is {limit} tokens "
            "(prompt plus output)",
            param="messages" if messages is not None else "prompt",
        )
    if max_tokens is not None and len(ids) + max_tokens > limit:
        raise InvalidInput(
            f"sampling_params.max_tokens={max_tokens} plus the prompt's {len(ids)} tokens "
            f"exceeds the model's context of {limit} tokens",
            param="sampling_params.max_tokens",
        )
    return ids


async def run_native(
    runner: EngineRunner,
    inp: NativeInput,
    request_id: str,
    policy: BatchPolicy,
    lora_request: Any = None,
    chat_template: str | None = None,
    settings: WorkerSettings | None = None,
) -> AsyncIterator[dict[str, Any]]:
    params = build_sampling_params(inp)
    if settings is not None:
        check_counts(settings, params.n, inp.sampling_params.get("max_tokens"),
                     "sampling_params.")
    # A long prompt takes seconds to tokenise: never on the job loop, which serves every job.
    prompt_ids = await asyncio.get_running_loop().run_in_executor(
        _TOKENIZER_THREAD, tokenize_prompt, runner, inp, params.max_tokens, chat_template)
    usage = {"input": len(prompt_ids), "output": 0}
    choices = _Choices(params.n)
    outputs = runner.generate({"prompt_token_ids": prompt_ids}, params, request_id,
                              lora_request=lora_request)
    if not inp.stream:
        collected = [out async for out in outputs]
        result = choices.take(collected)
        for choice in result:
            choice["tokens"] = ["".join(choice["tokens"])]
        usage["output"] = choices.output_tokens
        yield choices.result(result, usage)
        return
    async with contextlib.aclosing(batched(outputs, policy, weigh=output_weight)) as batches:
        async for batch in batches:
            result = choices.take(batch.items)
            usage["output"] = choices.output_tokens
            yield choices.result(result, usage)
