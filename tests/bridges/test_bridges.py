"""Every bridge x small-inputs combination on tiny models: causal, cached decoding exact with left
padding, save/load identical, large model frozen, trainable parameters counted by hand; the small
side starts as the pretrained small model; old folders still load; hooks per small-model family."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llm_modules import LLMModulesModel
from llm_modules.errors import LLMModulesError
from llm_modules.models.compose_config import CONFIG_FORMAT, ComposeConfig
from llm_modules.models.saved import CONFIG_FILE, WEIGHTS_FILE
from llm_modules.tensors import positions_from_mask

from ..helpers import (
    COMBOS,
    FIXTURES,
    LARGE_DIM,
    OPTIONS,
    SMALL_DIM,
    assert_causal,
    random_ids,
)
from ..helpers import compose_pair as compose
from ..helpers import nudge_gates as nudge


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("bridge,inputs", COMBOS)
def test_no_logit_reads_later_tokens(mapped_pair, bridge, inputs):
    model = compose(mapped_pair, bridge, inputs, head="new")
    nudge(model)
    assert_causal(model)


@pytest.mark.parametrize("bridge,inputs", COMBOS)
def test_cached_decoding_equals_full_recompute_with_left_padding(mapped_pair, bridge, inputs):
    model = compose(mapped_pair, bridge, inputs)
    nudge(model)
    short, long_ = random_ids(model, 1, 5, seed=5), random_ids(model, 1, 9, seed=6)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long_])  # (2, 9) left-padded
    mask = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(short)], 1),
                      torch.ones_like(long_)])
    full = model(input_ids=ids, attention_mask=mask).logits  # (2, 9, V)
    with torch.no_grad():  # prefix of 6, then one token at a time through the caches
        out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], cache=model.new_cache())
        steps = [out.logits]
        for t in range(6, 9):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=out.cache)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()], rtol=1e-5, atol=1e-5)
    cached = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    recomputed = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[], use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("bridge,inputs", COMBOS)
def test_save_load_round_trip_gives_identical_logits(mapped_pair, tmp_path, bridge, inputs):
    model = compose(mapped_pair, bridge, inputs)
    nudge(model)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert not any(k.startswith("large.") for k in saved)
    assert ("vocab_map.offsets" in saved) == (inputs == "mapped")
    assert not any("embed_tokens" in k for k in saved)  # a stub, or pretrained and frozen: from the spec
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["bridge"] == bridge and config["small_inputs"] == inputs and config["format_version"] == CONFIG_FORMAT
    assert all(config["bridge_options"][k] == v for k, v in OPTIONS[bridge].items())
    torch.manual_seed(123)  # a different random init must not matter
    loaded = LLMModulesModel.from_pretrained(tmp_path).eval()
    ids = random_ids(model, 2, 11)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def tap_input(large: int, small: int) -> int:
    return 2 * large + large * small + small  # LayerNorm(dL) + Linear(dL, dS)


def expected_bridge_parameters(bridge: str, inputs: str) -> int:
    """Counted from the shapes each bridge's docstring describes, for dL = 48, dS = 32."""
    dl, ds = LARGE_DIM, SMALL_DIM
    provide = tap_input(dl, ds) if inputs == "bridge" else 0
    if bridge == "eca":
        mid, adapter = (dl + ds) // 2, 256
        layer = (2 * dl + 2 * ds + (ds * ds + ds) + 2 * (dl * ds + ds) + (ds * ds + ds)
                 + (ds * adapter + adapter) + (adapter * ds + ds) + 2 * ds + (2 * ds * ds + ds))
        return (dl * dl + dl) + (dl * ds + ds) + (dl * mid + mid + 2 * mid + mid * ds + ds + 2 * ds) + 2 * layer
    if bridge == "ladder":
        return 2 * (tap_input(dl, ds) + 1) + provide  # two taps, each with its gate
    block = 2 * ds + 2 * dl + (ds * ds + ds) + 2 * (dl * ds + ds) + (ds * ds + ds) + 1
    return 2 * block + provide  # small_stride=1: a block after each of the 2 small layers


# Llama small (dS 32, 4 heads, 1 KV head of 8, MLP 64, 2 layers): q, k, v, o, gate/up/down, 2 norms; final norm.
SMALL_LAYERS_PARAMETERS = 2 * (32 * 32 + 2 * 32 * 8 + 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32


@pytest.mark.parametrize("train_embeddings", [False, True])
@pytest.mark.parametrize("bridge,inputs", COMBOS)
def test_training_step_keeps_large_frozen_and_trains_the_counted_parameters(mapped_pair, bridge, inputs,
                                                                             train_embeddings):
    if train_embeddings and inputs == "bridge":
        with pytest.raises(LLMModulesError, match="train_embeddings"):
            compose(mapped_pair, bridge, inputs, train_embeddings=True)
        return
    # the projected head: the residual head's zero start would hold back every other gradient at step 1
    model = compose(mapped_pair, bridge, inputs, head="projected", train_embeddings=train_embeddings).train()
    counts = model.parameter_counts()
    small_vocab = model.small.get_input_embeddings().weight.shape[0]
    assert counts["bridge"]["trainable"] == expected_bridge_parameters(bridge, inputs)
    assert counts["small"]["trainable"] == SMALL_LAYERS_PARAMETERS + (small_vocab * SMALL_DIM if train_embeddings else 0)
    assert counts["head"]["trainable"] == SMALL_DIM * LARGE_DIM  # Linear(dS, dL), no bias
    assert counts["large"]["trainable"] == 0

    large_before = {k: v.clone() for k, v in model.large.state_dict().items()}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(model, 2, 10)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.large.parameters())
    assert all(p.grad is not None for p in model.bridge.parameters())
    optimizer.step()
    assert all(torch.equal(v, model.large.state_dict()[k]) for k, v in large_before.items())
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trained_before[n])}
    gates = {n for n in trained_before if "alpha" in n}
    assert gates <= moved  # zero-started gates get a gradient from the first step
    embeddings = "small." + next(n for n, m in model.small.named_modules() if m is model.small.get_input_embeddings())
    assert (embeddings + ".weight" in moved) == train_embeddings
    if train_embeddings:  # trained embeddings are saved
        assert embeddings + ".weight" in model.trained_state_dict()


@pytest.mark.parametrize("bridge,inputs", COMBOS)
def test_a_frozen_small_model_trains_only_the_bridge_and_head_and_saves_only_them(mapped_pair, tmp_path, bridge,
                                                                                   inputs):
    model = compose(mapped_pair, bridge, inputs, head="projected", train_small=False).train()
    counts = model.parameter_counts()
    assert counts["small"]["trainable"] == 0 and counts["large"]["trainable"] == 0
    assert counts["bridge"]["trainable"] == expected_bridge_parameters(bridge, inputs)
    assert counts["head"]["trainable"] == SMALL_DIM * LARGE_DIM

    small_before = {k: v.clone() for k, v in model.small.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(model, 2, 10)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.small.parameters())
    assert all(p.grad is not None for p in model.bridge.parameters())  # through the frozen small layers
    optimizer.step()
    assert all(torch.equal(v, model.small.state_dict()[k]) for k, v in small_before.items())

    model.eval().save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert not any(k.startswith(("small.", "large.")) for k in saved)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["train_small"] is False
    torch.manual_seed(123)
    loaded = LLMModulesModel.from_pretrained(tmp_path).eval()
    assert not any(p.requires_grad for p in loaded.small.parameters())
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_frozen_small_layers_inside_a_wrapper_are_still_left_out_of_the_saved_weights(mapped_pair):
    """FSDP's auto-wrap (and activation checkpointing) wraps each decoder layer in place: their
    parameters' names gain a segment that the state dict's keys do not have. Found on a GPU: FSDP
    with --no-train-small saved every frozen small-model layer. The checkpoint wrapper adds the same
    kind of segment on a CPU."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    model = compose(mapped_pair, "ladder", "mapped", head="projected", train_small=False)
    expected = set(model.trained_state_dict())
    layers = model.small.layers
    for i in range(len(layers)):
        layers[i] = checkpoint_wrapper(layers[i])
    assert any("_checkpoint_wrapped_module." in n for n, _ in model.small.named_parameters())
    assert set(model.trained_state_dict()) == expected
    assert not any(k.startswith("small.") for k in expected)


def test_a_frozen_small_model_can_still_train_its_mapped_embeddings(mapped_pair):
    model = compose(mapped_pair, "ladder", "mapped", train_small=False, train_embeddings=True)
    small_vocab = model.small.get_input_embeddings().weight.shape[0]
    assert model.parameter_counts()["small"]["trainable"] == small_vocab * SMALL_DIM
    assert set(k for k in model.trained_state_dict() if k.startswith("small.")) == {
        "small." + n for n, p in model.small.named_parameters() if p.requires_grad}
    with pytest.raises(LLMModulesError, match="train_small must be true or false"):
        compose(mapped_pair, "ladder", "mapped", train_small="no")


# ---------------------------------------------------------------------------------------------- mapped inputs
@pytest.mark.parametrize("bridge", ["ladder", "xattn"])
def test_zero_gates_start_as_the_pretrained_small_model_on_mapped_embeddings(mapped_pair, bridge):
    from transformers import AutoModelForCausalLM

    model = compose(mapped_pair, bridge, "mapped")
    seen = {}
    model.small.register_forward_hook(lambda m, a, out: seen.update(h=out.last_hidden_state))
    ids = random_ids(model, 2, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding changes nothing either
    model(input_ids=ids, attention_mask=mask)
    plain = AutoModelForCausalLM.from_pretrained(mapped_pair["small"]).model.eval()
    with torch.no_grad():
        embeds = model.vocab_map(ids, plain.get_input_embeddings().weight)  # (B, T, dS)
        expected = plain(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask))
    torch.testing.assert_close(seen["h"], expected.last_hidden_state, rtol=0, atol=1e-6)
    nudge(model)  # open gates: the bridge now changes the small model's states
    model(input_ids=ids, attention_mask=mask)
    assert (seen["h"] - expected.last_hidden_state).abs().max() > 1e-3


def test_mapped_embeddings_average_the_small_tokenizers_pieces(mapped_pair):
    from transformers import AutoTokenizer

    model = compose(mapped_pair, "ladder", "mapped")
    large_tok, small_tok = AutoTokenizer.from_pretrained(mapped_pair["large"]), AutoTokenizer.from_pretrained(
        mapped_pair["small"])
    weight = model.small.get_input_embeddings().weight
    ids = torch.tensor([[large_tok.convert_tokens_to_ids(t) for t in ("Ġplus", "What", "Ġis", "<|endoftext|>")]
                        + list(range(250, 262))])
    got = model.vocab_map(ids, weight)  # (1, 16, dS)
    multi = 0
    for t, i in enumerate(ids[0].tolist()):
        pieces = small_tok(large_tok.decode([i]), add_special_tokens=False)["input_ids"]
        multi += len(pieces) > 1
        torch.testing.assert_close(got[0, t], weight[pieces].mean(0))
    assert multi > 0  # some large tokens really are re-tokenized into several small ones
    vm = model.vocab_map  # compact: offsets + ids, no |V_large| x dS matrix
    assert vm.offsets.shape == (model.vocab_size + 1,) and vm.small_ids.numel() < 4 * model.vocab_size
    assert not any(p.numel() >= model.vocab_size * SMALL_DIM for p in model.parameters() if p.requires_grad)


def test_mapped_inputs_with_eca_add_to_the_bridge_output(mapped_pair):
    model = compose(mapped_pair, "eca", "mapped")
    seen = {}
    model.small.register_forward_pre_hook(lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    ids = random_ids(model, 1, 7)
    model(input_ids=ids)
    states, _ = model.encode_large(ids, torch.ones_like(ids), positions_from_mask(torch.ones_like(ids)))
    bridge_out = model.bridge(states, torch.ones_like(ids), True, None)  # (1, 7, dS)
    mapped = model.vocab_map(ids, model.small.get_input_embeddings().weight)
    torch.testing.assert_close(seen["embeds"], bridge_out + mapped)


def test_mapped_needs_both_tokenizers(mapped_pair, tiny_models):
    with pytest.raises(LLMModulesError, match="both tokenizers.*small model"):
        LLMModulesModel.compose(large=mapped_pair["large"], small=mapped_pair["small_no_tokenizer"],
                                bridge="ladder", small_inputs="mapped", large_layers=[2])
    with pytest.raises(LLMModulesError, match="both tokenizers.*large model"):
        LLMModulesModel.compose(large=tiny_models["qwen2"], small=mapped_pair["small"], small_inputs="mapped",
                                num_heads=4)
    model = compose(mapped_pair, "ladder", "mapped")
    ids = random_ids(model, 1, 4)
    states, _ = model.encode_large(ids, torch.ones_like(ids), positions_from_mask(torch.ones_like(ids)))
    with pytest.raises(LLMModulesError, match="input_ids"):
        model(large_states=states)  # cached states alone: the mapped embeddings need the ids


# ---------------------------------------------------------------------------------------------- state cache
def test_training_from_cached_taps_equals_computing_them(mapped_pair, tmp_path):
    from types import SimpleNamespace

    from llm_modules.data.prepare import TokenizedExample, collate
    from llm_modules.states.store import StateCache, state_cache_key

    model = compose(mapped_pair, "ladder", "mapped").train()
    nudge(model)
    assert model.large_taps == [1, 3, 4]  # the ladder's taps and the residual head's final state
    g = torch.Generator().manual_seed(4)
    examples = [TokenizedExample(input_ids=(ids := torch.randint(0, model.vocab_size, (n,), generator=g).tolist()),
                                 labels=list(ids), record=SimpleNamespace(source="t")) for n in (5, 11, 8)]
    batch = collate(examples, pad_id=0)

    def loss_and_grads(**states):
        model.zero_grad()
        loss = model(**batch, **states, loss="sum").loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 5e-2)):
        key = state_cache_key(model, "data", dtype)
        cache = StateCache.open_or_build(tmp_path, key, model, examples, dtype=dtype, progress=False)
        states = cache.batch([0, 1, 2], pad_to=batch["input_ids"].shape[1])
        assert states.shape[2:] == (3, LARGE_DIM)
        cached_loss, cached_grads = loss_and_grads(large_states=states.float())
        torch.testing.assert_close(cached_loss, loss, rtol=tol, atol=tol)
        assert set(cached_grads) == set(grads)
        for n in grads:
            torch.testing.assert_close(cached_grads[n], grads[n], rtol=tol, atol=tol, msg=n)
    other = compose(mapped_pair, "ladder", "mapped", large_layers=[1, 2])
    assert state_cache_key(other, "data") != state_cache_key(model, "data")  # the taps are part of the key


# ---------------------------------------------------------------------------------------------- families, config
@pytest.mark.parametrize("bridge", ["ladder", "xattn"])
@pytest.mark.parametrize("small", ["llama", "qwen2", "gpt_neo"])
def test_hooks_reach_inside_each_small_family(tiny_models, small, bridge):
    torch.manual_seed(0)
    options = dict(large_layers=[1, 2], **({"small_stride": 1, "num_heads": 4} if bridge == "xattn" else {}))
    model = LLMModulesModel.compose(large=tiny_models["qwen2"], small=tiny_models[small], bridge=bridge,
                                    head="new", **options).eval()
    ids = random_ids(model, 2, 10)
    closed = model(input_ids=ids).logits
    with torch.no_grad():
        for name, p in model.bridge.named_parameters():
            if "alpha" in name:
                p.fill_(0.8)
    opened = model(input_ids=ids).logits
    assert (opened - closed).abs().max() > 1e-3  # the gated additions reach the small model's layers
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    assert torch.equal(model.generate(ids, mask, max_new_tokens=5, eos_token_id=[]),
                       model.generate(ids, mask, max_new_tokens=5, eos_token_id=[], use_cache=False))


def test_an_unsupported_small_family_is_a_clear_error(tiny_models, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                             word_embed_proj_dim=32, vocab_size=60, max_position_embeddings=64)).save_pretrained(tmp_path)
    for bridge in ("ladder", "xattn"):
        with pytest.raises(LLMModulesError, match="'opt' family"):
            LLMModulesModel.compose(large=tiny_models["qwen2"], small=str(tmp_path), bridge=bridge, large_layers=[2])


def test_a_folder_saved_before_bridges_had_names_loads_with_identical_logits(tiny_models, tmp_path):
    """tests/fixtures/format1 was written by the code of main at d42e517 (no format version, the
    Enhanced Cross-Attention options at the top level): an eca model on the tiny qwen2 -> llama
    pair, weights nudged, with its logits for fixed ids in expected.safetensors.

    Those logits were computed on another CPU, whose matmul kernels round differently in the last
    bits (seen: 1.8e-7 on an AMD EPYC), so they are matched within float32 rounding; identity is
    checked bit for bit on this machine: the old folder, re-saved in today's format, loads to a
    model with the very same weights and logits."""
    shutil.copytree(FIXTURES / "format1", tmp_path / "old")
    config = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    assert "format_version" not in config and "bridge" not in config and config["num_heads"] == 4
    config.update(large=tiny_models["qwen2"], small=tiny_models["llama"])  # the fixture's tmp paths are gone
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(config))
    model = LLMModulesModel.from_pretrained(tmp_path / "old").eval()
    assert model.config.bridge == "eca" and model.config.options().num_heads == 4
    expected = load_file(str(tmp_path / "old" / "expected.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path / "new")  # re-saved in today's format, with the same tensor names
    assert json.loads((tmp_path / "new" / CONFIG_FILE).read_text())["format_version"] == CONFIG_FORMAT
    old_weights, new_weights = (load_file(str(tmp_path / name / WEIGHTS_FILE)) for name in ("old", "new"))
    assert set(new_weights) == set(old_weights)
    for name, tensor in old_weights.items():
        assert torch.equal(new_weights[name], tensor), name
    reloaded = LLMModulesModel.from_pretrained(tmp_path / "new").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=expected["input_ids"]).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("bridge", ["ladder", "xattn"])
def test_a_gated_folder_saved_before_gate_temperatures_loads_with_identical_logits(mapped_pair, tmp_path, bridge):
    """Format 2 wrote no gate_temperature: its gates were tanh(alpha), so it loads with temperature 1."""
    model = compose(mapped_pair, bridge, "mapped", gate_temperature=1.0)
    nudge(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["bridge_options"].pop("gate_temperature") == 1.0
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 2}))
    loaded = LLMModulesModel.from_pretrained(tmp_path).eval()
    assert loaded.config.options().gate_temperature == 1.0 and loaded.config.format_version == CONFIG_FORMAT
    ids = random_ids(model, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert compose(mapped_pair, bridge, "mapped").config.options().gate_temperature == 0.1  # today's default


@pytest.mark.parametrize("temperature", [1.0, 0.1])
@pytest.mark.parametrize("bridge", ["ladder", "xattn"])
def test_a_gate_opens_by_about_the_learning_rate_over_its_temperature_per_step(mapped_pair, bridge, temperature):
    model = compose(mapped_pair, bridge, "mapped", head="projected", gate_temperature=temperature).train()
    gates = [p for n, p in model.named_parameters() if "alpha" in n]
    optimizer = torch.optim.Adam(gates, lr=1e-3)  # Adam's first step moves each alpha by lr
    ids = random_ids(model, 2, 10)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    opened = torch.cat([torch.tanh(p.detach().flatten() / temperature).abs() for p in gates])
    torch.testing.assert_close(opened, torch.full_like(opened, 1e-3 / temperature), rtol=1e-3, atol=0)


def test_bad_bridge_choices_are_clear_errors(mapped_pair, tmp_path):
    with pytest.raises(LLMModulesError, match="unknown bridge 'bogus'"):
        ComposeConfig(large="a", small="b", bridge="bogus")
    with pytest.raises(LLMModulesError, match="unknown option.*num_layers.*ladder"):
        compose(mapped_pair, "ladder", "bridge", num_layers=3)
    with pytest.raises(LLMModulesError, match="small_inputs"):
        ComposeConfig(large="a", small="b", small_inputs="both")
    with pytest.raises(LLMModulesError, match="large_layers"):
        compose(mapped_pair, "ladder", "bridge", large_layers=[0, 9])
    with pytest.raises(LLMModulesError, match="twice"):
        compose(mapped_pair, "xattn", "bridge", large_layers=[4, -1])
    with pytest.raises(LLMModulesError, match="gate_temperature must be a number > 0"):
        compose(mapped_pair, "ladder", "bridge", gate_temperature=0)
    ComposeConfig(large="a", small="b").save(tmp_path)
    newer = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**newer, "format_version": CONFIG_FORMAT + 1}))
    with pytest.raises(LLMModulesError, match="newer"):
        ComposeConfig.load(tmp_path)


def test_default_taps_are_every_fourth_layer_ending_at_the_last():
    from llm_modules.bridges.base import resolve_taps

    assert resolve_taps(None, 24) == [4, 8, 12, 16, 20, 24]
    assert resolve_taps(None, 30) == [2, 6, 10, 14, 18, 22, 26, 30]
    assert resolve_taps(None, 2) == [2]
    assert resolve_taps([-1, 3], 24) == [3, 24]


# ---------------------------------------------------------------------------------------------- command line
def test_train_cli_composes_the_named_bridge_and_inputs(mapped_pair, tmp_path):
    from llm_modules.entrypoints.cli import main

    from ..helpers import write_data

    args = ["train", "--large", mapped_pair["large"], "--small", mapped_pair["small"],
            "--data", write_data(tmp_path / "data.jsonl", n=12), "--output", str(tmp_path / "run"),
            "--template", "stratos", "--batch-size", "2", "--max-length", "1000", "--max-steps", "2",
            "--eval-every", "2", "--num-samples", "0", "--no-progress", "--state-cache-dir", str(tmp_path / "states"),
            "--bridge", "xattn", "--small-inputs", "mapped", "--large-layers", "1,3", "--small-stride", "1",
            "--num-heads", "4", "--train-embeddings", "--gate-temperature", "0.5"]
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "best" / CONFIG_FILE).read_text())
    assert config["bridge"] == "xattn" and config["small_inputs"] == "mapped" and config["train_embeddings"]
    assert config["bridge_options"] == {"large_layers": [1, 3], "small_stride": 1, "num_heads": 4,
                                        "gate_temperature": 0.5}
    model = LLMModulesModel.from_pretrained(tmp_path / "run" / "best")
    assert model.large_taps == [1, 3, 4] and len(model.bridge.blocks) == 2


def test_train_cli_no_train_small_keeps_the_pretrained_small_weights(mapped_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from llm_modules.entrypoints.cli import main

    from ..helpers import write_data

    args = ["train", "--large", mapped_pair["large"], "--small", mapped_pair["small"],
            "--data", write_data(tmp_path / "data.jsonl", n=12), "--output", str(tmp_path / "run"),
            "--template", "stratos", "--batch-size", "2", "--max-length", "1000", "--max-steps", "2",
            "--eval-every", "2", "--num-samples", "0", "--no-progress", "--state-cache-dir", str(tmp_path / "states"),
            "--bridge", "ladder", "--small-inputs", "mapped", "--large-layers", "1,3", "--no-train-small"]
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "best" / CONFIG_FILE).read_text())["train_small"] is False
    assert not any(k.startswith("small.") for k in load_file(str(tmp_path / "run" / "best" / WEIGHTS_FILE)))
    model = LLMModulesModel.from_pretrained(tmp_path / "run" / "best")
    pretrained = AutoModelForCausalLM.from_pretrained(mapped_pair["small"]).base_model.state_dict()
    assert all(torch.equal(v, pretrained[k]) for k, v in model.small.state_dict().items())


def test_train_config_passes_only_the_chosen_bridges_options(tmp_path):
    from llm_modules.training.config import TrainConfig

    base = dict(large="l", small="s", data="d", output=str(tmp_path))
    ladder = TrainConfig.from_flags(**base, bridge="ladder", large_layers="3,7,11", small_inputs="mapped")
    assert ladder.compose.options() == {"causal": True, "head": "residual", "bridge": "ladder",
                                        "small_inputs": "mapped", "train_embeddings": False, "train_small": True,
                                        "large_layers": [3, 7, 11], "gate_temperature": 0.1, "small_layers": None,
                                        "large_reads": "all"}
    assert TrainConfig.from_flags(**base).compose.options()["bridge"] == "eca"
    with pytest.raises(LLMModulesError, match="--num-layers is an option of the eca bridge"):
        TrainConfig.from_flags(**base, bridge="ladder", num_layers=3)
    with pytest.raises(LLMModulesError, match="--large-layers must be comma-separated"):
        TrainConfig.from_flags(**base, bridge="ladder", large_layers="3,x")
    with pytest.raises(LLMModulesError, match="--bridge must be one of"):
        TrainConfig.from_flags(**base, bridge="lora")
    with pytest.raises(LLMModulesError, match="train_embeddings"):
        TrainConfig.from_flags(**base, train_embeddings=True)
    saved_before_bridges = {k: v for k, v in TrainConfig.from_flags(**base).as_flags().items()
                            if k not in ("bridge", "small_inputs", "train_embeddings", "large_layers", "small_stride",
                                         "gate_temperature", "train_small")}
    assert TrainConfig.from_flags(**base).differences(saved_before_bridges) == []  # an older run still resumes
    assert TrainConfig.from_flags(**base, train_small=False).differences(saved_before_bridges) == ["train_small"]
    ladder_before_temperatures = {k: v for k, v in ladder.as_flags().items() if k != "gate_temperature"}
    assert ladder.differences(ladder_before_temperatures) == ["gate_temperature"]  # its gates had T = 1
    assert TrainConfig.from_flags(**{**base, "bridge": "ladder", "large_layers": "3,7,11", "small_inputs": "mapped",
                          "gate_temperature": 1.0}).differences(ladder_before_temperatures) == []
    with pytest.raises(LLMModulesError, match="--gate-temperature is an option of the ladder and xattn"):
        TrainConfig.from_flags(**base, gate_temperature=0.5)


@pytest.mark.parametrize("bridge", ["ladder", "xattn"])
@pytest.mark.parametrize("train_small", [True, False])
def test_gradient_checkpointing_recomputes_the_hooked_layers_identically(mapped_pair, bridge, train_small):
    model = compose(mapped_pair, bridge, "mapped", head="new", train_small=train_small).train()
    nudge(model)
    ids = random_ids(model, 2, 9)

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.small.gradient_checkpointing_enable()
    checkpointed = grads()
    assert set(checkpointed) == set(plain) and any(n.startswith("bridge.") for n in plain)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], msg=n)
