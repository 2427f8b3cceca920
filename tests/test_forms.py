"""An untouched deploy form is `vllm serve --model X`: every value the console form
(worker-config.json) and the Hub form (.runpod/hub.json), of both endpoint types (the
load-balancing ones in .runpod/lb/), send when nobody touches a field,
given to a worker process in its real environment, yields exactly the engine arguments vLLM's
own parser gives for `vllm serve --model X`, but for the worker's deliberate defaults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, worker_env

pytestmark = pytest.mark.slow

# The worker's deliberate defaults on this machine (no GPU): float32, since bfloat16 can die
# with SIGILL on CPUs with AMX (docs/configuration.md). With GPUs: none (TP = visible GPUs
# only when there are several).
DELIBERATE = {"dtype"}

PROBE = """
import json, os, sys
sys.path.insert(0, {src!r})
from worker_vllm.engine import parse_serve_args
from worker_vllm.config.settings import load_worker_settings
from worker_vllm.config.serve_env import LB_SERVER_FLAGS
from worker_vllm.startup.build import serve_config

server = LB_SERVER_FLAGS if os.environ.get("ENDPOINT_TYPE") == "lb" else frozenset()
config = serve_config(os.environ, load_worker_settings(dict(os.environ)), server=server)
reference = parse_serve_args(["--model", os.environ["MODEL_NAME"]])
print(json.dumps({{"worker": {{k: repr(v) for k, v in vars(config.args).items()}},
                  "serve": {{k: repr(v) for k, v in vars(reference).items()}}}}))
"""


sys.path.insert(0, str(ROOT / "scripts"))
from generate_deploy_files import form_values  # noqa: E402

FORMS = {"queue": ROOT, "lb": ROOT / ".runpod" / "lb"}


def console_form(endpoint: str) -> dict[str, str]:
    return form_values(FORMS[endpoint] / "worker-config.json")


def hub_form(endpoint: str) -> dict[str, str]:
    return form_values((ROOT / ".runpod" if endpoint == "queue" else FORMS[endpoint])
                       / "hub.json")


@pytest.mark.parametrize("endpoint", ["queue", "lb"])
@pytest.mark.parametrize("form", [console_form, hub_form], ids=["console", "hub"])
def test_an_untouched_form_gives_the_engine_vllm_serves_arguments(form, endpoint,
                                                                   demo_model_dir):
    values = form(endpoint)
    assert len(values) >= 30, "the form lost its fields"
    assert (values.get("ENDPOINT_TYPE") == "lb") == (endpoint == "lb")
    env = worker_env(**values)
    env["MODEL_NAME"] = str(demo_model_dir)  # the one field a user must fill
    env["BAKED_ARGS_FILE"] = str(demo_model_dir / "no-baked-args.json")
    proc = subprocess.run([sys.executable, "-c", PROBE.format(src=str(ROOT / "src"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads(proc.stdout.strip().splitlines()[-1])
    differ = {k for k in args["serve"] if args["worker"].get(k) != args["serve"][k]}
    assert differ == DELIBERATE, {k: (args["worker"].get(k), args["serve"][k]) for k in differ}
