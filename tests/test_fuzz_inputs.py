"""Generated malformed jobs by the hundred, through the real handler on the real engine.

Every field of every job shape gets values of the wrong kind (chosen from the type vLLM
declares for it), extreme and non-finite numbers, odd unicode and deep nesting. Each such job
must end FAILED with the one error shape and `param` naming the offending field, never an
internal error; afterwards the engine is healthy, holds no request and serves a valid job.
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

import msgspec.inspect as mi
import pytest
from conftest import collect
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm import SamplingParams

from worker_vllm.engine import sampling_param_names
from worker_vllm.model.demo import DEMO_MODEL_ID

pytestmark = pytest.mark.slow

# FUZZ_SCALE multiplies the examples (docs/reliability.md reports a run with FUZZ_SCALE=10);
# CI runs 550 in all. Derandomized: CI sees the same inputs every run, a scaled run more.
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=150 * SCALE, deadline=None, database=None, derandomize=SCALE == 1,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KINDS = ("bool", "int", "float", "str", "null", "list", "dict")
_SCALAR = (st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False)
           | st.text(max_size=8) | st.none())
JSON = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10)


def deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


BY_KIND = {
    "bool": st.booleans(),
    # Integers the engine core cannot decode are wrong for every field.
    "int": st.integers(-1000, 1000),
    "float": st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda f: not f.is_integer()),
    "str": st.text(max_size=20) | st.sampled_from(["\u202e\u0000", "🦙" * 50, "x" * 100_000]),
    "null": st.none(),
    "list": st.lists(JSON, max_size=4) | st.just(deep(40)),
    "dict": st.dictionaries(st.text(max_size=6), JSON, max_size=4),
}
ALWAYS_WRONG = (st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1)
                | st.sampled_from([math.nan, math.inf, -math.inf]))


def accepted_kinds(t: Any) -> set[str]:
    """The JSON kinds msgspec accepts for a declared type."""
    if isinstance(t, mi.UnionType):
        return set().union(*(accepted_kinds(x) for x in t.types))
    if isinstance(t, mi.AnyType):
        return set(KINDS)
    return {
        mi.IntType: {"int"}, mi.FloatType: {"int", "float"}, mi.BoolType: {"bool"},
        mi.StrType: {"str"}, mi.NoneType: {"null"}, mi.ListType: {"list"},
        mi.DictType: {"dict"}, mi.DataclassType: {"dict"}, mi.StructType: {"dict"},
    }.get(type(t), set())


FIELD_TYPES = {f.name: f.type for f in mi.type_info(SamplingParams).fields}
SAMPLING_FIELDS = sampling_param_names()
# JSON-natural forms the worker accepts on purpose: one bad word as a string.
EXTRA_ACCEPTED = {"bad_words": {"str"}}


@st.composite
def wrong_sampling_param(draw: Any) -> tuple[str, Any]:
    name = draw(st.sampled_from(SAMPLING_FIELDS))
    ok = accepted_kinds(FIELD_TYPES[name]) | EXTRA_ACCEPTED.get(name, set())
    wrong = [k for k in KINDS if k not in ok]
    numeric = bool(ok & {"int", "float"})
    choices = [BY_KIND[k] for k in wrong] + ([ALWAYS_WRONG] if numeric or not wrong else [])
    return name, draw(st.one_of(choices))


def run(worker: Any, job_input: Any) -> list[Any]:
    return asyncio.run(collect(worker, job_input, job_id="fuzz"))


def assert_failed_naming(out: list[Any], param_prefix: str) -> dict[str, Any]:
    assert len(out) == 1 and set(out[0]) == {"error"}, out
    error = out[0]["error"]
    assert set(error) <= {"message", "type", "code", "param"}, error
    assert error["type"] != "internal_error" and 400 <= error["code"] < 500, error
    # vLLM's own app names a body field as FastAPI does ("body.max_tokens").
    param = str(error.get("param") or "").removeprefix("body.")
    assert param.startswith(param_prefix), (param_prefix, error)
    assert "Traceback" not in error["message"]
    return error


@FUZZ
@given(bad=wrong_sampling_param())
def test_wrong_kind_in_any_sampling_param(worker, bad):
    name, value = bad
    out = run(worker, {"prompt": "x", "sampling_params": {"max_tokens": 2, name: value}})
    assert_failed_naming(out, f"sampling_params.{name}")


@st.composite
def extreme_sampling_param(draw: Any) -> tuple[str, Any]:
    numeric = [n for n in SAMPLING_FIELDS if accepted_kinds(FIELD_TYPES[n]) & {"int", "float"}]
    name = draw(st.sampled_from(numeric))
    if "float" in accepted_kinds(FIELD_TYPES[name]):
        value = draw(st.floats(allow_nan=False, allow_infinity=False, width=64))
    else:
        value = draw(st.integers(-(2**63), 2**63 - 1))
    return name, value


@settings(FUZZ, max_examples=100 * SCALE)
@given(bad=extreme_sampling_param())
def test_extreme_numbers_fail_cleanly_or_run(worker, bad):
    name, value = bad
    params = {"max_tokens": 2, "ignore_eos": True, name: value}
    out = run(worker, {"prompt": "x", "sampling_params": params})
    if "error" in out[-1]:
        assert_failed_naming(out, "sampling_params")
    else:
        # Accepted: a well-formed result within what was asked for.
        result = out[-1]
        n = params.get("n", 1)
        assert len(result["choices"]) == n
        assert all(isinstance(t, str) for c in result["choices"] for t in c["tokens"])
        assert 0 <= result["usage"]["output"] <= params["max_tokens"] * n
        assert result["usage"]["input"] >= 1


NATIVE_FIELDS = {
    "prompt": ["str"], "messages": ["list"], "stream": ["bool"],
    "apply_chat_template": ["bool"], "max_batch_size": ["int"], "min_batch_size": ["int"],
    "batch_size_growth_factor": ["int", "float"], "model": ["str"],
    "sampling_params": ["dict"],
}
BAD_MESSAGES = st.one_of(
    st.just([]),
    st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]), JSON, max_size=3)
             .filter(lambda m: not isinstance(m.get("role"), str)), min_size=1, max_size=3),
    st.lists(st.fixed_dictionaries({"role": st.just("user"),
                                    "content": st.integers() | st.lists(st.integers(),
                                                                        min_size=1)}),
             min_size=1, max_size=2),
)


@st.composite
def bad_native_job(draw: Any) -> tuple[str, dict[str, Any]]:
    job: dict[str, Any] = {"prompt": "x", "sampling_params": {"max_tokens": 2}}
    name = draw(st.sampled_from([*NATIVE_FIELDS, "unknown"]))
    if name == "unknown":
        key = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in NATIVE_FIELDS))
        job[key] = draw(JSON)
        return key, job
    if name == "messages":
        job.pop("prompt")
        job["messages"] = draw(BAD_MESSAGES | st.one_of([BY_KIND[k] for k in KINDS
                                                          if k not in ("list", "null")]))
        return name, job
    if name == "model":
        job["model"] = draw(st.text(min_size=1, max_size=10).filter(
            lambda m: m != DEMO_MODEL_ID) | BY_KIND["int"] | BY_KIND["dict"])
        return name, job
    wrong = [k for k in KINDS if k not in NATIVE_FIELDS[name] and k != "null"]
    value = draw(st.one_of([BY_KIND[k] for k in wrong]))
    if name.endswith("batch_size") and draw(st.booleans()):
        value = draw(st.integers(max_value=0))
    job[name] = value
    return name, job


@FUZZ
@given(bad=bad_native_job())
def test_malformed_native_jobs(worker, bad):
    name, job = bad
    assert_failed_naming(run(worker, job), name)


OPENAI_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/responses",
                 "/v1/messages", "/v1/embeddings", "/v1/models", "chat/completions"]
CHAT_FIELDS = {
    "messages": "list", "max_tokens": "int", "temperature": "float", "top_p": "float",
    "n": "int", "stream": "bool", "stop": "str", "seed": "int", "logprobs": "bool",
    "response_format": "dict", "tools": "list", "presence_penalty": "float",
}


@st.composite
def bad_openai_job(draw: Any) -> tuple[str, dict[str, Any]]:
    if draw(st.booleans()):
        route = draw(st.text(max_size=20).filter(
            lambda r: "/" + r.strip().strip("/") not in OPENAI_ROUTES
            and "/v1/" + r.strip().strip("/") not in OPENAI_ROUTES))
        return "openai_route", {"openai_route": route, "openai_input": {}}
    body: dict[str, Any] = {"model": DEMO_MODEL_ID, "max_tokens": 2,
                            "messages": [{"role": "user", "content": "hi"}]}
    name = draw(st.sampled_from(list(CHAT_FIELDS)))
    # Kinds pydantic never coerces into the field's type.
    wrong = {"list": ["int", "str", "dict"], "dict": ["int", "list"],
             "bool": ["list", "dict"], "str": ["int", "dict"],
             "int": ["list", "dict"], "float": ["list", "dict"]}[CHAT_FIELDS[name]]
    body[name] = draw(st.one_of([BY_KIND[k] for k in wrong]))
    return name, {"openai_route": "/v1/chat/completions", "openai_input": body}


@FUZZ
@given(bad=bad_openai_job())
def test_malformed_openai_jobs(worker, bad):
    name, job = bad
    assert_failed_naming(run(worker, job), name)


def test_after_the_fuzzing_the_engine_is_healthy_and_empty(worker):
    """Runs after the generated tests above (file order)."""
    assert not worker.runner.errored
    assert asyncio.run(worker.runner.num_unfinished_requests()) == 0
    asyncio.run(worker.runner.check_health())
    out = run(worker, {"prompt": "x", "sampling_params": {"max_tokens": 4, "ignore_eos": True}})
    assert out[0]["usage"]["output"] == 4
