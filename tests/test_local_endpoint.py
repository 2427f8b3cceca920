"""The local endpoint with a real worker process, driven by real clients over real HTTP."""

from __future__ import annotations

import os
import time

import pytest
import requests
from processes import Endpoint

pytestmark = pytest.mark.slow

API_KEY = "test-key"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, demo_model_dir):
    tmp = tmp_path_factory.mktemp("endpoint")
    # A front-end flag set in the worker process's environment (vLLM's --chat-template).
    template = tmp / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    # RUNPOD_PING_INTERVAL: the SDK's heartbeat every second (10 by default).
    ep = Endpoint(tmp, "--api-key", API_KEY, "--short-policies", MAX_CONCURRENCY="4",
                  CHAT_TEMPLATE=str(template), RUNPOD_PING_INTERVAL="1000")
    base = f"http://127.0.0.1:{ep.port}/v2"
    os.environ["RUNPOD_ENDPOINT_BASE_URL"] = base
    yield {"base": base, "headers": ep.headers, "log": ep.log, "process": ep}
    ep.close()


@pytest.fixture()
def rp_endpoint(endpoint):
    import runpod

    runpod.endpoint_url_base = endpoint["base"]  # read from RUNPOD_ENDPOINT_BASE_URL at import
    runpod.api_key = API_KEY
    return runpod.Endpoint("local")


SEEDED = {"temperature": 1.0, "seed": 4, "max_tokens": 16}
CHAT_TEMPLATE = ("{{ bos_token }}CUSTOM TEMPLATE:"
                 "{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_run_sync(rp_endpoint):
    output = rp_endpoint.run_sync({"input": {"prompt": "hello", "sampling_params": SEEDED}},
                                  timeout=120)
    assert output[0]["usage"] == {"input": 3, "output": 16}
    assert output[0]["choices"][0]["tokens"][0]


def test_run_status_output(rp_endpoint):
    job = rp_endpoint.run({"input": {"prompt": "hello", "sampling_params": SEEDED}})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    output = job.output(timeout=120)
    assert job.status() == "COMPLETED"
    # Same seed, same text as runsync: the endpoint relays the worker's output unchanged.
    again = rp_endpoint.run_sync({"input": {"prompt": "hello", "sampling_params": SEEDED}})
    assert output == again


def test_stream(rp_endpoint):
    params = {**SEEDED, "max_tokens": 120, "ignore_eos": True}
    job = rp_endpoint.run({"input": {"prompt": "hello", "sampling_params": params,
                                     "stream": True}})
    chunks = list(job.stream())
    assert len(chunks) > 1
    # Token counts come from usage: vLLM merges deltas when its consumer lags, so a stream's
    # items are not its tokens; its text is the same job's text unstreamed.
    assert chunks[-1]["usage"]["output"] == 120
    whole = rp_endpoint.run_sync({"input": {"prompt": "hello", "sampling_params": params}},
                                 timeout=120)
    assert "".join(t for c in chunks for t in c["choices"][0]["tokens"]) == \
        whole[0]["choices"][0]["tokens"][0]
    assert job.status() == "COMPLETED"
    # /status returns the aggregate of all yields.
    assert job.output() == chunks


def test_failed_job_is_failed_with_a_parsable_error(endpoint):
    body = {"input": {"prompt": "hi", "sampling_params": {"n": 0}}}
    r = requests.post(f"{endpoint['base']}/local/runsync", json=body,
                      headers=endpoint["headers"], timeout=60).json()
    assert r["status"] == "FAILED"
    import json

    assert "n must be at least 1" in json.loads(r["error"])["message"]


def test_cancel_ends_cancelled_and_aborts_generation(rp_endpoint, endpoint):
    params = {"max_tokens": 1900, "ignore_eos": True}
    job = rp_endpoint.run({"input": {"prompt": "x", "sampling_params": params, "stream": True}})
    while job.status() != "IN_PROGRESS":
        time.sleep(0.2)
    time.sleep(0.5)
    assert job.cancel()["status"] == "CANCELLED"
    assert job.status() == "CANCELLED"
    record = endpoint["process"].record(job.job_id)
    assert record["outcome"] == "stopped"
    assert record["engine_requests_running"] == 0


def test_execution_timeout_ends_timed_out_and_aborts(endpoint):
    body = {"input": {"prompt": "y", "stream": True,
                      "sampling_params": {"max_tokens": 1900, "ignore_eos": True}},
            "policy": {"executionTimeout": 1500}}
    r = requests.post(f"{endpoint['base']}/local/run", json=body, headers=endpoint["headers"],
                      timeout=10).json()
    deadline = time.time() + 60
    while (status := requests.get(f"{endpoint['base']}/local/status/{r['id']}",
                                  headers=endpoint["headers"], timeout=10).json())[
            "status"] not in ("TIMED_OUT", "COMPLETED", "FAILED"):
        assert time.time() < deadline
        time.sleep(0.3)
    assert status["status"] == "TIMED_OUT"
    record = endpoint["process"].record(r["id"])
    assert record["outcome"] == "stopped"
    assert record["engine_requests_running"] == 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_missing_or_wrong_key_is_401(endpoint, headers):
    r = requests.post(f"{endpoint['base']}/local/run", json={"input": {"prompt": "a"}},
                      headers=headers, timeout=10)
    assert r.status_code == 401
    r = requests.get(f"{endpoint['base']}/local/openai/v1/models", headers=headers, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_oversize_payload_is_413(endpoint):
    big = "x" * (10 * 1024 * 1024 + 1)
    r = requests.post(f"{endpoint['base']}/local/run", json={"input": {"prompt": big}},
                      headers=endpoint["headers"], timeout=30)
    assert r.status_code == 413


def test_health_counts_jobs(endpoint):
    health = requests.get(f"{endpoint['base']}/local/health", headers=endpoint["headers"],
                          timeout=10).json()
    assert set(health["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert health["workers"]["idle"] + health["workers"]["running"] == 1


@pytest.fixture()
def oai(endpoint):
    import openai

    return openai.OpenAI(api_key=API_KEY, base_url=f"{endpoint['base']}/local/openai/v1",
                         timeout=120)


def test_openai_client_chat_models_completions(oai):
    from worker_vllm.model.demo import DEMO_MODEL_ID

    assert [m.id for m in oai.models.list()] == [DEMO_MODEL_ID]
    messages = [{"role": "user", "content": "hello"}]
    chat = oai.chat.completions.create(model=DEMO_MODEL_ID, messages=messages, max_tokens=6,
                                       seed=2, temperature=1.0)
    assert chat.usage.completion_tokens == 6
    stream = oai.chat.completions.create(model=DEMO_MODEL_ID, messages=messages, max_tokens=6,
                                         seed=2, temperature=1.0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    completion = oai.completions.create(model=DEMO_MODEL_ID, prompt="def", max_tokens=4)
    assert completion.usage.completion_tokens == 4


def test_openai_client_gets_http_errors(oai):
    import openai

    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", max_tokens=2,
                                    messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="worker-vllm/tiny-demo-llama", max_tokens=100_000,
                                    messages=[{"role": "user", "content": "x"}])


def test_chat_template_set_by_env_reaches_the_serving_layer(oai, demo_model_dir):
    from transformers import AutoTokenizer

    from worker_vllm.model.demo import DEMO_MODEL_ID

    chat = oai.chat.completions.create(model=DEMO_MODEL_ID, max_tokens=2,
                                       messages=[{"role": "user", "content": "hello"}])
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_dir))
    rendered = tokenizer.bos_token + "CUSTOM TEMPLATE:hello"
    assert chat.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


# ----- route jobs through the real SDK loop (vLLM's own app, in-process in the worker) ------
def test_route_jobs_tokenize_detokenize_and_completions(rp_endpoint, demo_model_dir):
    from transformers import AutoTokenizer

    from worker_vllm.model.demo import DEMO_MODEL_ID

    text = "for i in range(3):"
    (tokens,) = rp_endpoint.run_sync({"input": {"route": "/tokenize", "body": {
        "model": DEMO_MODEL_ID, "prompt": text}}}, timeout=120)
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_dir))
    assert tokens["tokens"] == tokenizer.encode(text)
    (back,) = rp_endpoint.run_sync({"input": {"route": "/detokenize", "body": {
        "model": DEMO_MODEL_ID, "tokens": tokens["tokens"]}}}, timeout=120)
    assert back["prompt"] == tokenizer.decode(tokens["tokens"])
    body = {"model": DEMO_MODEL_ID, "prompt": text, "max_tokens": 5, "seed": 7,
            "temperature": 1.0}
    (by_route,) = rp_endpoint.run_sync({"input": {"route": "/v1/completions", "body": body}},
                                       timeout=120)
    (by_openai,) = rp_endpoint.run_sync({"input": {"openai_route": "/v1/completions",
                                                   "openai_input": body}}, timeout=120)
    assert by_route["choices"] == by_openai["choices"]


@pytest.mark.parametrize("job_input,code", [
    ({"route": "/pause", "method": "POST", "body": {}}, 404),
    ({"route": "/v1/no-such-route", "body": {}}, 404),
    ({"route": "/tokenize", "body": {"prompt": 5}}, 400),
])
def test_route_job_errors_through_the_sdk_loop(endpoint, rp_endpoint, job_input, code):
    import json

    r = requests.post(f"{endpoint['base']}/local/runsync", json={"input": job_input},
                      headers=endpoint["headers"], timeout=120).json()
    assert r["status"] == "FAILED"
    assert json.loads(r["error"])["code"] == code
    # The engine keeps serving.
    out = rp_endpoint.run_sync({"input": {"prompt": "x", "sampling_params": {"max_tokens": 2}}},
                               timeout=120)
    assert out[0]["usage"]["output"] == 2


def batch_lines(count: int, **body: object) -> list[dict]:
    return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "worker-vllm/tiny-demo-llama", "prompt": f"item {i}",
                      "seed": i, "temperature": 1.0, **body}} for i in range(count)]


def test_a_streamed_batch_job(rp_endpoint):
    # Through the platform: finished lines stream while the batch runs, /runsync of the same
    # batch holds every line and the counts, and the lines are the same.
    lines = batch_lines(12, max_tokens=24)
    job = rp_endpoint.run({"input": {"batch": lines, "stream": True}})
    messages = []
    for message in job.stream():
        messages.append(message)
        if len(messages) == 1:
            assert message["lines"]
    summary = messages[-1]
    streamed = {line["custom_id"]: line for m in messages for line in m["lines"]}
    assert sorted(streamed) == sorted(line["custom_id"] for line in lines)
    assert summary["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    (whole,) = rp_endpoint.run_sync({"input": {"batch": lines}}, timeout=120)
    assert whole["request_counts"] == summary["request_counts"]
    for line in whole["lines"]:
        assert line["response"]["body"]["choices"] == \
            streamed[line["custom_id"]]["response"]["body"]["choices"]


def test_cancelling_a_batch_job_aborts_its_lines(rp_endpoint, endpoint):
    lines = batch_lines(16, max_tokens=1500, ignore_eos=True)
    lines += [{**line, "custom_id": f"short{i}", "body": {**line["body"], "max_tokens": 1}}
              for i, line in enumerate(batch_lines(2))]
    job = rp_endpoint.run({"input": {"batch": lines, "stream": True}})
    first = next(iter(job.stream()))  # the short lines are out: the long ones still run
    assert first["lines"]
    assert job.cancel()["status"] == "CANCELLED"
    record = endpoint["process"].record(job.job_id)
    assert record["outcome"] == "stopped" and record["route"] == "batch/stream"
    # The engine's own count right after the batch's lines were stopped.
    assert record["engine_requests_running"] == 0


def _heartbeats(endpoint: dict, job_id: str, key: str, at_least: int) -> dict:
    """The job's heartbeat counts once `key` has reached `at_least` (local endpoint only)."""
    deadline = time.time() + 120
    while (counts := endpoint["process"].get(f"status/{job_id}").get("heartbeats", {})
           ).get(key, 0) < at_least:
        assert time.time() < deadline, counts
        time.sleep(0.2)
    return counts


def test_the_heartbeat_lists_a_running_job_and_stops_listing_it_once_it_ended(
        rp_endpoint, endpoint):
    """The SDK's heartbeat (every second here) reports the jobs in progress from the worker's
    job-state file, which the worker writes at most once a second: a running job is listed,
    and soon after it ended it is not (a file left behind would list it at every ping)."""
    job = rp_endpoint.run({"input": {"batch": batch_lines(32, max_tokens=1500,
                                                          ignore_eos=True)}})
    assert _heartbeats(endpoint, job.job_id, "listedWhileRunning", 1)
    assert job.cancel()["status"] == "CANCELLED"
    assert endpoint["process"].record(job.job_id)["outcome"] == "stopped"
    counts = _heartbeats(endpoint, job.job_id, "afterItEnded", 6)
    # Pings until the worker stopped the job, and within one write interval after it.
    assert counts["listedAfterItEnded"] <= 3, counts

