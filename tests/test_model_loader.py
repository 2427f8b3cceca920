"""Model loader: local paths, weight-format allow-list, offline cache laid out here (no network)."""

from __future__ import annotations

import pytest

from worker_vllm.model import loader as model_loader
from worker_vllm.model.loader import ModelLoadError, allow_patterns, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(base_path, repo: str, files: dict[str, str]):
    """The HF hub cache layout huggingface_hub itself writes: refs/main -> snapshots/<commit>."""
    root = model_loader.hf_cache_dir(str(base_path)) / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_local_directory_is_used_as_is(tmp_path):
    assert resolve(str(tmp_path), revision=None, token=None, base_path="/nonexistent") == tmp_path


def test_allow_list_keeps_one_weights_format_and_support_files():
    files = ["model.safetensors", "pytorch_model.bin", "config.json", "tokenizer.json",
             "modeling_x.py", "original/consolidated.pth"]
    patterns = allow_patterns(files)
    assert "*.safetensors" in patterns and "*.bin" not in patterns and "*.pth" not in patterns
    assert {"*.json", "*.py", "*.jinja", "tokenizer*"} <= set(patterns)
    assert "*.bin" in allow_patterns(["pytorch_model.bin", "config.json"])
    assert not any(p in allow_patterns(files, weights=False) for p in ("*.safetensors", "*.bin"))


def test_offline_hub_id_resolves_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = lay_out_cache(tmp_path, "org/tiny", {"config.json": "{}", "model.safetensors": ""})
    path = resolve("org/tiny", revision=None, token=None, base_path=str(tmp_path))
    assert path == snapshot
    assert (path / "config.json").is_file()


def test_offline_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="org/absent.*HF_HUB_OFFLINE"):
        resolve("org/absent", revision=None, token=None, base_path=str(tmp_path))


def test_hub_id_is_served_under_its_own_name(tmp_path, monkeypatch):
    """The engine gets the cache path; clients keep seeing the model id."""
    from worker_vllm.config.settings import load_worker_settings
    from worker_vllm.startup import build as startup

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = lay_out_cache(tmp_path, "org/tiny", {"config.json": "{}"})
    env = {"MODEL_NAME": "org/tiny", "BASE_PATH": str(tmp_path),
           "BAKED_ARGS_FILE": str(tmp_path / "absent.json")}
    args = startup.serve_config(env, load_worker_settings(env)).args
    assert args.model == str(snapshot)
    assert args.served_model_name == ["org/tiny"]


FAKE_HUB = """
import sys, time
from pathlib import Path
sys.path.insert(0, {src!r})
from worker_vllm.model import loader as model_loader

class FakeApi:
    def __init__(self, token=None):
        pass
    def list_repo_files(self, name, revision=None):
        return ["config.json", "model.safetensors"]

def fake_snapshot_download(name, revision, token, cache_dir, allow_patterns,
                           local_files_only):
    snapshot = Path(cache_dir) / "models--org--big" / "snapshots" / "abc"
    weights = snapshot / "model.safetensors"
    if not weights.exists():  # what a real download does: fetch only what is missing
        with open({log!r}, "a") as log:
            log.write("download\\n")
        time.sleep(1.0)
        snapshot.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(b"x" * 1000)
    return str(snapshot)

model_loader.HfApi = FakeApi
model_loader.snapshot_download = fake_snapshot_download
print(model_loader.resolve("org/big", revision=None, token=None, base_path={base!r}))
"""


def test_two_workers_on_one_volume_download_a_model_once(tmp_path):
    """Both resolve the same model at once; the per-repository lock makes the second wait
    and find the snapshot complete (huggingface_hub's transfer is faked: no network here)."""
    import subprocess
    import sys

    from conftest import ROOT

    log = tmp_path / "downloads.log"
    code = FAKE_HUB.format(src=str(ROOT / "src"), log=str(log), base=str(tmp_path / "volume"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1] and outputs[0].endswith("snapshots/abc")
    assert log.read_text().splitlines() == ["download"]


# ----- RunPod's cached models: read-only, maybe lowercased, maybe without refs -------------
@pytest.fixture()
def no_network(monkeypatch):
    """Any call to the hub fails the test (there is no hub here either)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the hub was called")

    monkeypatch.setattr(model_loader, "HfApi", refuse)
    monkeypatch.setattr(model_loader, "snapshot_download", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def cached_model(base, folder: str, demo_model_dir, *, refs: bool = True,
                 commit: str = COMMIT):
    """A snapshot of the demo model under `folder`, laid out as RunPod's model cache does."""
    import shutil

    repo = model_loader.hf_cache_dir(str(base)) / folder
    snapshot = repo / "snapshots" / commit
    shutil.copytree(demo_model_dir, snapshot)
    if refs:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    return snapshot


def tree_state(path):
    return sorted((str(p), p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.mark.parametrize("folder,refs", [
    ("models--Org--Tiny-Chat-AWQ", True),   # exact case
    ("models--org--tiny-chat-awq", True),   # lowercased by the store
    ("models--Org--Tiny-Chat-AWQ", False),  # no refs/: the lone snapshot
    ("models--org--tiny-chat-awq", False),
])
def test_a_cached_model_resolves_without_the_hub_and_without_writing(
        tmp_path, demo_model_dir, no_network, folder, refs):
    """RunPod mounts cached models read-only: resolving one must write nothing (no lock, no
    directory; these tests run as root, so permission bits would prove nothing)."""
    snapshot = cached_model(tmp_path, folder, demo_model_dir, refs=refs)
    before = tree_state(tmp_path)
    path = resolve("Org/Tiny-Chat-AWQ", revision=None, token=None, base_path=str(tmp_path))
    assert path == snapshot
    assert tree_state(tmp_path) == before


def test_a_cached_model_at_a_named_revision(tmp_path, demo_model_dir, no_network):
    other = "f" * 40
    cached_model(tmp_path, "models--org--tiny", demo_model_dir)
    wanted = cached_model(tmp_path, "models--org--tiny-2", demo_model_dir, commit=other)
    assert resolve("org/tiny-2", revision=other, token=None, base_path=str(tmp_path)) == wanted


def test_an_incomplete_cached_snapshot_is_not_used(tmp_path, demo_model_dir, no_network):
    snapshot = cached_model(tmp_path, "models--org--tiny", demo_model_dir)
    for weights in snapshot.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="the hub was called"):  # it went to the hub
        resolve("org/tiny", revision=None, token=None, base_path=str(tmp_path))


def test_a_missing_model_where_the_cache_cannot_be_written_is_a_clear_error(tmp_path):
    base = tmp_path / "volume"
    base.write_text("a file where a directory should be")  # mkdir fails, as on a read-only fs
    with pytest.raises(ModelLoadError, match="org/absent.*cannot take a download"):
        resolve("org/absent", revision=None, token=None, base_path=str(base))


@pytest.mark.slow
def test_a_worker_serves_a_lowercased_cached_model_without_the_network(tmp_path,
                                                                       demo_model_dir):
    """A worker process, not offline, MODEL_NAME a hub id that only RunPod's (lowercased)
    model cache on the volume holds: it serves the model under its id and makes no
    connection (every HTTP(S) call would go through a proxy that counts them)."""
    import json

    from conftest import worker_env
    from processes import run_handler_online

    cached_model(tmp_path, "models--acme--tiny-chat-awq", demo_model_dir, refs=False)
    env = worker_env(MODEL_NAME="Acme/Tiny-Chat-AWQ", BASE_PATH=str(tmp_path),
                     BAKED_ARGS_FILE=str(tmp_path / "absent.json"), ENFORCE_EAGER="true",
                     KV_CACHE_MEMORY_BYTES=str(128 * 1024 * 1024))
    proc, connections = run_handler_online(
        env, "--test_input", json.dumps({"input": {"openai_route": "/v1/models"}}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["output"][0]["data"][0]["id"] == "Acme/Tiny-Chat-AWQ"
    assert connections == [], "the worker reached for the network"
