"""The EAGLE-3 draft network: its forward against speculators' reference (the numeric proof of the export), its
training-time unroll against step-by-step decoding, export, and import of folders made by other trainers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_modules.errors import LLMModulesError
from llm_modules.models.eagle3_folder import (
    check_export,
    export_eagle3,
    load_eagle3,
    save_eagle3,
)

from ..helpers import eagle3_taps as taps_of
from ..helpers import tiny_eagle3 as tiny_drafter
from ..helpers import tiny_eagle3_target as tiny_target
from ..helpers import vllm_env, vllm_python

REFERENCE = Path(__file__).with_name("eagle3_reference.py")


def test_the_draft_vocabulary_maps_each_row_to_its_target_id():
    target = tiny_target()
    model = tiny_drafter(target)
    logits = torch.randn(2, model.config.draft_vocab_size)
    full = model.target_logits(logits)
    assert full.shape == (2, 100)
    assert torch.equal(full[:, 3:83:2], logits)
    assert torch.isinf(full[:, 4]).all() and bool(model.t2d[5]) and not bool(model.t2d[4])


@pytest.mark.parametrize("norm_before_residual", [False, True])
def test_the_training_unroll_equals_step_by_step_decoding_from_each_frontier(norm_before_residual):
    """Step j of the training-time test at p is what decoding computes j - 1 steps after the frontier p: the
    draft's cache over positions <= p, then its own fed-back outputs one position further each step."""
    target = tiny_target()
    model = tiny_drafter(target, norm_before_residual=norm_before_residual)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    fused = model.fuse(taps_of(target, ids, model.config.taps))  # (B, T, H)
    inputs = torch.cat([ids[:, 1:], ids[:, :1]], 1)  # the token at p + 1 sits at p
    positions = torch.arange(12).expand(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        outs = model.unroll(inputs, fused, positions, mask, steps=3)
        for p in (0, 4, 7):
            out, cache = model(inputs[:, : p + 1], fused[:, : p + 1], positions[:, : p + 1], mask[:, : p + 1])
            assert torch.allclose(out[:, p], outs[0][:, p], atol=1e-5)
            state = model.feedback(out[:, p:])
            for j in (1, 2):
                tok = inputs[:, p + j: p + j + 1]
                out, cache = model(tok, state, positions[:, :1] + p + j, mask[:, : p + 1 + j], cache)
                assert torch.allclose(out[:, 0], outs[j][:, p], atol=1e-5), (p, j)
                state = model.feedback(out)


def test_left_padding_leaves_a_rows_outputs_unchanged():
    target = tiny_target()
    model = tiny_drafter(target)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(5))
    fused = model.fuse(taps_of(target, ids, model.config.taps))
    with torch.no_grad():
        alone, _ = model(ids, fused, torch.arange(6)[None], torch.ones(1, 6))
        pad_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
        pad_fused = torch.cat([torch.randn(1, 3, fused.shape[-1]), fused], 1)
        positions = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.arange(6)[None]], 1)
        mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1)
        padded, _ = model(pad_ids, pad_fused, positions, mask)
    assert torch.allclose(padded[:, 3:], alone, atol=1e-5)


def test_our_folder_saves_and_loads_to_the_same_logits(tmp_path):
    target = tiny_target()
    model = tiny_drafter(target)
    save_eagle3(model, tmp_path / "d")
    assert "embed_tokens.weight" not in load_file(str(tmp_path / "d" / "model.safetensors"))  # the target's
    with pytest.raises(LLMModulesError, match="no embed_tokens"):
        load_eagle3(tmp_path / "d")
    again, _ = load_eagle3(tmp_path / "d", embeddings=target.get_input_embeddings().weight)
    x = torch.randn(1, 5, 3, 32)
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        a, _ = model(ids, model.fuse(x), torch.arange(5)[None], torch.ones(1, 5))
        b, _ = again(ids, again.fuse(x), torch.arange(5)[None], torch.ones(1, 5))
    assert torch.equal(model.head(a), again.head(b)) and torch.equal(model.d2t, again.d2t)


def _export(tmp_path, target, model, name="out"):
    target_dir = tmp_path / "target"
    if not target_dir.exists():
        target.save_pretrained(target_dir)
    save_eagle3(model, tmp_path / f"{name}_ours")
    return export_eagle3(tmp_path / f"{name}_ours", tmp_path / name, draft_tokens=3, verifier=str(target_dir),
                         embeddings=target.get_input_embeddings().weight)


def test_the_export_writes_every_tensor_vllm_loads_and_every_switch(tmp_path):
    target = tiny_target()
    out = _export(tmp_path, target, tiny_drafter(target, taps=[0, 2, 3, 5]))
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3, 5]
    assert config["transformer_layer_config"]["num_aux_hidden_states"] == 4  # vLLM sizes fc from it
    assert config["norm_before_residual"] is False and config["draft_vocab_size"] == 40
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["d2t"].dtype == torch.long and tensors["fc.weight"].shape == (32, 4 * 32)
    # a folder missing d2t: vLLM would load it silently; the check refuses it
    del tensors["d2t"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(LLMModulesError, match="missing \\['d2t'\\]"):
        check_export(out)


def test_a_plain_eagle_layout_folder_imports_with_the_targets_embedding(tmp_path):
    """EAGLE's own trainer writes `midlayer.*`, an eagle_config with the taps, and no embedding."""
    target = tiny_target()
    model = tiny_drafter(target, norm_before_residual=True)
    folder = tmp_path / "plain"
    folder.mkdir()
    c = model.config
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size, "rms_norm_eps": c.rms_norm_eps, "rope_theta": 10000.0,
        "num_hidden_layers": 1, "norm_before_residual": True,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": c.taps, "use_aux_hidden_state": True}}))
    state = {k.replace("layers.0.", "midlayer."): v for k, v in model.state_dict().items()
             if k not in ("embed_tokens.weight", "t2d")}
    save_file(state, str(folder / "model.safetensors"))
    again, k = load_eagle3(folder, embeddings=target.get_input_embeddings().weight)
    assert k is None and again.config.taps == c.taps and again.config.norm_before_residual
    x, ids = torch.randn(1, 4, 3, 32), torch.randint(0, 100, (1, 4))
    with torch.no_grad():
        a, _ = model(ids, model.fuse(x), torch.arange(4)[None], torch.ones(1, 4))
        b, _ = again(ids, again.fuse(x), torch.arange(4)[None], torch.ones(1, 4))
    assert torch.equal(a, b) and torch.equal(again.t2d, model.t2d)


def test_a_folder_without_d2t_and_a_smaller_head_is_refused(tmp_path):
    target = tiny_target()
    out = _export(tmp_path, target, tiny_drafter(target))
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["d2t"], tensors["t2d"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(LLMModulesError, match="holds no d2t"):
        load_eagle3(out)


@pytest.mark.vllm
@pytest.mark.subprocess
@pytest.mark.parametrize("norm_before_residual", [False, True])
def test_our_draft_logits_equal_speculators_forward_over_the_exported_folder(tmp_path, norm_before_residual):
    """The numeric proof: the exported folder loaded by speculators' Eagle3DraftModel (float32) gives our logits
    to 1e-5, at the first draft step over every position and at training-time-test steps 2 and 3."""
    python = vllm_python()
    target = tiny_target()
    model = tiny_drafter(target, norm_before_residual=norm_before_residual)
    out = _export(tmp_path, target, model)
    t = 10
    ids = torch.randint(0, 100, (1, t), generator=torch.Generator().manual_seed(6))
    taps = taps_of(target, ids, model.config.taps)  # (1, T, 3, 32)
    inputs = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    positions = torch.arange(t)[None]
    save_file({"taps": taps.flatten(-2).contiguous(), "input_ids": inputs, "positions": positions},
              str(tmp_path / "inputs.safetensors"))
    done = subprocess.run([str(python), str(REFERENCE), "forward", str(out), str(tmp_path / "inputs.safetensors"),
                           str(tmp_path / "ref.safetensors"), "3"], capture_output=True, text=True, env=vllm_env(),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = load_file(str(tmp_path / "ref.safetensors"))
    with torch.no_grad():
        outs = model.unroll(inputs, model.fuse(taps), positions, torch.ones(1, t), steps=3)
        first, _ = model(inputs, model.fuse(taps), positions, torch.ones(1, t))
    worst = 0.0
    diff = (model.head(first) - ref["logits_0"]).abs().max().item()
    worst = max(worst, diff)
    for j in range(3):
        valid = t - j  # speculators pads the shifted tokens with id 0 past the end
        diff = (model.head(outs[j])[:, :valid] - ref[f"logits_{j}"][:, :valid]).abs().max().item()
        worst = max(worst, diff)
    print(f"max |ours - speculators| over 3 steps: {worst:.3g}")
    assert worst < 1e-5


def test_the_export_command_writes_the_folder_with_the_targets_embedding(tmp_path, capsys):
    from llm_modules.entrypoints.cli import main

    target = tiny_target()
    target.save_pretrained(tmp_path / "target")
    model = tiny_drafter(target)
    model.config.target = str(tmp_path / "target")
    save_eagle3(model, tmp_path / "ours")
    assert main(["export", str(tmp_path / "ours"), "--format", "eagle3", str(tmp_path / "out")]) == 0
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(tensors["embed_tokens.weight"], target.get_input_embeddings().weight)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(tmp_path / "target")
    assert main(["export", str(tmp_path / "ours"), "--format", "eagle3", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda c: c["transformer_layer_config"].update(model_type="qwen3"), "Llama layer only"),
    (lambda c: c["transformer_layer_config"].update(layer_types=["sliding_attention"]), "full attention only"),
    (lambda c: c["transformer_layer_config"].update(num_hidden_layers=2), "one-layer layout only"),
    (lambda c: c["transformer_layer_config"].update(num_aux_hidden_states=4), "num_aux_hidden_states 4"),
])
def test_folders_of_layouts_this_engine_does_not_run_are_refused_by_name(tmp_path, change, message):
    target = tiny_target()
    out = _export(tmp_path, target, tiny_drafter(target))
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LLMModulesError, match=message):
        load_eagle3(out)
