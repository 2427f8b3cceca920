"""Checks run inside the GPU image's Python set, for scripts/check_image_env.sh (not the tests'
virtualenv): every worker module imports against the CUDA build, and the deploy forms'
untouched values give the engine what that build's `vllm serve --model X` would.

    python scripts/image_env_check.py imports
    python scripts/image_env_check.py forms MODEL_DIR
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# Deliberate differences from `vllm serve` on a machine without a GPU (docs/configuration.md).
DELIBERATE = {"dtype"}


def imports() -> int:
    import worker_vllm

    names = [m.name for m in pkgutil.walk_packages(worker_vllm.__path__, "worker_vllm.")]
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # every failure is reported, not only the first
            failed[name] = f"{type(exc).__name__}: {exc}"
    print(f"imports: {len(names) - len(failed)} of {len(names)} worker modules import")
    for name, error in failed.items():
        print(f"  {name}: {error}")
    return 1 if failed else 0


def forms(model_dir: str) -> int:
    from generate_deploy_files import form_values

    from worker_vllm.config.serve_env import LB_SERVER_FLAGS
    from worker_vllm.config.settings import load_worker_settings
    from worker_vllm.engine import parse_serve_args
    from worker_vllm.startup.build import serve_config

    reference = parse_serve_args(["--model", model_dir])
    code = 0
    lb = ROOT / ".runpod" / "lb"
    for path in (ROOT / "worker-config.json", ROOT / ".runpod" / "hub.json",
                 lb / "worker-config.json", lb / "hub.json"):
        env = {**os.environ, **form_values(path), "MODEL_NAME": model_dir,
               "BAKED_ARGS_FILE": str(Path(model_dir) / "no-baked-args.json")}
        server = LB_SERVER_FLAGS if env.get("ENDPOINT_TYPE") == "lb" else frozenset()
        args = serve_config(env, load_worker_settings(env), server=server).args
        differ = sorted(k for k, v in vars(reference).items() if repr(getattr(args, k, None))
                        != repr(v))
        ok = set(differ) == DELIBERATE
        code |= 0 if ok else 1
        print(f"forms: {path.relative_to(ROOT)} untouched: differs from `vllm serve --model X` "
              f"in {differ} ({'as intended' if ok else 'UNEXPECTED'})")
    return code


if __name__ == "__main__":
    command = sys.argv[1]
    sys.exit(imports() if command == "imports" else forms(sys.argv[2]))
