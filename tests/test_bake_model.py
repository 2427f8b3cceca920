"""Model baking: writes the baked-args file; a worker started with it serves the baked model
under its original name (a real worker process, no network)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT, worker_env
from processes import run_handler_online

spec = importlib.util.spec_from_file_location("bake_model", ROOT / "builder" / "bake_model.py")
bake_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bake_model)  # type: ignore[union-attr]


def test_bake_local_directory_writes_args(tmp_path, demo_model_dir):
    args_file = tmp_path / "opt" / "baked-args.json"
    baked = bake_model.bake({"MODEL_NAME": str(demo_model_dir),
                             "BAKED_ARGS_FILE": str(args_file)})
    on_disk = json.loads(args_file.read_text())
    assert on_disk == baked
    assert on_disk["served_model_name"] == [str(demo_model_dir)]
    model_dir = tmp_path / "opt" / "models" / demo_model_dir.name
    assert on_disk["model"] == str(model_dir)
    assert (model_dir / "model.safetensors").is_file()


def test_bake_without_model_name_refuses(tmp_path):
    with pytest.raises(SystemExit, match="MODEL_NAME"):
        bake_model.bake({"BAKED_ARGS_FILE": str(tmp_path / "a.json")})


@pytest.mark.slow
def test_worker_serves_baked_model_under_its_original_name(tmp_path, demo_model_dir):
    args_file = tmp_path / "opt" / "baked-args.json"
    subprocess.run(
        [sys.executable, str(ROOT / "builder" / "bake_model.py")], check=True,
        env=worker_env(MODEL_NAME=str(demo_model_dir), SERVED_MODEL_NAME="acme/tiny-model",
                       BAKED_ARGS_FILE=str(args_file)),
    )
    # The env names another model: baked args win over it. Not offline: every HTTP(S) call
    # goes through a "proxy" that only counts connections; a baked model must make none.
    env = worker_env(BAKED_ARGS_FILE=str(args_file), MODEL_NAME="org/not-this-one",
                     ENFORCE_EAGER="true", MAX_MODEL_LEN="2048",
                     KV_CACHE_MEMORY_BYTES=str(128 * 1024 * 1024))
    proc, connections = run_handler_online(
        env, "--test_input", '{"input": {"prompt": "hi", "sampling_params": {"max_tokens": 4}}}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert connections == [], "the worker reached for the network"
    assert json.loads(proc.stdout)["output"][0]["usage"]["output"] == 4
    assert f"model='{tmp_path / 'opt' / 'models' / demo_model_dir.name}' (baked)" in proc.stderr
    # vLLM's own config line names the served model.
    assert "served_model_name=acme/tiny-model" in proc.stderr
