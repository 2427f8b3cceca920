"""The native route: prompt/messages + sampling_params -> {"choices": [...], "usage": {...}}."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from worker_vllm.engine import EngineRunner, Step
from worker_vllm.errors import InvalidInput
from worker_vllm.jobs.flush import FlushPolicy, chunked
from worker_vllm.jobs.shapes import NativeInput

log = logging.getLogger(__name__)

# One thread: the tokenizer is shared, and one caller at a time keeps it safe.
_TOKENIZER_THREAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")


# Serialised size of one logprob of a streamed delta (token id, text, logprob, rank).
_LOGPROB_BYTES = 80


def output_weight(step: Step) -> int:
    """About how many bytes a step adds to a stream message."""
    total = 0
    for completion in step.completions:
        total += len(json.dumps(completion.text)) + 8
        for entry in completion.logprobs or ():
            total += _LOGPROB_BYTES * (1 + (len(entry["top_logprobs"]) if entry else 0))
    return total


@dataclass
class _Choices:
    """Accumulates per-choice output; merges the steps of a batch by choice index."""

    n: int
    output_tokens: int = 0
    prompt_logprobs: list[Any] | None = None  # not yet sent
    prompt_logprobs_seen: bool = False

    def take(self, steps: list[Step]) -> list[dict[str, Any]]:
        choices: list[dict[str, Any]] = [{"tokens": []} for _ in range(self.n)]
        for step in steps:
            if step.prompt_logprobs is not None and not self.prompt_logprobs_seen:
                self.prompt_logprobs_seen = True
                self.prompt_logprobs = step.prompt_logprobs
            for out in step.completions:
                choice = choices[out.index]
                choice["tokens"].append(out.text)
                if out.logprobs is not None:
                    choice.setdefault("logprobs", []).extend(out.logprobs)
                self.output_tokens += len(out.token_ids)
                if out.finish_reason is not None:
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
    params: Any,
    request_id: str,
    policy: FlushPolicy,
    lora_request: Any = None,
    chat_template: str | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The job's results; `params` are its validated SamplingParams."""
    # A long prompt takes seconds to tokenise: never on the job loop, which serves every job.
    prompt_ids = await asyncio.get_running_loop().run_in_executor(
        _TOKENIZER_THREAD, tokenize_prompt, runner, inp, params.max_tokens, chat_template)
    usage = {"input": len(prompt_ids), "output": 0}
    choices = _Choices(params.n)
    outputs = runner.generate({"prompt_token_ids": prompt_ids}, params, request_id,
                              lora_request=lora_request)
    if not inp.stream:
        async with contextlib.aclosing(outputs):  # a cancelled job aborts its request
            collected = [out async for out in outputs]
        result = choices.take(collected)
        for choice in result:
            choice["tokens"] = ["".join(choice["tokens"])]
        usage["output"] = choices.output_tokens
        yield choices.result(result, usage)
        return
    async with contextlib.aclosing(chunked(outputs, policy, weigh=output_weight)) as batches:
        async for batch in batches:
            result = choices.take(batch.items)
            usage["output"] = choices.output_tokens
            yield choices.result(result, usage)
