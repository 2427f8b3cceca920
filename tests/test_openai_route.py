"""OpenAI route through vLLM's own serving classes, on the real engine (demo model)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import collect
from openai.types import Completion
from openai.types.chat import ChatCompletion

from worker_vllm.demo_model import DEMO_MODEL_ID

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


async def test_models_lists_the_served_name(worker):
    (out,) = await collect(worker, job("/v1/models"))
    assert [m["id"] for m in out["data"]] == [DEMO_MODEL_ID]


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
