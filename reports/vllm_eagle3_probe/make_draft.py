"""Build a random-weight EAGLE-3 drafter folder for a local target, with speculators' own classes.

Run inside /work/vllm-venv (speculators==0.9.0):
    python make_draft.py TARGET_DIR OUT_DIR [--kv-heads N] [--head-dim D] [--draft-vocab V] [--layers 2,12,21]

Weights other than embed_tokens / lm_head (taken from the target by speculators' own
load_verifier_weights) are random: acceptance will be about zero; this only checks loading.
"""

import argparse
import collections
import json
import os
from pathlib import Path

import torch
from speculators.models.eagle3 import Eagle3DraftModel
from speculators.train.cli import create_transformer_layer_config
from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution
from transformers import AutoTokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("out")
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--draft-vocab", type=int, default=32000)
    p.add_argument("--layers", default=None, help="comma list of aux layer ids; default: speculators'")
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    torch.manual_seed(0)

    tl = create_transformer_layer_config(
        verifier_name_or_path=a.target,
        num_layers=1,
        draft_arch="llama",
        hidden_act=None,
        sliding_window=None,
        full_attention_indices=[0],
    )
    if a.kv_heads is not None:
        tl.num_key_value_heads = a.kv_heads
    if a.head_dim is not None:
        tl.head_dim = a.head_dim

    # Draft vocabulary: the most frequent target ids over some local text (python sources).
    tok = AutoTokenizer.from_pretrained(a.target)
    freq: collections.Counter = collections.Counter()
    src = Path(torch.__file__).parent
    for i, f in enumerate(sorted(src.rglob("*.py"))):
        if i >= 400:
            break
        freq.update(tok(f.read_text(errors="ignore"))["input_ids"])
    d2t, t2d = build_vocab_mappings_from_distribution(dict(freq), a.draft_vocab, tl.vocab_size)

    kwargs = dict(
        draft_vocab_size=a.draft_vocab,
        norm_before_residual=True,
        ttt_steps=a.ttt_steps,
        verifier_name_or_path=a.target,
        draft_attn_impl="sdpa",
    )
    if a.layers:
        kwargs["target_layer_ids"] = [int(x) for x in a.layers.split(",")]
    model = Eagle3DraftModel.from_training_args(verifier_config=tl, t2d=t2d, d2t=d2t, **kwargs)
    model = model.to(getattr(torch, a.dtype))
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out)
    print(json.dumps(json.load(open(os.path.join(a.out, "config.json"))), indent=1))
    from safetensors import safe_open

    for fn in sorted(os.listdir(a.out)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(a.out, fn), "pt") as f:
                for k in sorted(f.keys()):
                    t = f.get_slice(k)
                    print(fn, k, t.get_shape(), t.get_dtype())


if __name__ == "__main__":
    main()
