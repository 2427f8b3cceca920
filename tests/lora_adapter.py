"""A tiny PEFT LoRA adapter with the demo model's shapes (random, so it changes the output)."""

from __future__ import annotations

import json
from pathlib import Path


def build_lora_adapter(target: Path, base_model: Path, rank: int = 8, seed: int = 1) -> Path:
    import torch
    from safetensors.torch import save_file

    config = json.loads((base_model / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = hidden // config["num_attention_heads"]
    out_dims = {"q_proj": hidden, "v_proj": config["num_key_value_heads"] * head_dim}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out_dim in out_dims.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=generator)
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    (target / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": list(out_dims),
        "base_model_name_or_path": str(base_model), "fan_in_fan_out": False,
    }))
    return target
