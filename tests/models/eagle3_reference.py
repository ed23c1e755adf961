"""The reference side of tests/models/test_eagle3.py and tests/decoding/test_eagle3_proposer.py: `speculators`'
own EAGLE-3 classes, run in the venv that holds vLLM's CPU build and speculators (LLM_MODULES_VLLM_VENV), never
in ours. Not a test module: the tests start it as a subprocess.

    python eagle3_reference.py forward EXPORTED_DIR INPUTS.safetensors OUT.safetensors STEPS
    python eagle3_reference.py build TARGET_DIR OUT_DIR DRAFT_VOCAB

forward: INPUTS holds `taps` (1, T, n x T_hidden) in ascending tap order, `input_ids` (1, T) (the token at p + 1
at p) and `positions` (1, T); OUT gets `logits_{j}` (1, T, Vd), the draft head's logits at training-time-test
step j (step 0 = the first draft from the target's taps), captured from lm_head while `Eagle3DraftModel` runs.
build: a randomly initialised drafter for TARGET_DIR made by speculators' trainer classes (another trainer's
folder, as a user would bring it): default taps, its draft vocabulary the DRAFT_VOCAB lowest ids.
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
from speculators.version import version


def forward(folder: str, inputs: str, out: str, steps: int) -> None:
    config = Eagle3SpeculatorConfig.from_pretrained(folder)
    config.transformer_layer_config._attn_implementation = "eager"  # flex attention needs compiling on a CPU
    model = Eagle3DraftModel.from_pretrained(folder, config=config).float().eval()
    x = load_file(inputs)
    captured = []
    model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output.detach().clone()))
    with torch.no_grad():
        model(hidden_states=x["taps"].float(), input_ids=x["input_ids"], document_ids=torch.zeros_like(x["input_ids"]),
              position_ids=x["positions"], ttt_steps=steps)
    save_file({f"logits_{j}": t.contiguous() for j, t in enumerate(captured)}, out, metadata={"speculators": version})


def build(target: str, out: str, draft_vocab: int) -> None:
    from speculators.train.cli import create_transformer_layer_config
    from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution

    torch.manual_seed(0)
    layer = create_transformer_layer_config(verifier_name_or_path=target, num_layers=1, draft_arch="llama",
                                            hidden_act=None, sliding_window=None, full_attention_indices=[0])
    d2t, t2d = build_vocab_mappings_from_distribution({i: 1000 - i for i in range(draft_vocab)}, draft_vocab,
                                                      layer.vocab_size)
    model = Eagle3DraftModel.from_training_args(verifier_config=layer, t2d=t2d, d2t=d2t, draft_vocab_size=draft_vocab,
                                                norm_before_residual=True, ttt_steps=3, verifier_name_or_path=target,
                                                draft_attn_impl="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and name != "embed_tokens.weight":
                p.normal_(0, 0.1)
    model.save_pretrained(out)


if __name__ == "__main__":
    if sys.argv[1] == "forward":
        forward(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        build(sys.argv[2], sys.argv[3], int(sys.argv[4]))
