"""Session fixtures: tiny random models of several families saved as folders, for fast offline tests.

The builders live in helpers.py, which test modules import; this file only holds the fixtures."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from .helpers import TINY, build_mapped_pair, gpt2_tokenizer


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


@pytest.fixture(scope="session")
def tiny_pair_with_tokenizer(tmp_path_factory) -> dict[str, str]:
    """A tiny large model over GPT-2's vocabulary WITH tokenizer files, and a tiny small model."""
    root = tmp_path_factory.mktemp("tiny_pair")
    torch.manual_seed(7)
    large = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=50257, max_position_embeddings=1024, tie_word_embeddings=True,
    ))
    large.save_pretrained(root / "large")
    gpt2_tokenizer().save_pretrained(root / "large")
    small = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=64, vocab_size=90, max_position_embeddings=1024,
    ))
    small.save_pretrained(root / "small")
    return {"large": str(root / "large"), "small": str(root / "small")}


@pytest.fixture(scope="module")
def mapped_pair(tmp_path_factory) -> dict[str, str]:
    """A 4-layer Qwen2 large and a 2-layer Llama small, each with its OWN byte-level BPE tokenizer."""
    return build_mapped_pair(tmp_path_factory.mktemp("mapped_pair"))
