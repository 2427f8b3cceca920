"""vLLM's internal API moves between releases: only the engine package may import vLLM."""

from __future__ import annotations

import ast
import os

from conftest import ROOT

ENGINE_PACKAGE = ROOT / "src" / "worker_vllm" / "engine"


def vllm_imports(path) -> list[str]:  # type: ignore[no-untyped-def]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "vllm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "vllm":
            found.append(node.module)
    return found


def test_only_the_engine_package_imports_vllm():
    files = [p for d in ("src", "builder", "scripts", "benchmarks")
             for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 10
    outside = {str(p.relative_to(ROOT)): vllm_imports(p) for p in files
               if ENGINE_PACKAGE not in p.parents}
    assert not {path: names for path, names in outside.items() if names}


def test_the_check_sees_imports(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom vllm.v1 import engine\nimport vllm\ndef f():\n"
                      "    from vllm.sampling_params import SamplingParams\n")
    assert vllm_imports(sample) == ["vllm.v1", "vllm", "vllm.sampling_params"]
    assert vllm_imports(ENGINE_PACKAGE / "runner.py")


async def test_the_engine_is_built_as_vllm_serve_builds_it(monkeypatch):
    """vLLM picks max_num_seqs and max_num_batched_tokens by usage context and device: as an
    API server an H100 runs 1024 sequences at once; an engine built with the default context
    would get 128 on every GPU. The CPU's defaults do not tell them apart, so the call is
    checked."""
    from vllm import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    from worker_vllm.engine import runner
    from worker_vllm.engine.load import EngineLoads, LoadFeed

    seen: dict = {}
    monkeypatch.setattr(runner.AsyncLLMEngine, "from_engine_args",
                        lambda args, **kwargs: seen.update(kwargs))
    await runner.EngineRunner._build(AsyncEngineArgs(model="m"),
                                     runner._engine_kwargs(LoadFeed(EngineLoads())))
    assert seen["usage_context"] == UsageContext.OPENAI_API_SERVER
    defaults = AsyncEngineArgs.get_batch_defaults(1)
    assert UsageContext.OPENAI_API_SERVER in defaults[1]
    assert UsageContext.ENGINE_CONTEXT not in defaults[1]


def test_freezing_vllms_env_turns_on_vllms_own_cache():
    """`freeze_vllm_env` (a serving process, once started) makes vLLM read each variable once:
    a change after it is not seen. In a process of its own: the test session's env stays live."""
    import subprocess
    import sys

    code = ("import os\n"
            "from vllm import envs\n"
            "from worker_vllm.engine import freeze_vllm_env\n"
            "assert not envs._is_envs_cache_enabled()\n"
            "freeze_vllm_env()\n"
            "assert envs._is_envs_cache_enabled()\n"
            "before = envs.VLLM_COMPUTE_NANS_IN_LOGITS\n"
            "os.environ['VLLM_COMPUTE_NANS_IN_LOGITS'] = str(int(not before))\n"
            "assert envs.VLLM_COMPUTE_NANS_IN_LOGITS == before\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
    assert done.returncode == 0, done.stderr
