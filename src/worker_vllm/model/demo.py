"""The tiny smoke-test model: a byte-level BPE tokenizer and a seeded random-weight Llama.

It needs no network and is byte-identical on every build, so the local demo and the tests
can run a real vLLM engine anywhere. Its text is gibberish: it exercises the plumbing only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_MODEL_ID = "worker-vllm/tiny-demo-llama"
# Bump when the recipe changes so cached copies are rebuilt.
RECIPE_VERSION = "1"
VOCAB_SIZE = 2048
MAX_POSITION_EMBEDDINGS = 2048

# Engine defaults for the demo model: a tiny model wants no compilation and a small KV cache.
ENGINE_DEFAULTS: dict[str, object] = {
    "enforce_eager": True,
    "max_model_len": MAX_POSITION_EMBEDDINGS,
    "kv_cache_memory_bytes": 256 * 1024 * 1024,
}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def default_cache_dir() -> Path:
    base = os.environ.get("WORKER_VLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "worker-vllm"
    )
    return Path(base) / f"tiny-demo-llama-v{RECIPE_VERSION}"


def _training_files() -> list[str]:
    """Python's own standard library: local text that every machine has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))
    return files[:200]


def _build(target: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(_training_files(), trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )
    fast.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    fast.save_pretrained(target)


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo model directory, building it once (atomically) when missing."""
    target = cache_dir or default_cache_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("Building the tiny demo model in %s (one time, a few seconds)", target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "model"
        _build(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is identical.
            if not (target / "config.json").is_file():
                raise
    return target


def fingerprint(model_dir: Path) -> str:
    """SHA-256 over the model's files, to show the build is reproducible."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def demo_env(env: dict[str, str]) -> dict[str, str]:
    """Env that makes a worker serve the demo model (for a local endpoint's worker process)."""
    out = {"MODEL_NAME": str(ensure_demo_model()), "SERVED_MODEL_NAME": DEMO_MODEL_ID}
    for name, value in ENGINE_DEFAULTS.items():
        out[name.upper()] = json.dumps(value)
    return {k: v for k, v in out.items() if k not in env}
