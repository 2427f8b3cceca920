"""A tiny random-weight BLIP-2 (a vision encoder, a Q-Former and an OPT decoder) with the demo
model's tokenizer: a multimodal model that vLLM's CPU build serves. Each image becomes
`IMAGE_TOKENS` prompt tokens. (LLaVA, PaliGemma, Qwen2-VL and the like need torchvision in vLLM
0.32, which its CPU build does not bring.) Built like the demo model: seeded, no network."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

IMAGE_TOKENS = 8


def build_multimodal_model(target: Path, demo_model: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast.from_pretrained(demo_model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, encoder_hidden_size=32)
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128,
                     num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=64,
                     max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text.to_dict(), num_query_tokens=IMAGE_TOKENS,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    Blip2ForConditionalGeneration(config).to(torch.float32).save_pretrained(
        staging, safe_serialization=True)
    processor = Blip2Processor(image_processor=BlipImageProcessor(
        size={"height": 32, "width": 32}), tokenizer=tokenizer, num_query_tokens=IMAGE_TOKENS)
    processor.save_pretrained(staging)
    staging.rename(target)
    return target


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def data_url(color: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(color)).decode()
