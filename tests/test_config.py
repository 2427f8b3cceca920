"""Config layer: `vllm serve`'s own parser from env vars, worker settings, worker-vllm's names."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from conftest import ROOT

from worker_vllm.config.legacy import MAPPED, REMOVED, legacy_names
from worker_vllm.config.serve_env import (
    env_flags,
    known_env_names,
    near_miss_warnings,
    redacted,
    resolve,
    server_only_warnings,
)
from worker_vllm.config.settings import ALIASES, WorkerSettings, load_worker_settings
from worker_vllm.errors import ConfigError, WorkerError
from worker_vllm.startup import build as startup

# Facts about worker-vllm's settings (its Hub listing and console template), kept as test data.
COMPAT = json.loads((ROOT / "tests" / "data" / "worker-vllm-settings.json").read_text())


def parse(env: dict[str, str], tmp_path):
    env = {"BAKED_ARGS_FILE": str(tmp_path / "absent.json"), **env}
    return resolve(env, load_worker_settings(env))


def test_worker_settings_defaults_and_types():
    s = load_worker_settings({"MAX_CONCURRENCY": "8", "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "2.5"})
    assert s.max_concurrency == 8
    assert s.default_batch_size_growth_factor == 2.5
    assert s.default_batch_size == 50 and s.stream_flush_interval_ms == 50


def test_worker_setting_invalid_value_names_the_variable():
    with pytest.raises(WorkerError) as err:
        load_worker_settings({"MAX_CONCURRENCY": "lots"})
    assert "MAX_CONCURRENCY" in err.value.message and "'lots'" in err.value.message


def test_worker_settings_read_only_the_mapping_given(monkeypatch):
    """The process environment is read once, by the caller; never a second, hidden way."""
    monkeypatch.setenv("MAX_CONCURRENCY", "None")
    monkeypatch.setenv("DEFAULT_BATCH_SIZE", "7")
    s = load_worker_settings({})
    assert s.max_concurrency is None and s.default_batch_size == 50
    assert load_worker_settings({"MAX_CONCURRENCY": "None"}).max_concurrency is None


def test_empty_none_and_zero_mean_unset(tmp_path):
    s = load_worker_settings({"MAX_CONCURRENCY": "", "DEFAULT_BATCH_SIZE": "None"})
    assert s.max_concurrency is None and s.default_batch_size == 50
    config = parse({"MAX_MODEL_LEN": "", "QUANTIZATION": "None", "TOOL_CALL_PARSER": "None",
                    "MAX_NUM_BATCHED_TOKENS": "0", "LORA_MODULES": ""}, tmp_path)
    args = config.args
    assert args.max_model_len is None and args.quantization is None
    assert args.tool_call_parser is None and args.max_num_batched_tokens is None
    assert args.lora_modules is None and config.sources == {}


@pytest.mark.parametrize("raw,expected", [("32k", 32000), ("1m", 1000000), ("1M", 2**20),
                                          ("auto", -1), ("4096", 4096), ("2K", 2048)])
def test_max_model_len_takes_what_vllm_serve_takes(tmp_path, raw, expected):
    assert parse({"MAX_MODEL_LEN": raw}, tmp_path).args.max_model_len == expected


def test_values_are_parsed_as_vllm_serve_parses_them(tmp_path):
    args = parse({
        "GPU_MEMORY_UTILIZATION": "0.8", "ENFORCE_EAGER": "true", "ENABLE_PREFIX_CACHING": "0",
        "DTYPE": "float16", "SERVED_MODEL_NAME": '["a", "b"]',
        "HF_OVERRIDES": '{"rope_theta": 1000}', "COMPILATION_CONFIG": '{"mode": 0}',
        "ALLOWED_TOKEN_IDS_UNUSED": "x", "MIDDLEWARE": "",
        "KV_CACHE_MEMORY_BYTES": "256M",
    }, tmp_path).args
    assert args.gpu_memory_utilization == 0.8
    assert args.enforce_eager is True and args.enable_prefix_caching is False
    assert args.served_model_name == ["a", "b"]
    assert args.hf_overrides == {"rope_theta": 1000}
    assert args.kv_cache_memory_bytes == 256 * 1024 * 1024
    words = parse({"SERVED_MODEL_NAME": "a b"}, tmp_path).args.served_model_name
    assert words == ["a", "b"]


def test_front_end_flags_are_settings_too(tmp_path):
    args = parse({"TOOL_CALL_PARSER": "hermes", "ENABLE_AUTO_TOOL_CHOICE": "true",
                  "RESPONSE_ROLE": "bot", "LORA_MODULES": json.dumps(
                      [{"name": "ad", "path": str(tmp_path)}])}, tmp_path).args
    assert args.tool_call_parser == "hermes" and args.enable_auto_tool_choice is True
    assert args.response_role == "bot"
    assert [m.name for m in args.lora_modules] == ["ad"]


def test_worker_vllm_aliases(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    config = parse({"MODEL_NAME": "org/m", "MODEL_REVISION": "v2", "TOKENIZER_NAME": "org/t",
                    "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "mine",
                    "CUSTOM_CHAT_TEMPLATE": str(template), "OPENAI_RESPONSE_ROLE": "bot"},
                   tmp_path)
    args = config.args
    assert (args.model, args.revision, args.tokenizer) == ("org/m", "v2", "org/t")
    assert args.served_model_name == ["mine"] and args.response_role == "bot"
    assert args.chat_template == str(template)
    assert config.sources["model"] == "MODEL_NAME"


def test_alias_and_flag_set_differently_is_an_error_and_agreeing_is_fine(tmp_path):
    with pytest.raises(ConfigError, match="TOKENIZER_NAME and TOKENIZER"):
        parse({"TOKENIZER_NAME": "a", "TOKENIZER": "b"}, tmp_path)
    assert parse({"TOKENIZER_NAME": "a", "TOKENIZER": "a"}, tmp_path).args.tokenizer == "a"


@pytest.mark.parametrize("var,value,expected", [
    ("MAX_MODEL_LEN", "banana", "invalid human_readable_int_or_auto value"),
    ("DTYPE", "nope", "invalid choice"),
    ("ENFORCE_EAGER", "maybe", "expected true or false"),
    ("SPECULATIVE_CONFIG", "{oops", "--speculative-config"),
])
def test_invalid_value_names_the_variable_its_value_and_vllms_message(tmp_path, var, value,
                                                                      expected):
    with pytest.raises(ConfigError) as err:
        parse({var: value}, tmp_path)
    message = err.value.message
    assert var in message and repr(value) in message and expected in message


def test_precedence_file_then_env_then_extra_args_then_baked(tmp_path):
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump({"max-model-len": 1000, "max_num_seqs": 3,
                                           "dtype": "float16", "seed": 5}))
    baked = tmp_path / "baked.json"
    baked.write_text(json.dumps({"model": "/baked", "max_num_seqs": 9}))
    env = {"VLLM_CONFIG_FILE": str(config_file), "BAKED_ARGS_FILE": str(baked),
           "MAX_MODEL_LEN": "2k", "MAX_NUM_SEQS": "4", "MODEL_NAME": "org/env",
           "VLLM_EXTRA_ARGS": "--max-num-seqs 6 --seed 7 --no-enable-prefix-caching"}
    config = resolve(env, load_worker_settings(env))
    args = config.args
    assert args.dtype == "float16"  # only in the file
    assert args.max_model_len == 2000  # env over file
    assert args.seed == 7 and args.enable_prefix_caching is False  # extra args over file
    assert args.max_num_seqs == 9 and args.model == "/baked"  # baked over everything
    assert config.sources["dtype"] == "VLLM_CONFIG_FILE"
    assert config.sources["seed"] == "VLLM_EXTRA_ARGS"


def test_unknown_flag_in_extra_args_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="VLLM_EXTRA_ARGS.*--no-such-flag"):
        parse({"VLLM_EXTRA_ARGS": "--no-such-flag 1"}, tmp_path)


def test_every_engine_and_serving_flag_has_an_env_name():
    flags = env_flags()
    assert {"MAX_MODEL_LEN", "TOOL_CALL_PARSER", "CHAT_TEMPLATE", "LORA_MODULES",
            "SPECULATIVE_CONFIG", "KV_CACHE_MEMORY_BYTES", "RESPONSE_ROLE"} <= set(flags)
    assert "PORT" not in flags and "HOST" not in flags  # vllm serve's own HTTP server
    assert all(f.option == "--" + name.lower().replace("_", "-") for name, f in flags.items())


# ----- worker-vllm's settings ------------------------------------------------------------
def test_every_worker_vllm_setting_is_honoured_mapped_or_named():
    handled = (set(env_flags()) | set(ALIASES) | legacy_names()
               | {n.upper() for n in WorkerSettings.model_fields})
    foreign = ("VLLM_", "PYTORCH_")  # read by vLLM and torch themselves
    for form in ("hub_listing", "console_template"):
        names = set(COMPAT[form])
        missing = {n for n in names if n not in handled and not n.startswith(foreign)}
        assert not missing, (form, missing)
    removed_flags = {f[2:].upper().replace("-", "_") for f in COMPAT["removed_flags"]}
    assert not (removed_flags & set(env_flags()))  # none is still a flag
    assert not (set(REMOVED) & set(env_flags())) and not (set(MAPPED) & set(env_flags()))


def test_removed_settings_keep_worker_vllms_old_defaults():
    for name, removed in REMOVED.items():
        for form in ("hub_listing", "console_template"):
            old = COMPAT[form].get(name)
            if old not in (None, ""):
                assert old in removed.defaults, (name, old, removed.defaults)


def test_hub_and_console_defaults_parse_without_warnings(tmp_path):
    for form in ("hub_listing", "console_template"):
        env = {k: v for k, v in COMPAT[form].items() if v is not None}
        config = parse(env, tmp_path)
        assert config.warnings == [], (form, config.warnings)


def test_removed_setting_with_a_non_default_value_is_named_in_one_warning(tmp_path):
    config = parse({"SWAP_SPACE": "16", "GUIDED_DECODING_BACKEND": "xgrammar-x",
                    "DEVICE": "auto"}, tmp_path)
    (warning,) = config.warnings
    assert "SWAP_SPACE='16'" in warning and "GUIDED_DECODING_BACKEND" in warning
    assert "DEVICE" not in warning  # at its old default


def test_old_speculative_settings_fold_into_speculative_config(tmp_path):
    args = parse({"SPECULATIVE_MODEL": "[ngram]", "NUM_SPECULATIVE_TOKENS": "4",
                  "NGRAM_PROMPT_LOOKUP_MAX": "3"}, tmp_path).args
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 4,
                                       "prompt_lookup_max": 3}
    args = parse({"NUM_SPECULATIVE_TOKENS": "2",
                  "SPECULATIVE_CONFIG": '{"method": "eagle", "model": "x"}'}, tmp_path).args
    assert args.speculative_config == {"method": "eagle", "model": "x",
                                       "num_speculative_tokens": 2}


def test_other_mapped_names(tmp_path):
    args = parse({"DISABLE_LOG_REQUESTS": "false", "ROPE_THETA": "5e5",
                  "WORKER_USE_RAY": "true"}, tmp_path).args
    assert args.enable_log_requests is True
    assert args.hf_overrides == {"rope_theta": 500000.0}
    assert args.distributed_executor_backend == "ray"


def test_near_miss_and_server_only_warnings():
    assert near_miss_warnings({"MAX_MODEL_LENN": "5", "MAX_CONCURENCY": "3", "HOME": "/x"}) \
        == ["Env var MAX_MODEL_LENN is not a setting; did you mean MAX_MODEL_LEN?",
            "Env var MAX_CONCURENCY is not a setting; did you mean MAX_CONCURRENCY?"]
    assert "SSL_KEYFILE" in server_only_warnings({"SSL_KEYFILE": "/k", "PORT": "80"})[0]
    assert "MAX_MODEL_LEN" in known_env_names()


def test_secrets_are_redacted():
    shown = redacted({"hf_token": "hf_abc", "api_key": "k", "max_num_batched_tokens": 5})
    assert shown == {"hf_token": "***", "api_key": "***", "max_num_batched_tokens": 5}


# ----- the worker's own defaults -----------------------------------------------------------
def test_production_without_model_name_is_a_clear_error(tmp_path):
    env = {"RUNPOD_WEBHOOK_GET_JOB": "http://platform/job-take/$ID",
           "BAKED_ARGS_FILE": str(tmp_path / "absent.json")}
    with pytest.raises(ConfigError, match="MODEL_NAME is not set"):
        startup.serve_config(env, load_worker_settings(env))


def test_tensor_parallel_defaults_to_visible_gpus_only_when_unset(tmp_path, monkeypatch):
    monkeypatch.setattr(startup, "_visible_gpus", lambda: 4)
    env = {"MODEL_NAME": str(tmp_path), "BAKED_ARGS_FILE": str(tmp_path / "absent.json")}
    assert startup.serve_config(env, load_worker_settings(env)).args.tensor_parallel_size == 4
    env["TENSOR_PARALLEL_SIZE"] = "2"
    assert startup.serve_config(env, load_worker_settings(env)).args.tensor_parallel_size == 2


def test_cpu_defaults_to_float32_lora_enables_itself_and_no_secret_is_logged(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(startup, "_visible_gpus", lambda: 0)
    env = {"MODEL_NAME": str(tmp_path), "HF_TOKEN": "hf_supersecret",
           "LORA_MODULES": f"ad={tmp_path}",
           "BAKED_ARGS_FILE": str(tmp_path / "absent.json")}
    logging.getLogger("worker_vllm").propagate = True
    with caplog.at_level(logging.INFO, logger="worker_vllm"):
        config = startup.serve_config(env, load_worker_settings(env))
    assert config.args.dtype == "float32" and config.args.enable_lora is True
    assert "hf_supersecret" not in caplog.text
    assert "vLLM settings" in caplog.text
    assert config.args.hf_token is None and "hf_token" not in config.sources


def test_no_gpu_start_up_error_says_so_and_keeps_vllms_words():
    # What vLLM's CUDA build raises on a machine without a usable GPU (seen with
    # scripts/check_image_env.sh): it names no setting.
    from worker_vllm.startup.errors import explain

    error = explain(RuntimeError("Failed to infer device type, please set the environment "
                                 "variable `VLLM_LOGGING_LEVEL=DEBUG` to turn on verbose "
                                 "logging to help debug the issue."), {"model": "MODEL_NAME"})
    assert error.message.startswith("The worker could not start: no usable GPU was found")
    assert "Failed to infer device type" in error.message
    assert "check MODEL_NAME" not in error.message
