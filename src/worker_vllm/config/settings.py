"""The one declaration of the worker's own settings.

Every setting is a field here (env name = field name upper-cased) with its type, default,
description and group. The parser, the configuration docs, ``worker-config.json`` and
``.runpod/hub.json`` are all derived from this module. vLLM's settings are not repeated here:
every `vllm serve` flag is settable by its upper-cased name and parsed by vLLM's own parser
(see ``serve_env``); the deploy generator's catalog (``scripts/settings_catalog.py``) only
adds presentation metadata for the ones the deploy forms show first.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from worker_vllm.errors import ConfigError

# Where build-time model baking writes its args: outside /runpod-volume, so an attached
# network volume cannot shadow a baked model.
DEFAULT_BAKED_ARGS_FILE = "/opt/worker-vllm/baked-args.json"


# worker-vllm's forms send 0 for "vLLM's default" in these (0 is no valid value for them).
ZERO_MEANS_UNSET = frozenset({
    "MAX_NUM_BATCHED_TOKENS", "NUM_GPU_BLOCKS_OVERRIDE", "MAX_PARALLEL_LOADING_WORKERS",
    "MAX_CPU_LORAS", "MAX_LOG_LEN", "MAX_NUM_PARTIAL_PREFILLS", "MAX_LONG_PARTIAL_PREFILLS",
})


def is_unset(raw: str | None, name: str | None = None) -> bool:
    """The one rule for "not set": absent, ``""`` or ``"None"`` (what the console and Hub
    forms send for empty fields), and ``0`` where worker-vllm's forms meant vLLM's default."""
    if raw is None or raw.strip() in ("", "None"):
        return True
    return name in ZERO_MEANS_UNSET and raw.strip() in ("0", "0.0")


def parse_bool(raw: str) -> bool | None:
    """A boolean setting's value: true/false, 1/0, yes/no, on/off; None for anything else."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def _field(default: Any, group: str, description: str, **kwargs: Any) -> Any:
    extra = {"group": group}
    # front_end: "queue" or "lb" for a setting only that front-end reads (default: both).
    for key in ("advanced", "options", "title", "front_end"):
        if key in kwargs:
            extra[key] = kwargs.pop(key)
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


class WorkerSettings(BaseModel):
    """Settings of the worker itself (not of vLLM). Reads only the mapping it is given."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    # --- Worker ---
    endpoint_type: Literal["auto", "queue", "lb"] = _field(
        "auto", "Worker", "The RunPod endpoint type served: `queue` (jobs through /run, "
        "/runsync, /openai/v1) or `lb` (load-balancing: vLLM's app over HTTP on PORT, /ping "
        "on PORT_HEALTH). `auto`: `queue` where the platform's job webhook is set, `lb` where "
        "PORT_HEALTH is, else `queue`.", options=("auto", "queue", "lb"),
    )
    lb_drain_timeout_s: float = _field(
        60.0, "Worker", "Load-balancing endpoints: after SIGTERM, seconds the requests in "
        "flight may take to finish before they are cut off.", ge=0, advanced=True, front_end="lb",
    )
    max_concurrency: int | None = _field(
        None, "Worker", "Most jobs one worker runs at once (vLLM batches them continuously). "
        "Unset: the engine decides: the worker takes another job while no request waits in "
        "vLLM's scheduler and its KV cache has room for it, up to MAX_NUM_SEQS; set, a cap "
        "on that.", ge=1,
        front_end="queue",
    )
    job_admission: Literal["engine", "fixed"] = _field(
        "engine", "Worker", "How many jobs the worker takes: `engine` takes another job while "
        "vLLM's scheduler has none waiting and its KV cache has room for it (MAX_CONCURRENCY, "
        "if set, caps that); `fixed` keeps MAX_CONCURRENCY jobs (default MAX_NUM_SEQS) "
        "whatever the engine's load, as worker-vllm did before: jobs beyond what the engine "
        "can run wait in its scheduler, as they do under `vllm serve`, not in RunPod's "
        "queue.", advanced=True, options=("engine", "fixed"), front_end="queue",
    )
    job_intake: Literal["events", "sdk"] = _field(
        "events", "Worker", "How jobs are taken: `events` takes the next job the moment a "
        "slot frees and starts it at once; `sdk` keeps the runpod SDK's own polling intake "
        "(a slot can idle up to 1 s; for comparison).", advanced=True,
        options=("events", "sdk"), front_end="queue",
    )
    base_path: str = _field(
        "/runpod-volume", "Worker",
        "Directory for the Hugging Face cache; a network volume mounted here caches "
        "downloaded models across workers.", advanced=True,
    )
    baked_args_file: str = _field(
        DEFAULT_BAKED_ARGS_FILE, "Worker",
        "JSON file of engine args written when a model is baked into the image; its values "
        "win over env vars.", advanced=True,
    )
    vllm_config_file: str | None = _field(
        None, "Worker",
        "YAML file of `vllm serve` options (vLLM's own `--config`); env vars win over it.",
        advanced=True,
    )
    vllm_extra_args: str | None = _field(
        None, "Worker",
        "Raw `vllm serve` flags (e.g. `--max-num-seqs 64 --enable-chunked-prefill`), applied "
        "after the env settings.", advanced=True,
    )
    hf_token: SecretStr | None = _field(
        None, "Model", "Hugging Face token for gated or private models (never logged)."
    )
    log_job_text: bool = _field(
        False, "Worker", "Log prompt and output text of each job (off: only sizes).",
        advanced=True, front_end="queue",
    )
    on_startup_error: Literal["fail_jobs", "exit"] = _field(
        "fail_jobs", "Worker", "When start-up fails: `fail_jobs` keeps the worker up and ends "
        "every job FAILED with the cause (no restart loop); `exit` exits with code 1.",
        advanced=True, options=("fail_jobs", "exit"),
    )
    startup_summary_file: str | None = _field(
        None, "Worker", "Write the start-up phase timings as JSON to this file.",
        advanced=True,
    )
    job_records_file: str | None = _field(
        None, "Worker", "Append one JSON line per finished job to this file: id, route, "
        "outcome, tokens, the engine's count of requests still running once the job's own "
        "request has ended, and after its latest step its requests waiting, KV-cache usage "
        "and preemptions so far, and the most requests running and waiting in it at any "
        "step while the job ran (for tests and dashboards).", advanced=True,
        front_end="queue",
    )
    warmup: bool = _field(
        True, "Worker", "Serve one short request before taking jobs, so the first job is not "
        "slowed by lazy initialisation.", advanced=True,
    )

    engine_probe_interval_s: float = _field(
        30.0, "Worker", "Seconds between health probes (a one-token request) of the engine; "
        "0 turns them off.", ge=0, advanced=True,
    )
    engine_probe_timeout_s: float = _field(
        120.0, "Worker", "A probe unanswered for this long means the engine is stuck: the "
        "worker exits so the platform replaces it.", gt=0, advanced=True,
    )

    # --- Limits of one job ---
    job_max_input_bytes: int = _field(
        10 * 1024 * 1024, "Limits", "Largest job input (its JSON size, bytes).", ge=1,
        advanced=True, front_end="queue",
    )
    job_max_n: int = _field(
        16, "Limits", "Most choices (`n`) one job may ask for.", ge=1, advanced=True,
        front_end="queue",
    )
    job_max_tokens: int | None = _field(
        None, "Limits", "Most output tokens one job may ask for (default: the context "
        "length).", ge=1, advanced=True, front_end="queue",
    )
    job_max_batch_lines: int = _field(
        50_000, "Limits", "Most request lines in one batch job (the OpenAI Batch API's limit "
        "per file).", ge=1, advanced=True, front_end="queue",
    )

    # --- OpenAI route ---
    raw_openai_output: bool = _field(
        True, "OpenAI", "Stream OpenAI responses as SSE text (on) or as lists of parsed chunk "
        "objects (off, the reference worker's other mode).", advanced=True, front_end="queue",
    )

    # --- Streaming ---
    default_batch_size: int = _field(
        50, "Streaming", "Largest number of token deltas in one streamed chunk while the stream "
        "keeps up; a backlog behind a slow platform leaves whole (up to one 1 MB message).",
        ge=1, front_end="queue",
    )
    default_min_batch_size: int = _field(
        1, "Streaming", "Deltas in the first chunks; chunk size then grows by the factor.", ge=1,
        front_end="queue",
    )
    default_batch_size_growth_factor: float = _field(
        3.0, "Streaming", "Factor by which the chunk size grows after each chunk.", ge=1.0,
        front_end="queue",
    )
    stream_flush_interval_ms: int = _field(
        50, "Streaming",
        "A chunk is sent when its oldest delta has waited this long, even if not full (longer "
        "with many jobs streaming: STREAM_MESSAGES_PER_S).", ge=0, front_end="queue",
    )
    stream_messages_per_s: int = _field(
        400, "Streaming",
        "Stream messages a second of all the jobs streaming at once: with more jobs than this "
        "x STREAM_FLUSH_INTERVAL_MS / 1000, each job's flush interval stretches to (jobs "
        "streaming / this) seconds. Each message is one POST to the platform, paid by the "
        "worker's one process; 0: no bound.", ge=0, advanced=True, front_end="queue",
    )


def load_worker_settings(env: dict[str, str] | None = None) -> WorkerSettings:
    """Parse the worker settings; an invalid value raises a WorkerError naming the variable."""
    source = os.environ if env is None else env
    values = {
        name: raw
        for name in WorkerSettings.model_fields
        if not is_unset(raw := source.get(name.upper()), name.upper())
    }
    try:
        return WorkerSettings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]).upper()
        raise ConfigError(
            f"Invalid value {values.get(name.lower())!r} for {name}: {first['msg']}") from None


# worker-vllm's names for `vllm serve` flags: alias -> the flag's env name.
ALIASES: dict[str, str] = {
    "MODEL_NAME": "MODEL",
    "MODEL_REVISION": "REVISION",
    "TOKENIZER_NAME": "TOKENIZER",
    "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "SERVED_MODEL_NAME",
    "CUSTOM_CHAT_TEMPLATE": "CHAT_TEMPLATE",
    "OPENAI_RESPONSE_ROLE": "RESPONSE_ROLE",
}
