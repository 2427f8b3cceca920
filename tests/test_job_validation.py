"""Native jobs are checked before the engine: each input that once reached the engine core
(killing its input thread, or failing as a 500) is a regression test here, on the real engine."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import collect

from worker_vllm.jobs.dispatch import JobHandler

pytestmark = pytest.mark.slow

# Each of these, alone, killed the engine core's input thread (the worker then hung for good).
ENGINE_KILLERS = [
    {"n": True}, {"presence_penalty": True}, {"seed": "str"}, {"seed": 1.5},
    {"detokenize": 0}, {"skip_special_tokens": None}, {"stream_interval": True},
    {"max_tokens": 1.5}, {"min_tokens": 0.5}, {"ignore_eos": "yes"},
]
# These ended as 500 "internal error" or leaked an engine request.
FORMER_500S = [
    {"seed": 2**64}, {"max_tokens": 2**64}, {"temperature": 10**30}, {"stop": 0}, {"stop": {}},
    {"allowed_token_ids": [1, "a"]}, {"bad_words": [5]}, {"structured_outputs": "string"},
    {"extra_args": "str"}, {"output_kind": 1}, {"logit_bias": {"x": 1}},
    {"allowed_token_ids": [10**6]}, {"logprobs": 10**4},
]


def field_of(params: dict) -> str:
    return next(iter(params))


@pytest.mark.parametrize("params", ENGINE_KILLERS + FORMER_500S, ids=repr)
async def test_bad_sampling_params_fail_the_job_naming_the_field(worker, params):
    out = await collect(worker, {"prompt": "x", "sampling_params": {"max_tokens": 2, **params}})
    assert len(out) == 1 and set(out[0]) == {"error"}, out
    error = out[0]["error"]
    assert error["type"] == "invalid_request_error", error
    assert error["code"] == 400
    assert error["param"].startswith(f"sampling_params.{field_of(params)}"), error
    assert "internal" not in error["message"].lower()


async def test_engine_still_serves_after_every_bad_input(worker):
    for params in ENGINE_KILLERS + FORMER_500S:
        await collect(worker, {"prompt": "x", "sampling_params": params})
    assert await worker.runner.num_unfinished_requests() == 0
    assert not worker.runner.errored
    out = await collect(worker, {"prompt": "x", "sampling_params": {"max_tokens": 3,
                                                                     "ignore_eos": True}})
    assert out[0]["usage"]["output"] == 3


async def test_logit_bias_takes_json_string_keys(worker):
    tokenizer = worker.runner.get_tokenizer()
    banned = tokenizer.encode(" the", add_special_tokens=False)[0]
    params = {"temperature": 1.0, "seed": 2, "max_tokens": 30, "ignore_eos": True,
              "logprobs": 0}
    # -100 on every token but one forces that token: the JSON-natural form reaches vLLM.
    forced = {str(banned): 100}
    out = await collect(worker, {"prompt": "x", "sampling_params": {**params,
                                                                     "logit_bias": forced}})
    chosen = [e["token_id"] for e in out[0]["choices"][0]["logprobs"]]
    assert chosen == [banned] * 30


async def test_bad_words_takes_one_string(worker):
    out = await collect(worker, {"prompt": "x", "sampling_params": {
        "max_tokens": 2, "bad_words": "import"}})
    assert "error" not in out[0], out


async def test_content_parts_render_like_plain_content(worker):
    plain = [{"role": "user", "content": "hello there"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    params = {"temperature": 1.0, "seed": 3, "max_tokens": 4}
    a = await collect(worker, {"messages": plain, "sampling_params": params})
    b = await collect(worker, {"messages": parts, "sampling_params": params})
    assert a == b
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    (err,) = await collect(worker, {"messages": image, "sampling_params": params})
    assert err["error"]["param"] == "messages.0.content.0"


@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_are_returned(worker, stream):
    params = {"temperature": 1.0, "seed": 4, "max_tokens": 5, "ignore_eos": True,
              "logprobs": 2, "prompt_logprobs": 1}
    out = await collect(worker, {"prompt": "def f():", "sampling_params": params,
                                 "stream": stream})
    entries = [e for y in out for e in y["choices"][0]["logprobs"]]
    assert len(entries) == 5
    for entry in entries:
        assert entry["logprob"] <= 0 and isinstance(entry["token_id"], int)
        assert 2 <= len(entry["top_logprobs"]) <= 3  # the top 2, plus the chosen one
    prompt = [y["prompt_logprobs"] for y in out if "prompt_logprobs" in y]
    assert len(prompt) == 1  # sent once
    prompt_len = out[-1]["usage"]["input"]
    assert len(prompt[0]) == prompt_len and prompt[0][0] is None  # no logprob for token 0


async def test_worker_limits(worker):
    settings = worker.settings.model_copy(update={"job_max_n": 2, "job_max_tokens": 5,
                                                  "job_max_input_bytes": 1000})
    limited = JobHandler(worker.runner, settings)
    (err,) = await collect(limited, {"prompt": "x", "sampling_params": {"n": 3}})
    assert err["error"]["param"] == "sampling_params.n" and "JOB_MAX_N" in err["error"]["message"]
    (err,) = await collect(limited, {"prompt": "x", "sampling_params": {"max_tokens": 6}})
    assert err["error"]["param"] == "sampling_params.max_tokens"
    (err,) = await collect(limited, {"prompt": "x" * 2000})
    assert err["error"]["code"] == 413
    (err,) = await collect(limited, {"openai_route": "/v1/completions",
                                     "openai_input": {"prompt": "x", "n": 3}})
    assert err["error"]["param"] == "n"


async def test_tokenising_a_huge_prompt_does_not_block_the_job_loop(worker):
    """Other jobs share this event loop: a multi-megabyte prompt is tokenised off it."""
    gaps: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    stop = asyncio.Event()
    tick = asyncio.ensure_future(ticker(stop))
    started = time.monotonic()
    (err,) = await collect(worker, {"prompt": "def f(x): return x\n" * 150_000})
    took = time.monotonic() - started
    stop.set()
    await tick
    assert err["error"]["param"] == "prompt"  # longer than the context
    # Tokenising took a while; the loop kept ticking meanwhile (never held for most of it).
    assert max(gaps) < max(0.5, took / 2), (max(gaps), took)


@pytest.mark.parametrize("params", [{"best_of": 1}, {"best_of": 3, "n": 3},
                                    {"use_beam_search": False}, {"length_penalty": 1.0},
                                    {"early_stopping": False}, {"best_of": None}])
def test_removed_sampling_params_that_ask_for_nothing_are_accepted(params):
    from worker_vllm.jobs.shapes import NativeInput
    from worker_vllm.jobs.validate import build_sampling_params

    sp = build_sampling_params(NativeInput(prompt="x", sampling_params=params))
    assert sp.n == params.get("n", 1)


@pytest.mark.parametrize("params,field", [({"best_of": 4}, "best_of"),
                                          ({"best_of": 2, "n": 3}, "best_of"),
                                          ({"use_beam_search": True}, "use_beam_search"),
                                          ({"length_penalty": 0.8}, "length_penalty"),
                                          ({"early_stopping": True}, "early_stopping"),
                                          ({"use_beam_search": "yes"}, "use_beam_search")])
def test_removed_sampling_params_that_ask_for_something_fail_with_advice(params, field):
    from worker_vllm.errors import InvalidInput
    from worker_vllm.jobs.shapes import NativeInput
    from worker_vllm.jobs.validate import build_sampling_params

    with pytest.raises(InvalidInput) as err:
        build_sampling_params(NativeInput(prompt="x", sampling_params=params))
    assert err.value.param == f"sampling_params.{field}"
    assert "use_beam_search" in err.value.message or "`n`" in err.value.message
