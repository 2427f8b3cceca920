"""Settings in the real process environment of a worker process, as the platform sets them:
the forms' defaults of worker-vllm's Hub listing and console template, empty and "None"
values, human-readable sizes, raw flags, removed settings and bad values."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from processes import run_handler

pytestmark = pytest.mark.slow

# Facts about worker-vllm's settings (its Hub listing and console template), kept as test data.
COMPAT = json.loads((ROOT / "tests" / "data" / "worker-vllm-settings.json").read_text())
JOB = json.dumps({"input": {"prompt": "def f():", "sampling_params": {"max_tokens": 4,
                                                                       "ignore_eos": True}}})
# Needed on this CPU build only: CPU attention takes block sizes in multiples of 32; float32
# (bfloat16 can die with SIGILL on some CPUs); and on CPU, GPU_MEMORY_UTILIZATION is the share
# of the machine's memory vLLM reserves, which the forms' 0.95 exceeds beside other processes.
CPU_OVERRIDES = {"BLOCK_SIZE": "32", "DTYPE": "float32", "GPU_MEMORY_UTILIZATION": "0.3"}


def completed(proc) -> dict:  # type: ignore[no-untyped-def]
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "COMPLETED", result
    assert result["output"][0]["usage"]["output"] == 4
    return result


@pytest.mark.parametrize("form", ["hub_listing", "console_template"])
def test_worker_starts_with_a_worker_vllm_forms_defaults(form, demo_model_dir):
    env = {k: v for k, v in COMPAT[form].items() if v is not None}
    env.update(CPU_OVERRIDES, MODEL_NAME=str(demo_model_dir))
    proc = run_handler("--test_input", JOB, **env)
    completed(proc)
    assert "removed from vLLM" not in proc.stderr  # every old field at its old default
    assert "Start-up failed" not in proc.stderr


def test_unset_values_sizes_raw_flags_and_removed_settings_in_the_environment():
    proc = run_handler(
        "--test_input", JOB,
        MAX_MODEL_LEN="1k", TOOL_CALL_PARSER="None", MAX_CONCURRENCY="None", LORA_MODULES="",
        MAX_NUM_BATCHED_TOKENS="0", QUANTIZATION="", ENABLE_AUTO_TOOL_CHOICE="false",
        VLLM_EXTRA_ARGS="--max-num-seqs 8 --seed 3", SWAP_SPACE="16")
    completed(proc)
    (line,) = [ln for ln in proc.stderr.splitlines() if "vLLM settings" in ln]
    assert "max_model_len=1000 (MAX_MODEL_LEN)" in line
    assert "max_num_seqs=8 (VLLM_EXTRA_ARGS)" in line and "seed=3 (VLLM_EXTRA_ARGS)" in line
    for unset in ("tool_call_parser", "lora_modules", "max_num_batched_tokens", "quantization"):
        assert unset not in line
    # Unset (the form's empty value): the engine's load decides, up to its sequence limit.
    assert "'max_concurrency': None" in proc.stderr
    assert "room in its KV cache of" in proc.stderr and "up to 8 at once (MAX_NUM_SEQS)" in \
        proc.stderr
    (warning,) = [ln for ln in proc.stderr.splitlines() if "removed from vLLM" in ln]
    assert "SWAP_SPACE='16'" in warning


@pytest.mark.parametrize("var,value,expected,other", [
    ("MAX_MODEL_LEN", "banana", "invalid human_readable_int_or_auto value", {}),
    ("TOOL_CALL_PARSER", "no-such-parser", "invalid tool call parser",
     {"ENABLE_AUTO_TOOL_CHOICE": "true"}),
    ("MAX_CONCURRENCY", "lots", "MAX_CONCURRENCY", {}),
])
def test_a_bad_value_fails_start_up_naming_the_variable(var, value, expected, other):
    proc = run_handler("--test_input", JOB, **{var: value, **other})
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]
    assert error["type"] == "startup_error"
    assert var in error["message"] and value in error["message"]
    assert expected in error["message"]
    assert "Traceback" not in proc.stdout
