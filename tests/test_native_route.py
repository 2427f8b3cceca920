"""Native route against the real vLLM engine (CPU build) on the demo model."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import collect

from worker_vllm.jobs.dispatch import JobHandler
from worker_vllm.jobs.flush import chunked

pytestmark = pytest.mark.slow

SEEDED = {"temperature": 1.0, "seed": 11, "max_tokens": 12}


def test_the_engine_runs_on_uvloop(worker):
    """vLLM's output handler and app run on uvloop's loop, as under vllm serve."""
    import uvloop

    assert isinstance(worker.runner.loop.loop, uvloop.Loop)


def test_the_engine_keeps_no_prometheus_metrics(worker):
    """No route of the worker serves vLLM's `/metrics`: its Prometheus logger (which vLLM adds
    unless given one of its type) is the stand-in that records nothing."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from worker_vllm.engine.load import NoPrometheus

    loggers = worker.runner.engine.logger_manager.stat_loggers
    prometheus = [type(x) for x in loggers if isinstance(x, PrometheusStatLogger)]
    assert prometheus == [NoPrometheus]


def tokens_of(yields: list[dict], choice: int = 0) -> list[str]:
    return [t for y in yields for t in y["choices"][choice]["tokens"]]


async def test_prompt_not_streamed_returns_whole_text_in_one_yield(worker):
    out = await collect(worker, {"prompt": "def main():", "sampling_params": SEEDED})
    assert len(out) == 1
    (choice,) = out[0]["choices"]
    assert len(choice["tokens"]) == 1 and choice["tokens"][0]
    assert choice["finish_reason"] == "length"
    assert out[0]["usage"]["output"] == 12


async def test_usage_counts_real_tokens(worker):
    tokenizer = worker.runner.get_tokenizer()
    prompt = "import os\nprint(os.getcwd())"
    out = await collect(worker, {"prompt": prompt, "sampling_params": SEEDED})
    assert out[0]["usage"] == {"input": len(tokenizer.encode(prompt)), "output": 12}
    streamed = await collect(worker, {"prompt": prompt, "sampling_params": SEEDED,
                                      "stream": True})
    assert streamed[-1]["usage"] == {"input": len(tokenizer.encode(prompt)), "output": 12}
    # Streaming and not give the same text for the same seed.
    assert "".join(tokens_of(streamed)) == out[0]["choices"][0]["tokens"][0]


async def test_default_max_tokens_is_100(worker):
    out = await collect(worker, {"prompt": "x = ", "sampling_params": {"ignore_eos": True}})
    assert out[0]["usage"]["output"] == 100


async def test_messages_use_the_chat_template(worker):
    messages = [{"role": "user", "content": "hello"}]
    out = await collect(worker, {"messages": messages, "sampling_params": SEEDED})
    tokenizer = worker.runner.get_tokenizer()
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out[0]["usage"]["input"] == len(tokenizer.encode(rendered, add_special_tokens=False))
    # apply_chat_template wraps a prompt as one user message: same prompt, same output.
    wrapped = await collect(
        worker, {"prompt": "hello", "apply_chat_template": True, "sampling_params": SEEDED}
    )
    assert wrapped == out


async def test_seeded_sampling_is_deterministic(worker):
    job = {"prompt": "class Foo:", "sampling_params": SEEDED}
    first, second = await collect(worker, job), await collect(worker, job)
    assert first == second
    other = await collect(worker, {"prompt": "class Foo:",
                                   "sampling_params": {**SEEDED, "seed": 12}})
    assert other[0]["choices"] != first[0]["choices"]


@pytest.mark.parametrize("stream", [False, True])
async def test_n_choices_are_merged_by_index(worker, stream):
    params = {"temperature": 1.0, "seed": 3, "max_tokens": 10, "n": 3}
    out = await collect(worker, {"prompt": "for i in", "sampling_params": params,
                                 "stream": stream})
    assert all(len(y["choices"]) == 3 for y in out)
    texts = ["".join(tokens_of(out, i)) for i in range(3)]
    assert len(set(texts)) == 3  # three different samples
    assert out[-1]["usage"]["output"] == 30


async def test_structured_output_on_native_route(worker):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}
    params = {"temperature": 1.0, "seed": 1, "max_tokens": 40,
              "structured_outputs": {"json": schema}}
    out = await collect(worker, {"prompt": "answer:", "sampling_params": params})
    value = json.loads(out[0]["choices"][0]["tokens"][0])
    assert isinstance(value["ok"], bool)


async def test_streamed_200_tokens_arrive_in_growing_batches(worker):
    """Count bound: with a long flush interval the sizes follow min -> x growth -> max."""
    settings = worker.settings.model_copy(update={"stream_flush_interval_ms": 60_000})
    slow_flush = JobHandler(worker.runner, settings)
    params = {"temperature": 1.0, "seed": 5, "max_tokens": 200, "ignore_eos": True}
    out = await collect(slow_flush, {"prompt": "def f(x):", "sampling_params": params,
                                     "stream": True, "min_batch_size": 2,
                                     "batch_size_growth_factor": 2, "max_batch_size": 40})
    sizes = [len(y["choices"][0]["tokens"]) for y in out]
    # Sizes count vLLM's deltas: one token each, unless vLLM merged the deltas of a consumer
    # that fell behind (its output collector does), so there may be fewer than 200.
    assert sizes[:7] == [1, 2, 4, 8, 16, 32, 40]
    assert sum(sizes) <= 200 and out[-1]["usage"]["output"] == 200


async def test_streamed_batches_never_wait_longer_than_the_flush_interval(worker):
    """Time bound, measured on the real engine stream with the worker's default policy."""
    from worker_vllm.jobs.dispatch import flush_policy
    from worker_vllm.jobs.native import tokenize_prompt
    from worker_vllm.jobs.shapes import NativeInput
    from worker_vllm.jobs.validate import build_sampling_params

    inp = NativeInput(prompt="while True:", stream=True,
                      sampling_params={"temperature": 1.0, "seed": 9, "max_tokens": 200,
                                       "ignore_eos": True})
    policy = flush_policy(worker.settings, inp)
    params = build_sampling_params(inp)
    ids = tokenize_prompt(worker.runner, inp, params.max_tokens)
    stream = worker.runner.generate({"prompt_token_ids": ids}, params, "time-bound")
    batches = [b async for b in chunked(stream, policy)]
    sizes = [len(b.items) for b in batches]
    # Items are vLLM's deltas: one token each, unless vLLM merged the deltas of a consumer
    # that fell behind (seen on a busy machine), so the tokens are counted, not the deltas.
    tokens = sum(len(step.completions[0].token_ids) for b in batches for step in b.items)
    assert sizes[0] == 1 and tokens == 200
    assert max(sizes) > 1  # batching happened
    # The oldest delta of every batch left within the interval (+ 20 ms scheduling slack).
    assert max(b.oldest_wait for b in batches) <= policy.flush_interval + 0.02, [
        round(b.oldest_wait, 3) for b in batches]


async def test_cancelled_job_leaves_no_running_request(worker):
    job = {"prompt": "import", "stream": True,
           "sampling_params": {"max_tokens": 1900, "ignore_eos": True}}
    received = asyncio.Event()

    async def run():
        async for _ in worker.handle({"id": "to-cancel", "input": job}):
            received.set()

    task = asyncio.create_task(run())
    await asyncio.wait_for(received.wait(), 60)
    assert await worker.runner.num_unfinished_requests() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await worker.runner.num_unfinished_requests() == 0


ERROR_CASES = [
    ({}, "exactly one of 'prompt' or 'messages'"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "sampling_params": {"n": 0}}, "n must be at least 1"),
    ({"prompt": "a", "sampling_params": {"temprature": 1}}, "temprature"),
    ({"prompt": "a", "sampling_params": {"max_tokens": 5000}}, "max_tokens"),
    ({"prompt": "a", "stream": "sometimes"}, "stream"),
    ({"prompt": "a", "max_batch_size": 0}, "max_batch_size"),
    ({"prompt": "a", "promt": "b"}, "unknown field 'promt'"),
    ({"prompt": "word " * 3000}, "context"),
]


@pytest.mark.parametrize(("job_input", "expected"), ERROR_CASES)
async def test_bad_input_fails_with_one_error_shape(worker, job_input, expected):
    out = await collect(worker, job_input)
    assert len(out) == 1
    error = out[0]["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert expected in error["message"]
    assert "Traceback" not in str(error)
    # The SDK stores str(error): it is JSON a client can parse.
    assert json.loads(str(error))["message"] == error["message"]


async def test_worker_keeps_serving_after_errors(worker):
    await collect(worker, {"prompt": "a", "sampling_params": {"n": 0}})
    out = await collect(worker, {"prompt": "ok", "sampling_params": SEEDED})
    assert out[0]["usage"]["output"] == 12


async def test_input_that_is_not_an_object(worker):
    out = await collect(worker, "just a string")  # type: ignore[arg-type]
    assert out[0]["error"]["param"] == "input"


async def test_custom_chat_template_applies_to_the_native_route(worker, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    # CUSTOM_CHAT_TEMPLATE (vLLM's --chat-template) may name a file; the worker reads it once.
    from worker_vllm.engine import chat_template_text

    custom = JobHandler(worker.runner, worker.settings, worker.app,
                    chat_template=chat_template_text(str(template)))
    job = {"messages": [{"role": "user", "content": "hello there"}], "sampling_params": SEEDED}
    (out,) = await collect(custom, job)
    tokenizer = worker.runner.get_tokenizer()
    assert out["usage"]["input"] == len(tokenizer.encode("hello there",
                                                         add_special_tokens=False))


async def test_task_cancelled_between_yields_still_aborts_the_request(worker):
    """The SDK awaits its stream POST between yields; a cancel landing there never enters the
    handler's generator. The request must be aborted anyway, not left to garbage collection."""
    gate = asyncio.Event()  # never set: the "POST" that is in flight when the cancel comes
    job = {"prompt": "import", "stream": True,
           "sampling_params": {"max_tokens": 1900, "ignore_eos": True}}
    first = asyncio.Event()

    async def sdk_like() -> None:
        async for _ in worker.handle({"id": "between-yields", "input": job}):
            first.set()
            await gate.wait()

    task = asyncio.create_task(sdk_like())
    await asyncio.wait_for(first.wait(), 60)
    assert await worker.runner.num_unfinished_requests() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if await worker.runner.num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    assert await worker.runner.num_unfinished_requests() == 0


async def test_the_engines_steps_carry_its_requests_sizes_only_when_asked(worker, monkeypatch):
    """The load after each step, from vLLM's stat logger: the requests in flight (prompt,
    generated, max_tokens) are read only at steps whose follower asks for them."""
    loads = worker.runner.loads
    seen: list = []
    asked = {"sizes": True}

    class Follower:
        def wants_sizes(self, load) -> bool:
            return asked["sizes"]

        def observe(self, load) -> None:
            seen.append(load)

    monkeypatch.setattr(loads, "follower", Follower())
    params = {"max_tokens": 20, "ignore_eos": True, "temperature": 1.0, "seed": 1}
    await collect(worker, {"prompt": "def main():", "sampling_params": params})
    sized = [load for load in seen if load.in_flight]
    assert sized and all(r.max_tokens == 20 and 0 <= r.generated <= 20 for load in sized
                         for r in load.in_flight)
    prompt = len(worker.runner.get_tokenizer().encode("def main():"))
    assert {r.prompt for load in sized for r in load.in_flight} == {prompt}
    assert any(r.generated == 20 for load in seen for r in load.finished)
    seen.clear()
    asked["sizes"] = False
    await collect(worker, {"prompt": "def main():", "sampling_params": params})
    assert seen and all(load.in_flight is None for load in seen)


def test_the_core_runs_vllms_app_lifespan_as_vllm_serve_does(worker):
    """vLLM's app lifespan runs for the life of the core: its stats task (the engine's stats in
    the log every VLLM_LOG_STATS_INTERVAL s) is running, an effect only that lifespan has (the
    frozen start-up heap it also leaves is not: the job loop freezes it too)."""
    from vllm.entrypoints.launchers.utils import server_utils

    tasks = [t for t in server_utils._running_tasks if not t.done()]
    assert any(t.get_coro().__qualname__.endswith("_force_log") for t in tasks), tasks
