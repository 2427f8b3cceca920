"""OpenAI-route settings -> the `vllm serve` CLI args that configure vLLM's serving layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .engine_config import ConfigError
from .settings import WorkerSettings


class LoraModule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_modules(raw: str | None) -> list[LoraModule]:
    """LORA_MODULES: a JSON list of adapters or one adapter object; invalid stops start-up."""
    if raw is None:
        return []
    try:
        data = json.loads(raw)
        items = data if isinstance(data, list) else [data]
        modules = [LoraModule.model_validate(item) for item in items]
    except (ValueError, ValidationError) as exc:
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ConfigError(
            f"Invalid LORA_MODULES {raw!r}: expected a JSON list (or one object) of "
            f'{{"name", "path", "base_model_name"}} ({detail})'
        ) from None
    for module in modules:
        if not Path(module.path).expanduser().is_dir():
            raise ConfigError(f"LORA_MODULES: adapter {module.name!r} path {module.path!r} is "
                              "not a directory")
    return modules


def chat_template_text(settings: WorkerSettings) -> str | None:
    """CUSTOM_CHAT_TEMPLATE as template text (it may be a file path)."""
    value = settings.custom_chat_template
    if value is None:
        return None
    path = Path(value).expanduser()
    if len(value) < 4096 and path.is_file():
        return path.read_text()
    return value


def serving_cli_args(settings: WorkerSettings, engine_args: dict[str, Any]) -> list[str]:
    args = ["--response-role", settings.openai_response_role]
    template = chat_template_text(settings)
    if template is not None:
        args += ["--chat-template", template]
    flags = {
        "--trust-request-chat-template": settings.trust_request_chat_template,
        "--enable-auto-tool-choice": settings.enable_auto_tool_choice,
        "--enable-prompt-tokens-details": settings.enable_prompt_tokens_details,
        "--enable-force-include-usage": settings.enable_force_include_usage,
        "--return-tokens-as-token-ids": settings.return_tokens_as_token_ids,
    }
    args += [flag for flag, on in flags.items() if on]
    if settings.tool_call_parser:
        args += ["--tool-call-parser", settings.tool_call_parser]
    if engine_args.get("reasoning_parser"):
        args += ["--reasoning-parser", str(engine_args["reasoning_parser"])]
    modules = parse_lora_modules(settings.lora_modules)
    if modules:
        args += ["--lora-modules", *(m.model_dump_json(exclude_none=True) for m in modules)]
    return args
