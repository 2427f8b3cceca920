"""One validation step for every job shape: `validate_job(raw, settings)`.

Size (JOB_MAX_INPUT_BYTES), shape, per-job limits (JOB_MAX_N, JOB_MAX_TOKENS, a batch's
JOB_MAX_BATCH_LINES) and, for native
jobs, the sampling parameters as vLLM's types declare them. Nothing here needs the engine; the
one error raised names the field. What only the engine can check (the prompt's length against
the context, a model's vocabulary) is checked when the job runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from worker_vllm.config.settings import WorkerSettings
from worker_vllm.engine import VLLMClientError, make_sampling_params
from worker_vllm.errors import InvalidInput
from worker_vllm.jobs.batch.lines import line_count
from worker_vllm.jobs.limits import check_counts, check_openai_body, check_size
from worker_vllm.jobs.shapes import (
    BatchInput,
    JobInput,
    NativeInput,
    OpenAIInput,
    RouteInput,
    parse_job_input,
)

# The reference worker's users rely on 100, not vLLM's 16.
DEFAULT_MAX_TOKENS = 100


@dataclass(frozen=True)
class ValidJob:
    """A job's input that passed every check; `sampling` is vLLM's SamplingParams for a
    native job (None for route jobs, whose body vLLM's app parses)."""

    input: JobInput
    sampling: Any = None


def validate_job(raw: Any, settings: WorkerSettings) -> ValidJob:
    """The checked request, or one InvalidInput naming the field (nothing reaches the engine)."""
    check_size(settings, raw)
    inp = parse_job_input(raw)
    if isinstance(inp, OpenAIInput):
        check_openai_body(settings, inp.openai_input)
        return ValidJob(inp)
    if isinstance(inp, RouteInput):
        # Route jobs reach the same generating routes: the same limits bound them.
        if isinstance(inp.body, dict):
            check_openai_body(settings, inp.body, prefix="body.")
        return ValidJob(inp)
    if isinstance(inp, BatchInput):
        check_batch_lines(settings, inp)
        return ValidJob(inp)
    params = build_sampling_params(inp)
    check_counts(settings, params.n, inp.sampling_params.get("max_tokens"), "sampling_params.")
    return ValidJob(inp, params)


def check_batch_lines(settings: WorkerSettings, inp: BatchInput) -> None:
    """The batch's line count within JOB_MAX_BATCH_LINES (each line is checked as it runs)."""
    field = "batch" if inp.batch is not None else "batch_jsonl"
    count = line_count(inp)
    if count == 0:
        raise InvalidInput(f"{field} holds no request line", param=field)
    if count > settings.job_max_batch_lines:
        raise InvalidInput(f"{field} holds {count} request lines; this worker takes at most "
                           f"{settings.job_max_batch_lines} in one job (JOB_MAX_BATCH_LINES)",
                           param=field, code=413)


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
        raise invalid_sampling(exc, params, prefix="Invalid sampling_params: ") from None


def invalid_sampling(exc: BaseException, names: Iterable[str], prefix: str = "",
                     fallback: str | None = "sampling_params") -> InvalidInput:
    """A vLLM complaint about sampling parameters (now or when the engine adds the request)
    as the job's error, naming the field vLLM names or the first one its message mentions."""
    message = str(exc)
    param = getattr(exc, "parameter", None) or field_named_in(message, names)
    return InvalidInput(prefix + message,
                        param=f"sampling_params.{param}" if param else fallback)


def field_named_in(message: str, names: Iterable[str]) -> str | None:
    """The field a vLLM error speaks of (the first named), when it does not say so itself."""
    named = sorted((n for n in names if n in message), key=message.index)
    return named[0] if named else None
