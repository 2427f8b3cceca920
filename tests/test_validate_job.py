"""`validate_job`: every rule of the one validation step, without the engine (fast)."""

from __future__ import annotations

import math

import pytest

from worker_vllm.config.settings import load_worker_settings
from worker_vllm.errors import InvalidInput
from worker_vllm.jobs.shapes import NativeInput, OpenAIInput, RouteInput
from worker_vllm.jobs.validate import DEFAULT_MAX_TOKENS, validate_job

SETTINGS = load_worker_settings({"JOB_MAX_N": "4", "JOB_MAX_TOKENS": "100",
                                 "JOB_MAX_INPUT_BYTES": "2000"})


def rejected(raw, settings=SETTINGS) -> InvalidInput:
    with pytest.raises(InvalidInput) as err:
        validate_job(raw, settings)
    return err.value


@pytest.mark.parametrize("raw,param,words", [
    # shape
    ("a prompt", "input", "JSON object"),
    ([1, 2], "input", "JSON object"),
    ({}, "prompt", "exactly one of 'prompt' or 'messages'"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt", "exactly one"),
    ({"prompt": "x", "temperature": 0.5}, "temperature", "unknown field"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": "x", "stream": "yes"}, "stream", "boolean"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"content": "x"}]}, "messages.0.role", "Field required"),
    ({"prompt": "x", "max_batch_size": 0}, "max_batch_size", "greater than or equal to 1"),
    ({"route": 5}, "route", "string"),
    ({"route": "/v1/models", "method": "PUT"}, "method", "GET"),
    ({"openai_route": "/v1/models", "body": {}}, "body", "unknown field"),
    # size (JOB_MAX_INPUT_BYTES) and JSON values
    ({"prompt": "x" * 3000}, "input", "JOB_MAX_INPUT_BYTES"),
    ({"prompt": "x", "sampling_params": {"temperature": math.nan}},
     "sampling_params.temperature", "not a JSON value"),
    ({"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "top_p": math.inf}},
     "top_p", "not a JSON value"),
    # per-job limits, every shape
    ({"prompt": "x", "sampling_params": {"n": 5}}, "sampling_params.n", "JOB_MAX_N"),
    ({"prompt": "x", "sampling_params": {"max_tokens": 101}}, "sampling_params.max_tokens",
     "JOB_MAX_TOKENS"),
    ({"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "n": 5}}, "n",
     "JOB_MAX_N"),
    ({"openai_route": "/v1/chat/completions",
      "openai_input": {"messages": [], "max_completion_tokens": 500}},
     "max_completion_tokens", "JOB_MAX_TOKENS"),
    ({"route": "/v1/completions", "body": {"prompt": "x", "n": 1000}}, "body.n", "JOB_MAX_N"),
    ({"route": "/v1/chat/completions", "body": {"messages": [], "max_tokens": 101}},
     "body.max_tokens", "JOB_MAX_TOKENS"),
    ({"route": "/v1/responses", "body": {"input": "x", "max_output_tokens": 500}},
     "body.max_output_tokens", "JOB_MAX_TOKENS"),
    # sampling parameters, as vLLM's types and range checks declare them
    ({"prompt": "x", "sampling_params": {"temperature": "hot"}},
     "sampling_params.temperature", "Invalid sampling_params"),
    ({"prompt": "x", "sampling_params": {"n": True}}, "sampling_params.n", "Invalid"),
    ({"prompt": "x", "sampling_params": {"seed": 1.5}}, "sampling_params.seed", "Invalid"),
    ({"prompt": "x", "sampling_params": {"ignore_eos": "yes"}},
     "sampling_params.ignore_eos", "Invalid"),
    ({"prompt": "x", "sampling_params": {"top_p": 2}}, "sampling_params.top_p", "top_p"),
    ({"prompt": "x", "sampling_params": {"no_such_param": 1}},
     "sampling_params.no_such_param", "no_such_param"),
    ({"prompt": "x", "sampling_params": {"output_kind": 1}},
     "sampling_params.output_kind", "output_kind"),
    ({"prompt": "x", "sampling_params": {"n": 0}}, "sampling_params.n", "n"),
    ({"prompt": "x", "sampling_params": {"best_of": 4}}, "sampling_params.best_of", "`n`"),
    ({"prompt": "x", "sampling_params": {"use_beam_search": True}},
     "sampling_params.use_beam_search", "beam search"),
])
def test_each_rule_fails_the_job_naming_the_field(raw, param, words):
    error = rejected(raw)
    assert error.param == param, error.message
    assert words in error.message, error.message
    assert error.code == (413 if "JOB_MAX_INPUT_BYTES" in words else 400)


@pytest.mark.parametrize("raw,kind", [
    ({"prompt": "x"}, NativeInput),
    ({"messages": [{"role": "user", "content": "hi", "name": "a"}]}, NativeInput),
    ({"openai_route": "/v1/models"}, OpenAIInput),
    ({"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "n": 4,
                                                          "max_tokens": 100}}, OpenAIInput),
    ({"route": "/v1/completions", "body": {"prompt": "x", "n": 4, "max_tokens": 100}},
     RouteInput),
    ({"route": "/tokenize", "body": {"prompt": "x"}, "method": "POST"}, RouteInput),
])
def test_valid_inputs_pass_with_their_shape(raw, kind):
    job = validate_job(raw, SETTINGS)
    assert isinstance(job.input, kind)
    assert (job.sampling is not None) == (kind is NativeInput)


def test_native_jobs_get_sampling_params_with_the_worker_default_max_tokens():
    job = validate_job({"prompt": "x", "sampling_params": {"temperature": 0.5, "n": 2}},
                       load_worker_settings({}))
    assert job.sampling.max_tokens == DEFAULT_MAX_TOKENS
    assert job.sampling.temperature == 0.5 and job.sampling.n == 2


def test_removed_fields_that_ask_for_nothing_are_dropped():
    job = validate_job({"prompt": "x", "sampling_params": {"best_of": 2, "n": 2,
                                                           "use_beam_search": False}},
                       SETTINGS)
    assert job.sampling.n == 2


def test_token_limit_binds_only_when_set():
    body = {"route": "/v1/completions", "body": {"prompt": "x", "max_tokens": 5000}}
    assert isinstance(validate_job(body, load_worker_settings({})).input, RouteInput)
    assert rejected(body).param == "body.max_tokens"
