"""Route jobs through vLLM's own app, called in-process: {"route", "body", "method"} reaches
any inference route `vllm serve` serves for the model; operator routes are refused."""

from __future__ import annotations

import pytest
from conftest import collect

from worker_vllm.model.demo import DEMO_MODEL_ID

pytestmark = pytest.mark.slow


async def test_tokenize_returns_the_tokenizers_ids_and_detokenize_round_trips(worker):
    text = "def main():\n    return 42"
    (out,) = await collect(worker, {"route": "/tokenize",
                                    "body": {"model": DEMO_MODEL_ID, "prompt": text}})
    tokenizer = worker.runner.get_tokenizer()
    assert out["tokens"] == tokenizer.encode(text)
    (back,) = await collect(worker, {"route": "detokenize", "method": "POST",
                                     "body": {"model": DEMO_MODEL_ID, "tokens": out["tokens"]}})
    assert back["prompt"] == tokenizer.decode(out["tokens"])


async def test_a_route_job_equals_the_same_openai_route_job(worker):
    body = {"model": DEMO_MODEL_ID, "prompt": "class A:", "max_tokens": 6, "seed": 3,
            "temperature": 1.0}
    (by_route,) = await collect(worker, {"route": "/v1/completions", "body": body})
    (by_openai,) = await collect(worker, {"openai_route": "/v1/completions",
                                          "openai_input": body})
    assert by_route["choices"] == by_openai["choices"]
    assert by_route["usage"] == by_openai["usage"]
    streamed = await collect(worker, {"route": "/v1/completions",
                                      "body": {**body, "stream": True}})
    assert all(y.endswith("\n\n") for y in streamed) and "data: [DONE]" in streamed[-1]


async def test_get_without_a_body(worker):
    (out,) = await collect(worker, {"route": "/v1/models"})
    assert out["data"][0]["id"] == DEMO_MODEL_ID


@pytest.mark.parametrize("route,method", [("/pause", "POST"), ("/collective_rpc", "POST"),
                                          ("/reset_prefix_cache", "POST"), ("/metrics", "GET"),
                                          ("/scale_elastic_ep", "POST"), ("/v1/nope", "POST")])
async def test_operator_and_unknown_routes_are_refused_with_404(worker, route, method):
    (out,) = await collect(worker, {"route": route, "method": method, "body": {}})
    error = out["error"]
    assert error["code"] == 404 and error["param"] == "route"
    assert "/v1/chat/completions" in error["message"] and "/tokenize" in error["message"]
    # The engine keeps serving.
    (ok,) = await collect(worker, {"prompt": "x", "sampling_params": {"max_tokens": 2}})
    assert ok["usage"]["output"] == 2


async def test_bad_body_gets_vllms_own_400(worker):
    (out,) = await collect(worker, {"route": "/tokenize", "body": {"model": DEMO_MODEL_ID}})
    error = out["error"]
    assert error["code"] == 400 and error["type"] != "internal_error"
    (wrong_model,) = await collect(worker, {"route": "/v1/completions", "body": {
        "model": "nope", "prompt": "x"}})
    assert wrong_model["error"]["code"] == 404


@pytest.mark.parametrize("openai_route", ["/v1/tokenize", "/tokenize", "tokenize",
                                          "/v1/detokenize"])
async def test_openai_route_names_work_with_or_without_v1(worker, openai_route):
    """The platform turns /openai/v1/tokenize into openai_route "/v1/tokenize"; vLLM serves
    it at /tokenize. Both spellings reach it."""
    body = ({"model": DEMO_MODEL_ID, "tokens": [5, 6]} if "detokenize" in openai_route
            else {"model": DEMO_MODEL_ID, "prompt": "hello"})
    (out,) = await collect(worker, {"openai_route": openai_route, "openai_input": body})
    assert "error" not in out, out
    assert ("prompt" if "detokenize" in openai_route else "tokens") in out


@pytest.mark.parametrize("openai_route", ["/v1/models", "/models", "/v1/chat/completions",
                                          "/chat/completions", "/v1/completions",
                                          "/completions", "/v1/responses", "/v1/messages"])
async def test_every_openai_route_the_readme_lists_is_reachable(worker, openai_route):
    body = None
    if "chat" in openai_route or "messages" in openai_route:
        body = {"model": DEMO_MODEL_ID, "max_tokens": 2,
                "messages": [{"role": "user", "content": "x"}]}
    elif "completions" in openai_route:
        body = {"model": DEMO_MODEL_ID, "max_tokens": 2, "prompt": "x"}
    elif "responses" in openai_route:
        body = {"model": DEMO_MODEL_ID, "max_output_tokens": 16, "input": "x"}
    (out,) = await collect(worker, {"openai_route": openai_route, "openai_input": body}
                           if body is not None else {"openai_route": openai_route})
    assert "error" not in out, out


async def test_a_route_job_over_job_max_n_fails_naming_n(worker):
    (out,) = await collect(worker, {"route": "/v1/completions", "body": {
        "model": DEMO_MODEL_ID, "prompt": "x", "n": worker.settings.job_max_n + 1}})
    assert out["error"]["param"] == "body.n" and "JOB_MAX_N" in out["error"]["message"]


async def test_stopping_an_unstreamed_route_job_aborts_its_generation(worker):
    # vLLM's JSON routes cancel their work when the client disconnects; cancelling the app's
    # task alone would leave it generating to the end.
    import asyncio
    import time

    body = {"model": DEMO_MODEL_ID, "prompt": "a", "max_tokens": 1500, "ignore_eos": True}
    job = asyncio.ensure_future(collect(worker, {"openai_route": "/v1/completions",
                                                 "openai_input": body}))
    while await worker.runner.num_unfinished_requests() == 0:
        assert not job.done()
        await asyncio.sleep(0.02)
    job.cancel()
    await asyncio.gather(job, return_exceptions=True)
    stopped = time.monotonic()
    while (running := await worker.runner.num_unfinished_requests()) and \
            time.monotonic() - stopped < 1.0:
        await asyncio.sleep(0.02)
    assert running == 0


async def test_every_hub_test_input_completes_on_the_demo_model(worker):
    # .runpod/tests.json as the Hub runs it, with the demo model in place of the listing's.
    import json

    from conftest import ROOT

    def on_demo(value):
        if isinstance(value, dict):
            return {k: DEMO_MODEL_ID if k == "model" else on_demo(v) for k, v in value.items()}
        return [on_demo(v) for v in value] if isinstance(value, list) else value

    for test in json.loads((ROOT / ".runpod" / "tests.json").read_text())["tests"]:
        outputs = await collect(worker, on_demo(test["input"]), job_id=test["name"])
        assert outputs and not any(isinstance(o, dict) and o.get("error") for o in outputs), \
            test["name"]
        if test["name"] == "batch":
            assert outputs[-1]["request_counts"] == {"total": 4, "completed": 4, "failed": 0}


def test_jobs_skip_the_middlewares_that_add_nothing_to_a_job_and_keep_the_rest(worker):
    from worker_vllm.engine.app import JOB_SKIPPED_MIDDLEWARE

    app = worker.app.app
    full = {f"{m.cls.__module__}.{m.cls.__qualname__}" for m in app.user_middleware}
    assert JOB_SKIPPED_MIDDLEWARE <= full  # each name still names a middleware of vLLM's app
    layers = worker.app.job_stack.layers()
    assert not JOB_SKIPPED_MIDDLEWARE & set(layers), layers
    # vLLM's error bodies come from the exception handlers; those stay.
    assert layers[0].endswith("ServerErrorMiddleware") and any(
        name.endswith(".ExceptionMiddleware") for name in layers), layers
