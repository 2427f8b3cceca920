"""A tiny random-weight Gemma 2 with the demo model's tokenizer: one sliding-window layer and one
full-attention layer, so vLLM keeps two KV-cache groups in one block pool (as for Gemma 2/3 and
gpt-oss). Built like the demo model: seeded, no network, a few seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

SLIDING_WINDOW = 64


def build_sliding_model(target: Path, demo_model: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from worker_vllm.model.demo import MAX_POSITION_EMBEDDINGS, VOCAB_SIZE

    config = Gemma2Config(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS, sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32,
        attn_logit_softcapping=None, final_logit_softcapping=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="float32")
    torch.manual_seed(0)
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    Gemma2ForCausalLM(config).to(torch.float32).save_pretrained(staging,
                                                                 safe_serialization=True)
    for path in demo_model.iterdir():  # the tokenizer and its chat template
        if path.name not in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(path, staging / path.name)
    staging.rename(target)
    return target
