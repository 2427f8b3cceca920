"""Config layer: worker settings, engine args from env / YAML / baked args, warnings, secrets."""

from __future__ import annotations

import json
import logging

import pytest

from worker_vllm import startup
from worker_vllm.engine_config import (
    ConfigError,
    near_miss_warnings,
    redacted,
    resolve_engine_args,
)
from worker_vllm.errors import WorkerError
from worker_vllm.settings import load_worker_settings


def resolve(env: dict[str, str], tmp_path) -> dict:
    env = {"BAKED_ARGS_FILE": str(tmp_path / "absent.json"), **env}
    return resolve_engine_args(env, load_worker_settings(env)).values


def test_worker_settings_defaults_and_types():
    s = load_worker_settings({"MAX_CONCURRENCY": "8", "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "2.5"})
    assert s.max_concurrency == 8
    assert s.default_batch_size_growth_factor == 2.5
    assert s.default_batch_size == 50 and s.stream_flush_interval_ms == 50


def test_worker_setting_invalid_value_names_the_variable():
    with pytest.raises(WorkerError) as err:
        load_worker_settings({"MAX_CONCURRENCY": "lots"})
    assert "MAX_CONCURRENCY" in err.value.message and "'lots'" in err.value.message


def test_empty_and_none_mean_unset(tmp_path):
    s = load_worker_settings({"MAX_CONCURRENCY": "", "DEFAULT_BATCH_SIZE": "None"})
    assert s.max_concurrency == 30 and s.default_batch_size == 50
    assert resolve({"MAX_MODEL_LEN": "", "QUANTIZATION": "None"}, tmp_path) == {}


def test_engine_args_converted_by_field_type(tmp_path):
    values = resolve(
        {
            "MAX_MODEL_LEN": "4096",
            "GPU_MEMORY_UTILIZATION": "0.8",
            "ENFORCE_EAGER": "true",
            "ENABLE_PREFIX_CACHING": "0",
            "DTYPE": "float16",
            "SERVED_MODEL_NAME": '["a", "b"]',
            "HF_OVERRIDES": '{"rope_theta": 1000}',
        },
        tmp_path,
    )
    assert values["max_model_len"] == 4096
    assert values["gpu_memory_utilization"] == 0.8
    assert values["enforce_eager"] is True and values["enable_prefix_caching"] is False
    assert values["dtype"] == "float16"
    assert values["served_model_name"] == ["a", "b"]
    assert values["hf_overrides"] == {"rope_theta": 1000}


def test_aliases(tmp_path):
    values = resolve(
        {"MODEL_NAME": "org/m", "MODEL_REVISION": "v2", "TOKENIZER_NAME": "org/t",
         "TOKENIZER_REVISION": "main"},
        tmp_path,
    )
    assert values == {"model": "org/m", "revision": "v2", "tokenizer": "org/t",
                      "tokenizer_revision": "main"}


def test_alias_and_field_both_set_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="MODEL_NAME and MODEL"):
        resolve({"MODEL_NAME": "a", "MODEL": "b"}, tmp_path)


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [("MAX_MODEL_LEN", "big", "int"), ("ENFORCE_EAGER", "maybe", "bool"),
     ("GPU_MEMORY_UTILIZATION", "most", "float")],
)
def test_invalid_engine_value_names_var_value_and_type(tmp_path, var, value, expected):
    with pytest.raises(ConfigError) as err:
        resolve({var: value}, tmp_path)
    assert var in err.value.message and repr(value) in err.value.message
    assert expected in err.value.message


def test_yaml_file_env_wins_and_baked_wins_over_both(tmp_path):
    config = tmp_path / "engine.yaml"
    config.write_text("max-model-len: 1024\nmax_num_seqs: 8\nmodel: from-file\n")
    baked = tmp_path / "baked.json"
    baked.write_text(json.dumps({"model": "/opt/model", "served_model_name": ["org/baked"]}))
    env = {"VLLM_CONFIG_FILE": str(config), "MAX_NUM_SEQS": "16", "MODEL_NAME": "from-env",
           "BAKED_ARGS_FILE": str(baked)}
    spec = resolve_engine_args(env, load_worker_settings(env))
    assert spec.values["max_model_len"] == 1024 and spec.sources["max_model_len"] == "file"
    assert spec.values["max_num_seqs"] == 16 and spec.sources["max_num_seqs"] == "env"
    assert spec.values["model"] == "/opt/model" and spec.sources["model"] == "baked"
    assert spec.values["served_model_name"] == ["org/baked"]


def test_yaml_unknown_key_is_an_error(tmp_path):
    config = tmp_path / "engine.yaml"
    config.write_text("max-model-lenght: 1024\n")
    with pytest.raises(ConfigError, match="max-model-lenght"):
        resolve({"VLLM_CONFIG_FILE": str(config)}, tmp_path)


def test_near_miss_env_var_gets_a_warning():
    warnings = near_miss_warnings({"MAX_MODEL_LENGTH": "1", "MAX_CONCURENCY": "2", "PATH": "/"})
    assert any("MAX_MODEL_LENGTH" in w and "MAX_MODEL_LEN" in w for w in warnings)
    assert any("MAX_CONCURENCY" in w and "MAX_CONCURRENCY" in w for w in warnings)
    assert len(warnings) == 2


def test_secrets_are_redacted():
    shown = redacted({"hf_token": "hf_abc", "api_key": "k", "max_num_batched_tokens": 5})
    assert shown == {"hf_token": "***", "api_key": "***", "max_num_batched_tokens": 5}


def test_hf_token_is_never_an_engine_arg(tmp_path):
    assert "hf_token" not in resolve({"HF_TOKEN": "hf_secret"}, tmp_path)


def test_production_without_model_name_is_a_clear_error(tmp_path):
    env = {"RUNPOD_WEBHOOK_GET_JOB": "http://platform/job-take/$ID",
           "BAKED_ARGS_FILE": str(tmp_path / "absent.json")}
    with pytest.raises(ConfigError, match="MODEL_NAME is not set"):
        startup.engine_args(env, load_worker_settings(env))


def test_tensor_parallel_defaults_to_visible_gpus_only_when_unset(tmp_path, monkeypatch):
    monkeypatch.setattr(startup, "_visible_gpus", lambda: 4)
    model = str(tmp_path)  # a local directory: no download
    env = {"MODEL_NAME": model, "BAKED_ARGS_FILE": str(tmp_path / "absent.json")}
    assert startup.engine_args(env, load_worker_settings(env))["tensor_parallel_size"] == 4
    env["TENSOR_PARALLEL_SIZE"] = "2"
    assert startup.engine_args(env, load_worker_settings(env))["tensor_parallel_size"] == 2


def test_cpu_defaults_to_float32_and_logs_no_secret(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(startup, "_visible_gpus", lambda: 0)
    env = {"MODEL_NAME": str(tmp_path), "HF_TOKEN": "hf_supersecret",
           "BAKED_ARGS_FILE": str(tmp_path / "absent.json")}
    logging.getLogger("worker_vllm").propagate = True
    with caplog.at_level(logging.INFO, logger="worker_vllm"):
        args = startup.engine_args(env, load_worker_settings(env))
    assert args["dtype"] == "float32"
    assert "hf_supersecret" not in caplog.text
    assert "Engine args:" in caplog.text


# ----- OpenAI-route settings ------------------------------------------------------------
def test_lora_modules_accepts_a_list_or_one_object(tmp_path):
    from worker_vllm.openai_options import parse_lora_modules

    one = parse_lora_modules(json.dumps({"name": "a", "path": str(tmp_path)}))
    many = parse_lora_modules(json.dumps([{"name": "a", "path": str(tmp_path)},
                                          {"name": "b", "path": str(tmp_path),
                                           "base_model_name": "m"}]))
    assert [m.name for m in one] == ["a"] and [m.name for m in many] == ["a", "b"]


@pytest.mark.parametrize("raw", ["not json", '[{"name": "a"}]', '{"name": "a", "path": "/x", '
                                 '"oops": 1}', '{"name": "a", "path": "/no/such/dir"}'])
def test_invalid_lora_modules_stop_start_up_with_a_clear_message(raw):
    from worker_vllm.openai_options import parse_lora_modules

    with pytest.raises(ConfigError, match="LORA_MODULES"):
        parse_lora_modules(raw)


def test_openai_settings_become_engine_args_and_serving_flags(tmp_path):
    from worker_vllm.openai_options import serving_cli_args

    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    env = {"MODEL_NAME": str(tmp_path), "BAKED_ARGS_FILE": str(tmp_path / "absent.json"),
           "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "my-model",
           "LORA_MODULES": json.dumps({"name": "ad", "path": str(tmp_path)}),
           "CUSTOM_CHAT_TEMPLATE": str(template), "ENABLE_AUTO_TOOL_CHOICE": "true",
           "TOOL_CALL_PARSER": "hermes", "REASONING_PARSER": "qwen3",
           "OPENAI_RESPONSE_ROLE": "bot"}
    settings = load_worker_settings(env)
    args = startup.engine_args(env, settings)
    assert args["served_model_name"] == ["my-model"] and args["enable_lora"] is True
    cli = serving_cli_args(settings, args)
    assert cli[cli.index("--chat-template") + 1] == template.read_text()
    assert cli[cli.index("--response-role") + 1] == "bot"
    assert "--enable-auto-tool-choice" in cli
    assert cli[cli.index("--tool-call-parser") + 1] == "hermes"
    assert cli[cli.index("--reasoning-parser") + 1] == "qwen3"
    assert json.loads(cli[cli.index("--lora-modules") + 1])["name"] == "ad"
