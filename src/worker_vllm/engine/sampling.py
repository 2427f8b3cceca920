"""Sampling parameters of a native job, checked as the engine core needs them."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import msgspec
from vllm import SamplingParams
from vllm.sampling_params import (
    RepetitionDetectionParams,
    RequestOutputKind,
    StructuredOutputsParams,
)

_INTERNAL_SAMPLING_FIELDS = {
    "output_kind": "set by the worker from `stream`",
    "skip_clone": "an engine-internal flag",
    "output_text_buffer_length": "an engine-internal field",
}
# What the engine core's msgpack decoder accepts for an integer.
_INT64 = (-(2**63), 2**63 - 1)
_MAX_DEPTH = 16


class SamplingParamsError(ValueError):
    """An invalid sampling_params field; `parameter` names it."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


@functools.cache
def _struct_fields(cls: Any) -> frozenset[str]:
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        names = [f.name for f in msgspec.structs.fields(cls)]
    else:
        names = [f.name for f in dataclasses.fields(cls) if f.init]
    return frozenset(n for n in names if not n.startswith("_"))


def sampling_param_names() -> list[str]:
    """The SamplingParams fields a job may set."""
    return sorted(_struct_fields(SamplingParams) - set(_INTERNAL_SAMPLING_FIELDS))


def _check_values(value: Any, path: str, depth: int = 0) -> None:
    """Values the engine core could not decode: 64-bit overflow, non-finite, deep nesting."""
    if depth > _MAX_DEPTH:
        raise SamplingParamsError(f"{path} is nested too deeply", path)
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        raise SamplingParamsError(f"{path}={value} is out of the 64-bit integer range", path)
    if isinstance(value, float) and not math.isfinite(value):
        raise SamplingParamsError(f"{path} must be a finite number, got {value}", path)
    if isinstance(value, dict):
        for key, item in value.items():
            _check_values(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_values(item, path, depth + 1)


def _check_keys(params: dict[str, Any]) -> None:
    for key in params:
        if key in _INTERNAL_SAMPLING_FIELDS:
            raise SamplingParamsError(f"{key} cannot be set: {_INTERNAL_SAMPLING_FIELDS[key]}",
                                      key)
        if key not in _struct_fields(SamplingParams):
            raise SamplingParamsError(f"unknown field '{key}'", key)
    nested = {"structured_outputs": StructuredOutputsParams,
              "repetition_detection": RepetitionDetectionParams}
    for key, cls in nested.items():
        value = params.get(key)
        if isinstance(value, dict):
            unknown = sorted(set(value) - _struct_fields(cls))
            if unknown:
                raise SamplingParamsError(f"unknown field '{key}.{unknown[0]}'", key)


def _json_natural(params: dict[str, Any]) -> dict[str, Any]:
    """Accept the JSON forms of fields whose Python type JSON cannot express."""
    bias = params.get("logit_bias")
    if isinstance(bias, dict):
        # JSON object keys are strings: "5" means token id 5 (as in the OpenAI API).
        converted = {}
        for key, value in bias.items():
            if isinstance(key, str) and key.strip().lstrip("-").isdigit():
                key = int(key)
            converted[key] = value
        params["logit_bias"] = converted
    if isinstance(params.get("bad_words"), str):
        params["bad_words"] = [params["bad_words"]]  # one word, as `stop` takes one string
    return params


_MSGSPEC_PATH = re.compile(r"\$\.([A-Za-z_]+)")


def _convert_error(exc: msgspec.ValidationError) -> SamplingParamsError:
    text = str(exc)
    match = _MSGSPEC_PATH.search(text)
    return SamplingParamsError(text.replace("`", ""), match.group(1) if match else None)


def make_sampling_params(params: dict[str, Any], *, stream: bool) -> SamplingParams:
    """SamplingParams from a job's dict, type- and range-checked as the engine core needs.

    ``SamplingParams(**d)`` does not check types, and a wrongly typed value kills the engine
    core's input thread while decoding (every request in flight with it), so the dict is
    converted with the type information SamplingParams declares (msgspec), which also runs
    vLLM's own range checks. Raises SamplingParamsError or VLLMClientError.
    """
    if not isinstance(params, dict):
        raise SamplingParamsError("sampling_params must be an object")
    params = _json_natural(dict(params))
    _check_keys(params)
    for key, value in params.items():
        _check_values(value, key)
    # DELTA streams carry only new text, decoded by vLLM's incremental detokenizer, so a
    # multi-byte character is never split; FINAL_ONLY skips per-step outputs when not streaming.
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    params["output_kind"] = kind.value  # msgspec converts the value to the enum
    try:
        return msgspec.convert(params, SamplingParams)
    except msgspec.ValidationError as exc:
        raise _convert_error(exc) from None
