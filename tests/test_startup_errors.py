"""A worker whose start-up fails stays up and fails every job with the cause (no restart
loop), or exits 1 with ON_STARTUP_ERROR=exit; either way it leaves no process behind."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time

import psutil
import pytest
from processes import Endpoint, run_handler

pytestmark = pytest.mark.slow


def test_invalid_setting_fails_every_job_and_the_worker_stays_up(tmp_path):
    ep = Endpoint(tmp_path, "--no-restart", MAX_MODEL_LEN="banana")
    try:
        worker = ep.worker()
        errors = []
        for _ in range(2):
            status = ep.post("runsync", {"input": {"prompt": "x"}})
            assert status["status"] == "FAILED", status
            errors.append(json.loads(status["error"]))
        for error in errors:
            assert error["type"] == "startup_error"
            assert "MAX_MODEL_LEN" in error["message"] and "banana" in error["message"]
            assert "Traceback" not in error["message"]
        assert worker.is_running() and ep.worker().pid == worker.pid  # no restart
        assert ep.log.read_text().count("Start-up failed") == 1  # logged once
    finally:
        ep.close()


def test_exit_setting_exits_1_and_leaves_no_process(tmp_path):
    # A KV cache too small for one sequence: the engine core process starts, then fails.
    ep = Endpoint(tmp_path, "--no-restart", ready=False, ON_STARTUP_ERROR="exit",
                  KV_CACHE_MEMORY_BYTES="1")
    try:
        worker = ep.worker()
        seen: dict[int, psutil.Process] = {}
        deadline = time.time() + 300
        while worker.is_running() and time.time() < deadline:
            with contextlib.suppress(psutil.Error):
                seen.update((c.pid, c) for c in worker.children(recursive=True))
            time.sleep(0.2)
        assert ep.worker_exit_code(timeout=30) == 1
        assert seen, "the engine core never started: the test did not reach its subject"
        _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
        assert "Start-up failed" in ep.log.read_text()
    finally:
        ep.close()


# A bad setting, the variable the error must name, and words of vLLM's own reason it must
# carry. Each case starts a worker process with the setting in its real environment and runs
# one job (local test mode); the job's error is what a user of a deployed endpoint reads.
BAD_SETTINGS = [
    ({"MAX_MODEL_LEN": "32k"}, "MAX_MODEL_LEN", "greater than the derived max_model_len"),
    ({"MAX_MODEL_LEN": "banana"}, "MAX_MODEL_LEN", "invalid human_readable_int_or_auto"),
    ({"GPU_MEMORY_UTILIZATION": "1.5"}, "GPU_MEMORY_UTILIZATION", "less than or equal to 1"),
    ({"MAX_NUM_SEQS": "0"}, "MAX_NUM_SEQS", "greater than or equal to 1"),
    ({"QUANTIZATION": "awq"}, "QUANTIZATION", "Cannot find the config file for awq"),
    ({"SPECULATIVE_CONFIG": '{"method": "nope"}'}, "SPECULATIVE_CONFIG", "Input should be"),
    ({"CUSTOM_CHAT_TEMPLATE": "/nonexistent/t.jinja"}, "CUSTOM_CHAT_TEMPLATE",
     "appears path-like, but doesn't exist"),
    ({"REASONING_PARSER": "nope"}, "REASONING_PARSER", "Reasoning parser 'nope' not found"),
    ({"MODEL_NAME": "org/absent"}, "MODEL_NAME", "not in the cache"),
    ({"TOKENIZER_NAME": "/nonexistent/tok"}, "TOKENIZER_NAME", "is not a directory"),
    ({"DTYPE": "float64x"}, "DTYPE", "invalid choice"),
    ({"LORA_MODULES": "{not json"}, "LORA_MODULES", "Invalid JSON"),
    ({"ENABLE_AUTO_TOOL_CHOICE": "true"}, "ENABLE_AUTO_TOOL_CHOICE", "requires --tool-call"),
    ({"HF_OVERRIDES": "[1,2"}, "HF_OVERRIDES", "valid dictionary"),
    ({"TENSOR_PARALLEL_SIZE": "3"}, "TENSOR_PARALLEL_SIZE", "must be divisible by tensor"),
    # Fails in vLLM's engine core process: the reason comes from that process's log.
    ({"BLOCK_SIZE": "7"}, "BLOCK_SIZE", "No common block size for 7"),
]


def test_every_start_up_failure_names_its_setting_and_carries_vllms_reason():
    job = json.dumps({"input": {"prompt": "x", "sampling_params": {"max_tokens": 2}}})

    def run(case: tuple[dict[str, str], str, str]) -> tuple[str, str, int, str]:
        env, var, reason = case
        proc = run_handler("--test_input", job, **env)
        try:
            message = json.loads(proc.stdout)["error"]["message"]
        except (ValueError, KeyError):
            message = f"no job error: {proc.stdout[-500:]} {proc.stderr[-1500:]}"
        log_line = next((ln for ln in proc.stderr.splitlines() if "Start-up failed" in ln), "")
        return var, reason, proc.returncode, message + "\n" + log_line

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, BAD_SETTINGS))
    problems = []
    for var, reason, code, text in results:
        message, log_line = text.split("\n", 1)
        for where, seen in (("job error", message), ("log line", log_line)):
            if code != 1 or var not in seen or reason not in seen or "Traceback" in seen:
                problems.append(f"{var} ({where}, exit {code}): {seen[:600]}")
    assert not problems, "\n".join(problems)
    assert len(BAD_SETTINGS) >= 12
