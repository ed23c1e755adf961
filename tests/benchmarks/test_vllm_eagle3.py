"""benchmarks/vllm_eagle3.py: its reading of vLLM's /metrics, and (marked, slow) vLLM's CPU build serving a tiny
target alone and with our exported EAGLE-3 drafter, greedy, on one prompt: the same text, drafts made; our engine
with the same folder gives that text too."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ..helpers import REPO, byte_bpe, tiny_eagle3, vllm_python

SCRIPT = REPO / "benchmarks" / "vllm_eagle3.py"


def load_script():
    spec = importlib.util.spec_from_file_location("vllm_eagle3", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_speculative_counters_are_summed_over_label_sets():
    script = load_script()
    text = "\n".join([
        "# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.",
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="target"} 12.0',
        'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="target"} 36.0',
        'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="target"} 30.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="0"} 12.0',
        'vllm:spec_decode_num_drafts_total{engine="1",model_name="target"} 4.0',
    ])
    assert script.spec_counters(text) == {"drafts": 16.0, "draft_tokens": 36.0, "accepted": 30.0}
    assert script.spec_counters("") == {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0}
    assert script.speculative_config("eagle3", "/d", 3) == {"method": "eagle3", "model": "/d",
                                                            "num_speculative_tokens": 3}


@pytest.mark.vllm
@pytest.mark.subprocess
def test_vllm_serves_our_exported_drafter_with_its_own_greedy_text(tmp_path):
    from llm_modules.models.eagle3_folder import export_eagle3, save_eagle3

    vllm_python()  # skips without the vLLM venv
    corpus = [f"What is {a} plus {b}? {a} plus {b} is {a + b}." for a in range(10) for b in range(10)]
    tok = byte_bpe(300, corpus)
    torch.manual_seed(0)
    target = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=128, num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
        vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False)).eval()
    target.save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    drafter = tiny_eagle3(target, draft_vocab=64)
    save_eagle3(drafter, tmp_path / "ours")
    export_eagle3(tmp_path / "ours", tmp_path / "out", draft_tokens=3, verifier=str(tmp_path / "target"),
                  embeddings=target.get_input_embeddings().weight)
    done = subprocess.run([sys.executable, str(SCRIPT), "--target", str(tmp_path / "target"), "--drafter",
                           str(tmp_path / "out"), "--k", "3", "--prompt", "What is 3 plus 4?", "--max-tokens", "8",
                           "--modes", "alone,eagle3,ours", "--dtype", "float32", "--max-model-len", "256",
                           "--json", str(tmp_path / "report.json")], capture_output=True, text=True, timeout=1500,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    alone, eagle3, ours = report["runs"]
    assert report["vllm"] == "0.32.0"
    assert len(alone["answers"][0]["token_ids"]) == 8
    assert eagle3["tokens_equal_alone"] and eagle3["texts_equal_alone"], (alone["answers"], eagle3["answers"])
    assert ours["tokens_equal_alone"] and ours["passes"] > 0, (alone["answers"], ours["answers"])
    assert eagle3["drafts"] > 0 and eagle3["draft_tokens"] == 3 * eagle3["drafts"]
    assert "Using auxiliary layers from speculative config: (2, 4, 5)" in open(eagle3["log"]).read()
