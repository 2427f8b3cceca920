"""Bake a model into the image at build time (run by the Dockerfile when MODEL_NAME is given).

Downloads MODEL_NAME (and TOKENIZER_NAME) with the worker's own loader, or copies a local
directory, into the directory of BAKED_ARGS_FILE (default /opt/worker-vllm, outside
/runpod-volume so a network volume cannot shadow it), then writes BAKED_ARGS_FILE: engine args
that win over env vars at run time. The model keeps its original name for clients.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from worker_vllm.config.settings import DEFAULT_BAKED_ARGS_FILE, is_unset  # noqa: E402
from worker_vllm.model import loader as model_loader  # noqa: E402

log = logging.getLogger("bake_model")
SECRET_FILE = Path("/run/secrets/HF_TOKEN")  # BuildKit secret mount; never an ARG or ENV


def _get(env: dict[str, str], name: str) -> str | None:
    value = env.get(name)
    return None if is_unset(value) else value


def _fetch(name: str, revision: str | None, token: str | None, root: Path,
           weights: bool) -> Path:
    local = Path(name).expanduser()
    if local.is_dir():
        target = root / "models" / local.resolve().name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(local, target)
        return target
    return model_loader.resolve(name, revision=revision, token=token, base_path=str(root),
                                weights=weights)


def bake(env: dict[str, str]) -> dict[str, Any]:
    model = _get(env, "MODEL_NAME")
    if model is None:
        raise SystemExit("MODEL_NAME is not set: nothing to bake")
    args_file = Path(_get(env, "BAKED_ARGS_FILE") or DEFAULT_BAKED_ARGS_FILE)
    root = args_file.parent
    root.mkdir(parents=True, exist_ok=True)
    token = _get(env, "HF_TOKEN") or (
        SECRET_FILE.read_text().strip() if SECRET_FILE.is_file() else None)

    baked: dict[str, Any] = {
        "model": str(_fetch(model, _get(env, "MODEL_REVISION"), token, root, weights=True)),
        "served_model_name": [_get(env, "SERVED_MODEL_NAME") or model],
    }
    tokenizer = _get(env, "TOKENIZER_NAME")
    if tokenizer:
        baked["tokenizer"] = str(
            _fetch(tokenizer, _get(env, "TOKENIZER_REVISION"), token, root, weights=False))
    quantization = _get(env, "QUANTIZATION")
    if quantization:
        baked["quantization"] = quantization
    args_file.write_text(json.dumps(baked, indent=2) + "\n")
    log.info("Baked %s into %s; args in %s", model, baked["model"], args_file)
    return baked


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bake(dict(os.environ))
