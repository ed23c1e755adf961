"""Write a random-weight EAGLE-3 folder by hand in the plain (non-speculators) layout vLLM also reads:
config.json with architectures ["LlamaForCausalLMEagle3"] + eagle_config, weights named as EAGLE's own
trainer names them (midlayer.*), a draft narrower than the target (target_hidden_size), its own
embed_tokens, a pruned draft vocabulary with d2t.

    python make_plain_eagle3.py TARGET_DIR OUT_DIR [--hidden 512] [--heads 8] [--kv-heads 4] [--head-dim 64]
        [--layers 3,12,24] [--draft-vocab 32000]
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--layers", default="3,12,24")
    p.add_argument("--draft-vocab", type=int, default=32000)
    p.add_argument("--norm-before-residual", action="store_true")
    a = p.parse_args()
    tgt = json.load(open(os.path.join(a.target, "config.json")))
    T, V, H = tgt["hidden_size"], tgt["vocab_size"], a.hidden
    layer_ids = [int(x) for x in a.layers.split(",")]
    n_aux = len(layer_ids)
    rope = tgt.get("rope_parameters") or {"rope_type": "default", "rope_theta": tgt.get("rope_theta", 10000.0)}
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": H,
        "intermediate_size": a.inter,
        "num_hidden_layers": 1,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": tgt["rms_norm_eps"],
        "max_position_embeddings": tgt["max_position_embeddings"],
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
        "vocab_size": V,
        "draft_vocab_size": a.draft_vocab,
        "target_hidden_size": T,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "norm_before_residual": a.norm_before_residual,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": layer_ids, "use_aux_hidden_state": True},
        "torch_dtype": "bfloat16",
    }
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    qo, kvo = a.heads * a.head_dim, a.kv_heads * a.head_dim
    d2t = torch.arange(0, 2 * a.draft_vocab, 2, dtype=torch.long) - torch.arange(a.draft_vocab)  # every 2nd id
    t = {
        "embed_tokens.weight": w(V, H),
        "fc.weight": w(H, n_aux * T),
        "midlayer.hidden_norm.weight": torch.ones(H, dtype=torch.bfloat16),
        "midlayer.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        "midlayer.post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        "midlayer.self_attn.q_proj.weight": w(qo, 2 * H),
        "midlayer.self_attn.k_proj.weight": w(kvo, 2 * H),
        "midlayer.self_attn.v_proj.weight": w(kvo, 2 * H),
        "midlayer.self_attn.o_proj.weight": w(H, qo),
        "midlayer.mlp.gate_proj.weight": w(a.inter, H),
        "midlayer.mlp.up_proj.weight": w(a.inter, H),
        "midlayer.mlp.down_proj.weight": w(H, a.inter),
        "norm.weight": torch.ones(H, dtype=torch.bfloat16),
        "lm_head.weight": w(a.draft_vocab, H),
        "d2t": d2t,
    }
    os.makedirs(a.out, exist_ok=True)
    save_file(t, os.path.join(a.out, "model.safetensors"))
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=1)
    for k, v in t.items():
        print(k, list(v.shape), v.dtype)


if __name__ == "__main__":
    main()
