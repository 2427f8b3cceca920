"""The per-job limits bound every job shape (no engine needed: they are checked first)."""

from __future__ import annotations

import pytest

from worker_vllm.config.settings import load_worker_settings
from worker_vllm.errors import InvalidInput
from worker_vllm.jobs.dispatch import Worker


@pytest.fixture()
def worker() -> Worker:
    return Worker(runner=None, settings=load_worker_settings(  # type: ignore[arg-type]
        {"JOB_MAX_N": "4", "JOB_MAX_TOKENS": "100"}))


@pytest.mark.parametrize("job_input,param", [
    ({"route": "/v1/completions", "body": {"prompt": "x", "n": 1000}}, "body.n"),
    ({"route": "/v1/chat/completions", "body": {"messages": [], "max_tokens": 101}},
     "body.max_tokens"),
    ({"route": "/v1/responses", "body": {"input": "x", "max_output_tokens": 500}},
     "body.max_output_tokens"),
    ({"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "n": 5}}, "n"),
])
def test_route_and_openai_jobs_over_a_limit_fail_naming_the_field(worker, job_input, param):
    with pytest.raises(InvalidInput) as err:
        worker._request(job_input)
    assert err.value.param == param
    assert "JOB_MAX_" in err.value.message


def test_route_jobs_within_the_limits_pass(worker):
    inp = worker._request({"route": "/v1/completions", "body": {"prompt": "x", "n": 4,
                                                                 "max_tokens": 100}})
    assert inp.body["n"] == 4
