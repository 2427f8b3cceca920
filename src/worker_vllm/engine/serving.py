"""The OpenAI-compatible layer: vLLM's own serving classes, in-process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from .runner import EngineRunner


def _openai_request_types() -> dict[str, tuple[str, str | None, Any]]:
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    # route -> (state attribute, method (None: the object is callable), request type)
    return {
        "/v1/chat/completions": ("openai_serving_chat", "create_chat_completion",
                                 ChatCompletionRequest),
        "/v1/completions": ("openai_serving_completion", "create_completion", CompletionRequest),
        "/v1/responses": ("openai_serving_responses", "create_responses", ResponsesRequest),
        "/v1/messages": ("anthropic_serving_messages", "create_messages",
                         AnthropicMessagesRequest),
        "/v1/embeddings": ("serving_embedding", None, EmbeddingRequest),
    }


def sse_event(item: Any) -> str:
    """One whole SSE event: strings come framed from vLLM; Responses events are objects."""
    if isinstance(item, str):
        return item
    return f"event: {item.type}\ndata: {item.model_dump_json()}\n\n"


def _raw_request(request_id: str) -> Any:
    """A minimal HTTP request: vLLM's serving classes take the request id from its header."""
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                    "headers": [(b"x-request-id", request_id.encode())]})


class OpenAIServing:
    """The serving objects `vllm serve` builds, built once at start-up on the engine loop."""

    def __init__(self, runner: EngineRunner, state: Any) -> None:
        from pydantic import TypeAdapter

        self.runner = runner
        self.state = state
        self.routes = {
            route: (attr, method, TypeAdapter(request_type))
            for route, (attr, method, request_type) in _openai_request_types().items()
            if getattr(state, attr, None) is not None
        }

    @classmethod
    def create(cls, runner: EngineRunner, args: Any) -> OpenAIServing:
        """Build the serving layer from the parsed `vllm serve` arguments, as `vllm serve`
        does (so every option means the same)."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        state = State()

        async def init() -> None:
            tasks = await runner.engine.get_supported_tasks()
            await init_app_state(runner.engine, state, args, supported_tasks=tasks)

        runner._submit(init()).result()
        return cls(runner, state)

    def supported(self) -> list[str]:
        return sorted([*self.routes, "/v1/models"])

    def lora_request(self, model: str | None) -> Any:
        """The LoRARequest for an adapter name; None for the base model (or no name)."""
        models = self.state.openai_serving_models
        if model is None or models.is_base_model(model):
            return None
        lora = models.lora_requests.get(model)
        if lora is None:
            names = [*self.runner.served_model_names, *models.lora_requests]
            raise LookupError(f"Unknown model {model!r}; served: {', '.join(names)}")
        return lora

    def parse(self, route: str, body: dict[str, Any]) -> Any:
        """The route's request object; raises pydantic.ValidationError for a bad body."""
        return self.routes[route][2].validate_python(body)

    async def models(self) -> dict[str, Any]:
        models = await self.runner.call(self.state.openai_serving_models.show_available_models)
        return models.model_dump(mode="json")

    async def respond(self, route: str, request: Any, request_id: str) -> Any:
        """A dict (response or {"error": ...}) or an async iterator of SSE event strings."""
        attr, method, _ = self.routes[route]
        target = getattr(self.state, attr)
        serve = getattr(target, method) if method else target

        async def run() -> Any:
            return await serve(request, _raw_request(request_id))

        result = await self.runner.call(run)
        if hasattr(result, "__aiter__"):
            return self._relay(result)
        if hasattr(result, "model_dump"):
            return result.model_dump(mode="json")
        body = json.loads(bytes(result.body))  # a starlette JSONResponse (pooling routes)
        return body

    async def _relay(self, generator: Any) -> AsyncIterator[str]:
        # The generator was created on the engine loop; iterate it there.
        async for item in self.runner.stream(lambda: generator):
            yield sse_event(item)
