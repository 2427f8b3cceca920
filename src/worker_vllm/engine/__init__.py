"""The only package that imports vLLM.

vLLM's Python API moves between releases; a vLLM upgrade touches this folder only (a test
fails when any other module imports vLLM). The rest of the worker uses this interface.
"""

from vllm.exceptions import VLLMClientError
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from worker_vllm.engine.app import AppResponse, VLLMApp
from worker_vllm.engine.core_log import EngineCoreLog
from worker_vllm.engine.outputs import Completion, Step
from worker_vllm.engine.runner import EngineRunner, cache_key, freeze_vllm_env
from worker_vllm.engine.sampling import (
    SamplingParamsError,
    make_sampling_params,
    sampling_param_names,
)
from worker_vllm.engine.serve_args import (
    Flag,
    ServeArgsError,
    chat_template_text,
    engine_args_from,
    parse_serve_args,
    serve_flags,
)
from worker_vllm.loop_thread import LoopThread

__all__ = [
    "AppResponse",
    "Completion",
    "Step",
    "EngineDeadError",
    "EngineGenerateError",
    "EngineCoreLog",
    "EngineRunner",
    "LoopThread",
    "Flag",
    "ServeArgsError",
    "SamplingParamsError",
    "VLLMApp",
    "VLLMClientError",
    "cache_key",
    "chat_template_text",
    "engine_args_from",
    "freeze_vllm_env",
    "make_sampling_params",
    "parse_serve_args",
    "sampling_param_names",
    "serve_flags",
]
