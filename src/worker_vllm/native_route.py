"""The native route: prompt/messages + sampling_params -> {"choices": [...], "usage": {...}}."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput
from .job_input import NativeInput
from .stream_batching import BatchPolicy, batched
from .vllm_adapter import EngineRunner, VLLMClientError, make_sampling_params

log = logging.getLogger(__name__)

# The reference worker's users rely on 100, not vLLM's 16.
DEFAULT_MAX_TOKENS = 100


def build_sampling_params(inp: NativeInput) -> Any:
    """SamplingParams for the job; an invalid field is an InvalidInput naming it."""
    params = {"max_tokens": DEFAULT_MAX_TOKENS, **inp.sampling_params}
    try:
        return make_sampling_params(params, stream=inp.stream)
    except TypeError as exc:
        # SamplingParams reports unknown keywords as TypeError("Unexpected keyword argument 'x'")
        raise InvalidInput(f"Invalid sampling_params: {exc}", param="sampling_params") from None
    except (ValueError, VLLMClientError) as exc:
        param = getattr(exc, "parameter", None)
        raise InvalidInput(
            f"Invalid sampling_params: {exc}",
            param=f"sampling_params.{param}" if param else "sampling_params",
        ) from None


@dataclass
class _Choices:
    """Accumulates per-choice output; merges partial RequestOutputs by choice index."""

    n: int
    output_tokens: int = 0
    finish: dict[int, str] = field(default_factory=dict)

    def take(self, outputs: list[Any]) -> list[dict[str, Any]]:
        choices: list[dict[str, Any]] = [{"tokens": []} for _ in range(self.n)]
        for request_output in outputs:
            for out in request_output.outputs:
                choice = choices[out.index]
                choice["tokens"].append(out.text)
                self.output_tokens += len(out.token_ids)
                if out.finish_reason is not None:
                    self.finish[out.index] = out.finish_reason
                    choice["finish_reason"] = out.finish_reason
        return choices


def tokenize_prompt(runner: EngineRunner, inp: NativeInput, max_tokens: int | None,
                    chat_template: str | None = None) -> list[int]:
    """Token ids of the prompt, checked against the context length (tokenised once only)."""
    tokenizer = runner.get_tokenizer()
    messages = inp.chat_messages()
    if messages is not None:
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
) -> AsyncIterator[dict[str, Any]]:
    params = build_sampling_params(inp)
    prompt_ids = tokenize_prompt(runner, inp, params.max_tokens, chat_template)
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
        yield {"choices": result, "usage": usage}
        return
    async with contextlib.aclosing(batched(outputs, policy)) as batches:
        async for batch in batches:
            result = choices.take(batch.items)
            usage["output"] = choices.output_tokens
            yield {"choices": result, "usage": dict(usage)}
