"""The reference EAGLE-3 forward for tests/models/test_eagle3.py: `speculators`' own `Eagle3DraftModel` over an
exported folder, run in the venv that holds vLLM's CPU build and speculators (LLM_MODULES_VLLM_VENV), never in
ours. Not a test module: the test starts it as a subprocess.

    python eagle3_reference.py EXPORTED_DIR INPUTS.safetensors OUT.safetensors STEPS

INPUTS holds `taps` (1, T, n x T_hidden) in ascending tap order, `input_ids` (1, T) (the token at p + 1 at p)
and `positions` (1, T). OUT holds `logits_{j}` (1, T, Vd): the draft head's logits at training-time-test step j
(step 0 = the first draft from the target's taps), captured from lm_head while speculators' forward runs.
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
from speculators.version import version


def main() -> None:
    folder, inputs, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    config = Eagle3SpeculatorConfig.from_pretrained(folder)
    config.transformer_layer_config._attn_implementation = "eager"  # flex attention needs compiling on a CPU
    model = Eagle3DraftModel.from_pretrained(folder, config=config).float().eval()
    x = load_file(inputs)
    captured = []
    model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output.detach().clone()))
    with torch.no_grad():
        model(hidden_states=x["taps"].float(), input_ids=x["input_ids"], document_ids=torch.zeros_like(x["input_ids"]),
              position_ids=x["positions"], ttt_steps=steps)
    save_file({f"logits_{j}": t.contiguous() for j, t in enumerate(captured)}, out,
              metadata={"speculators": version})


if __name__ == "__main__":
    main()
