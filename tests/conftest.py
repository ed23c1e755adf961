"""Tiny random models of several families, saved as folders (no tokenizer files), for fast offline tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=120, max_position_embeddings=256, tie_word_embeddings=True,
    )),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=64, vocab_size=90, max_position_embeddings=256,
    )),
    "gpt_neo": lambda: GPTNeoForCausalLM(GPTNeoConfig(
        hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=8, max_position_embeddings=64, vocab_size=80, intermediate_size=64,
    )),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=70)),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """{family: folder} of tiny randomly initialised causal LMs with fixed seeds."""
    root = tmp_path_factory.mktemp("tiny_models")
    folders = {}
    for i, (family, build) in enumerate(TINY.items()):
        torch.manual_seed(100 + i)
        model = build()
        folder = root / family
        model.save_pretrained(folder)
        folders[family] = str(folder)
    return folders
