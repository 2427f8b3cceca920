"""The demo model is reproducible: a second build is byte-identical to the cached one."""

from __future__ import annotations

import pytest

from worker_vllm.model.demo import ensure_demo_model, fingerprint

pytestmark = pytest.mark.slow


def test_demo_model_builds_byte_identical(tmp_path, demo_model_dir):
    rebuilt = ensure_demo_model(tmp_path / "model")
    assert rebuilt != demo_model_dir
    assert sorted(p.name for p in rebuilt.iterdir()) == sorted(
        p.name for p in demo_model_dir.iterdir())
    assert fingerprint(rebuilt) == fingerprint(demo_model_dir)


def test_demo_model_has_chat_template_and_special_tokens(demo_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"
