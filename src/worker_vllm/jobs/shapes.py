"""job["input"] -> a validated request: native generation, or a call on the OpenAI route."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker_vllm.errors import InvalidInput


# strict: JSON values are taken as they are (0 is no boolean, "5" no number), as vLLM's own
# types are checked for sampling_params.
class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_calls, ... pass on

    role: str
    content: str | list[dict[str, Any]] | None = None


class FlushOverrides(BaseModel):
    """Per-job stream batching overrides (names kept from the reference worker)."""

    model_config = ConfigDict(strict=True)

    max_batch_size: int | None = Field(None, ge=1)
    min_batch_size: int | None = Field(None, ge=1)
    batch_size_growth_factor: float | None = Field(None, ge=1)


class NativeInput(FlushOverrides):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
    apply_chat_template: bool = False
    # A LoRA adapter's name (LORA_MODULES) or the served model name.
    model: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> NativeInput:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def chat_messages(self) -> list[dict[str, Any]] | None:
        """Messages to render with the chat template, or None for a raw prompt."""
        if self.messages is not None:
            return [m.model_dump(exclude_none=True) for m in self.messages]
        if self.apply_chat_template:
            return [{"role": "user", "content": self.prompt}]
        return None


class RouteInput(FlushOverrides):
    """Any allowed route of `vllm serve` (worker-vllm's `route` jobs)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    route: str
    body: dict[str, Any] | None = None
    method: Literal["GET", "POST", "DELETE"] | None = None


class OpenAIInput(FlushOverrides):
    model_config = ConfigDict(extra="forbid", strict=True)

    openai_route: str
    openai_input: dict[str, Any] | None = None


class BatchInput(FlushOverrides):
    """Many requests in one job: OpenAI Batch API request lines, as a list or as the text of
    a `.jsonl` file. Each line is checked when it runs (a bad line is an error line)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    batch: list[Any] | None = None
    batch_jsonl: str | None = None
    stream: bool = False
    # More failed lines than this fail the job (None: a batch fails only on its input).
    max_failed_lines: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> BatchInput:
        if (self.batch is None) == (self.batch_jsonl is None):
            raise ValueError("give exactly one of 'batch' or 'batch_jsonl'")
        return self


def _describe(exc: ValidationError) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        # The prompt check spans two fields: it is about the prompt.
        param = param or loc or next((f for f in ("prompt", "batch") if f in err["msg"]), None)
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        else:
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "Invalid input: " + "; ".join(parts), param


JobInput = NativeInput | OpenAIInput | RouteInput | BatchInput


def parse_job_input(raw: Any) -> JobInput:
    if not isinstance(raw, dict):
        raise InvalidInput("Job input must be a JSON object", param="input")
    model: type[JobInput] = (OpenAIInput if "openai_route" in raw
                             else RouteInput if "route" in raw
                             else BatchInput if "batch" in raw or "batch_jsonl" in raw
                             else NativeInput)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        message, param = _describe(exc)
        raise InvalidInput(message, param=param) from None
