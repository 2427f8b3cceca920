"""OpenAI route through vLLM's own serving classes, on the real engine (demo model)."""

from __future__ import annotations

import json

import anthropic
import httpx
import httpx2
import jsonschema
import openai
import pytest
from conftest import LORA_NAME, collect
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from worker_vllm.model.demo import DEMO_MODEL_ID

pytestmark = pytest.mark.slow

CHAT = {"model": DEMO_MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8, "seed": 1, "temperature": 1.0}


def job(route: str, body: dict | None = None) -> dict:
    inp: dict = {"openai_route": route}
    if body is not None:
        inp["openai_input"] = body
    return inp


def client_for(sse_text: str) -> openai.OpenAI:
    """An openai client whose HTTP layer returns the worker's SSE text (its real parser)."""
    transport = httpx.MockTransport(lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=sse_text.encode()))
    return openai.OpenAI(api_key="x", base_url="http://worker/v1",
                         http_client=httpx.Client(transport=transport))


async def test_chat_completion_parses_with_openai_types(worker):
    (out,) = await collect(worker, job("/v1/chat/completions", CHAT))
    parsed = ChatCompletion.model_validate(out)
    assert parsed.model == DEMO_MODEL_ID
    assert parsed.usage.completion_tokens == 8


async def test_chat_stream_is_read_by_the_openai_client(worker):
    out = await collect(worker, job("/v1/chat/completions", {**CHAT, "stream": True}))
    assert all(isinstance(y, str) and y.endswith("\n\n") for y in out)  # whole events
    text = "".join(out)
    assert text.rstrip().endswith("data: [DONE]")
    chunks = list(client_for(text).chat.completions.create(**{**CHAT, "stream": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    (whole,) = await collect(worker, job("/v1/chat/completions", CHAT))
    assert content == whole["choices"][0]["message"]["content"]


async def test_completions(worker):
    body = {"model": DEMO_MODEL_ID, "prompt": "def", "max_tokens": 5}
    (out,) = await collect(worker, job("/v1/completions", body))
    assert Completion.model_validate(out).usage.completion_tokens == 5
    stream = await collect(worker, job("completions", {**body, "stream": True}))
    chunks = list(client_for("".join(stream)).completions.create(**{**body, "stream": True}))
    assert chunks


async def test_models_lists_the_served_name_and_lora_adapters(worker):
    (out,) = await collect(worker, job("/v1/models"))
    assert [m["id"] for m in out["data"]] == [DEMO_MODEL_ID, LORA_NAME]


async def test_lora_adapter_is_selected_by_model_name_and_changes_output(worker):
    base_body = {**CHAT, "max_tokens": 12}
    (base,) = await collect(worker, job("/v1/chat/completions", base_body))
    (lora,) = await collect(worker, job("/v1/chat/completions", {**base_body,
                                                                 "model": LORA_NAME}))
    assert lora["model"] == LORA_NAME
    assert lora["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    # The native route reaches the same adapter by `model`.
    native = {"messages": CHAT["messages"], "sampling_params": {"max_tokens": 12, "seed": 1,
                                                                "temperature": 1.0}}
    (n_base,) = await collect(worker, native)
    (n_lora,) = await collect(worker, {**native, "model": LORA_NAME})
    assert n_base["choices"][0]["tokens"][0] == base["choices"][0]["message"]["content"]
    assert n_lora["choices"][0]["tokens"][0] == lora["choices"][0]["message"]["content"]
    (unknown,) = await collect(worker, {**native, "model": "nope"})
    assert unknown["error"]["code"] == 404 and unknown["error"]["param"] == "model"


async def test_forced_tool_call_returns_valid_json_arguments(worker):
    # Bounded values, so the random-weight model must close the JSON well within max_tokens.
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                               "days": {"type": "integer", "minimum": 1,
                                                        "maximum": 9}},
              "required": ["city", "days"], "additionalProperties": False}
    body = {**CHAT, "max_tokens": 200,
            "tools": [{"type": "function", "function": {"name": "get_weather",
                                                        "parameters": schema}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    (out,) = await collect(worker, job("/v1/chat/completions", body))
    call = ChatCompletion.model_validate(out).choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), schema)


async def test_responses_parse_and_stream(worker):
    body = {"model": DEMO_MODEL_ID, "input": "hello", "max_output_tokens": 8}
    (out,) = await collect(worker, job("/v1/responses", body))
    parsed = Response.model_validate(out)
    # max_output_tokens ends it: "incomplete" is the Responses API's word for that.
    assert parsed.status == "incomplete" and parsed.usage.output_tokens == 8
    stream = await collect(worker, job("/v1/responses", {**body, "stream": True}))
    events = list(client_for("".join(stream)).responses.create(**{**body, "stream": True}))
    assert events[0].type == "response.created"
    # (vLLM 0.32 ends this stream with "completed" where the non-streamed reply says
    # "incomplete"; either is a valid final event for the client.)
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert any(e.type == "response.output_text.delta" for e in events)


async def test_messages_parse_with_the_anthropic_client(worker):
    body = {"model": DEMO_MODEL_ID, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello"}]}
    (out,) = await collect(worker, job("/v1/messages", body))
    message = anthropic.types.Message.model_validate(out)
    assert message.usage.output_tokens == 8
    stream = await collect(worker, job("/v1/messages", {**body, "stream": True}))
    # This anthropic release ships its HTTP layer as `httpx2`.
    transport = httpx2.MockTransport(lambda request: httpx2.Response(
        200, headers={"content-type": "text/event-stream"},
        content="".join(stream).encode()))
    client = anthropic.Anthropic(api_key="x", base_url="http://worker",
                                 http_client=httpx2.Client(transport=transport))
    events = list(client.messages.create(**body, stream=True))
    assert events[0].type == "message_start" and events[-1].type == "message_stop"


async def test_raw_openai_output_off_yields_parsed_chunks(worker):
    from worker_vllm.jobs.dispatch import JobHandler

    settings = worker.settings.model_copy(update={"raw_openai_output": False})
    parsed_worker = JobHandler(worker.runner, settings, worker.app)
    out = await collect(parsed_worker, job("/v1/chat/completions", {**CHAT, "stream": True}))
    chunks = [c for batch in out for c in batch]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize(
    ("inp", "code", "needle"),
    [
        (job("/v1/nope", {}), 404, "supported"),
        (job("/v1/chat/completions", {**CHAT, "model": "other"}), 404, "other"),
        (job("/v1/chat/completions", {"model": DEMO_MODEL_ID}), 400, "messages"),
        (job("/v1/chat/completions", {**CHAT, "max_tokens": 10_000}), 400, "max_tokens"),
    ],
)
async def test_errors_use_the_openai_error_object(worker, inp, code, needle):
    (out,) = await collect(worker, inp)
    error = out["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and needle in error["message"]
    assert json.loads(str(error)) == dict(error)


async def running_request_ids(runner) -> list[str]:
    """External ids of the requests the engine is working on (vLLM's own bookkeeping)."""

    async def ids() -> list[str]:
        states = runner.engine.output_processor.request_states.values()
        return [getattr(st, "external_req_id", None) or st.request_id for st in states]

    return await runner.loop.call(ids)


async def test_job_id_is_the_request_id_and_cancel_aborts(worker):
    import asyncio

    body = {**CHAT, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    started = asyncio.Event()

    async def run():
        async for _ in worker.handle({"id": "oa-job-42",
                                      "input": job("/v1/chat/completions", body)}):
            started.set()

    task = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), 60)
    ids = await running_request_ids(worker.runner)
    assert len(ids) == 1 and "oa-job-42" in ids[0]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await worker.runner.num_unfinished_requests() == 0
