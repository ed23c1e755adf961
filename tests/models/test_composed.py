"""Correctness properties of the composed model: frozen, causal, padding-invariant, save/load identical."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llm_modules import LLMModulesModel
from llm_modules.errors import LLMModulesError
from llm_modules.losses import next_token_loss
from llm_modules.models.saved import CONFIG_FILE, WEIGHTS_FILE

from ..helpers import PAIRS, assert_causal, compose, nudge, random_ids


@pytest.mark.parametrize("large,small", PAIRS)
@pytest.mark.parametrize("head", ["new", "projected", "residual"])
def test_families_train_only_the_bridge_small_and_head(tiny_models, large, small, head):
    model = compose(tiny_models, large, small, head=head).train()
    ids = random_ids(model, 2, 10)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 10, model.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.large.parameters())
    assert all(p.grad is not None for p in model.bridge.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert any(p.grad is not None for p in model.small.parameters())
    stub = model.small.get_input_embeddings()
    assert stub.weight.shape[0] == 1 and not stub.weight.requires_grad
    # The counts against each model loaded on its own (tied weights once), and the trainable total
    # against the weights that got a gradient.
    large_alone = AutoModelForCausalLM.from_pretrained(tiny_models[large])
    small_alone = AutoModelForCausalLM.from_pretrained(tiny_models[small]).base_model
    embeddings = small_alone.get_input_embeddings().weight  # (V_small, d_small), replaced by the stub
    counts = model.parameter_counts()
    assert counts["large"] == {"trainable": 0, "frozen": numel_once(large_alone)}
    assert counts["small"] == {"trainable": numel_once(small_alone) - embeddings.numel(), "frozen": embeddings.shape[1]}
    assert counts["total"]["trainable"] == sum(p.numel() for p in model.parameters() if p.grad is not None)


def numel_once(model) -> int:
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def test_large_model_stays_in_eval_mode(tiny_models):
    model = compose(tiny_models).train()
    assert model.bridge.training and model.small.training
    assert not model.large.training and not any(m.training for m in model.large.modules())


@pytest.mark.parametrize("large,small", PAIRS[:2])
def test_causal_no_position_reads_later_large_states(tiny_models, large, small):
    model = compose(tiny_models, large, small)
    nudge(model)
    assert_causal(model)


def test_leaky_variant_warns_and_reads_the_future(tiny_models):
    with pytest.warns(UserWarning, match="leak"):
        model = compose(tiny_models, causal=False)
    nudge(model)
    ids = random_ids(model, 1, 16)
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % model.vocab_size
    a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    assert (a[:, :9] - b[:, :9]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_changes_nothing_for_real_tokens(tiny_models, side, causal):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = compose(tiny_models, "qwen2", "gpt_neo", causal=causal)
    nudge(model)
    short, long_ = random_ids(model, 1, 7, seed=5), random_ids(model, 1, 12, seed=6)
    pad = torch.zeros(1, 5, dtype=torch.long)
    if side == "left":
        batch = torch.cat([torch.cat([pad, short], 1), long_])
        mask = torch.cat([torch.cat([pad, torch.ones_like(short)], 1), torch.ones_like(long_)])
        real = slice(5, 12)
    else:
        batch = torch.cat([torch.cat([short, pad], 1), long_])
        mask = torch.cat([torch.cat([torch.ones_like(short), pad], 1), torch.ones_like(long_)])
        real = slice(0, 7)
    batched = model(input_ids=batch, attention_mask=mask).logits
    torch.testing.assert_close(batched[0:1, real], model(input_ids=short).logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1:2], model(input_ids=long_).logits, rtol=1e-4, atol=1e-4)


def test_residual_head_starts_from_the_large_models_logits(tiny_models):
    model = compose(tiny_models, "llama", "qwen2", head="residual")
    ids = random_ids(model, 2, 9)
    with torch.no_grad():
        expected = model.large(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_labels_minus_100_are_ignored_and_loss_is_next_token(tiny_models):
    model = compose(tiny_models)
    ids = random_ids(model, 1, 8)
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, 3:7], ids[0, 4:8])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("head", ["new", "residual"])
def test_save_load_round_trip_gives_identical_logits(tiny_models, tmp_path, head):
    model = compose(tiny_models, "qwen2", "gpt2", head=head)
    nudge(model)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert saved and not any(k.startswith("large.") for k in saved)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["large"] == tiny_models["qwen2"] and config["head"] == head and config["library_version"]
    torch.manual_seed(123)  # a different random init must not matter
    loaded = LLMModulesModel.from_pretrained(tmp_path).eval()
    ids = random_ids(model, 2, 11)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("large", ["qwen2", "gpt2"])  # gpt2 ties its output embedding to its input one
@pytest.mark.parametrize("head", ["new", "projected", "residual"])
def test_released_large_model_frees_its_body_and_restores_identically(tiny_models, large, head):
    import gc
    import weakref

    from llm_modules.tensors import positions_from_mask

    model = compose(tiny_models, large, "llama", head=head)
    nudge(model)
    ids = random_ids(model, 2, 9)
    mask = torch.ones_like(ids)
    states, _ = model.encode_large(ids, mask, positions_from_mask(mask))
    with torch.no_grad():
        before, from_states = model(input_ids=ids).logits, model(large_states=states).logits
    body_weight = weakref.ref(list(model.large.base_model.parameters())[-1])
    vocab, large_dim = model.large.get_output_embeddings().weight.shape

    assert model.release_large() and model.large_released
    gc.collect()
    assert body_weight() is None  # nothing holds the freed weights
    left = sum(p.numel() for p in model.large.parameters())
    assert left == (0 if head == "new" else vocab * large_dim)
    with torch.no_grad():  # training from cached states needs nothing that was freed
        torch.testing.assert_close(model(large_states=states).logits, from_states, rtol=0, atol=0)
    with pytest.raises(LLMModulesError, match="restore_large"):
        model(input_ids=ids)

    model.restore_large()
    assert not model.large_released and not any(p.requires_grad for p in model.large.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_a_config_built_large_model_is_never_released(tiny_models):
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=f"config:{tiny_models['qwen2']}", small=tiny_models["llama"])
    assert model.release_large() is False and not model.large_released
    model(input_ids=random_ids(model, 1, 5))  # random weights could not be reloaded, so they stay


def test_load_rejects_weights_of_another_composition(tiny_models, tmp_path):
    compose(tiny_models, "qwen2", "gpt2").save_pretrained(tmp_path / "a")
    compose(tiny_models, "qwen2", "llama").save_pretrained(tmp_path / "b")
    (tmp_path / "b" / WEIGHTS_FILE).replace(tmp_path / "a" / WEIGHTS_FILE)
    with pytest.raises(LLMModulesError, match="do not match"):
        LLMModulesModel.from_pretrained(tmp_path / "a")
    with pytest.raises(LLMModulesError, match="missing"):
        LLMModulesModel.from_pretrained(tmp_path / "nothing")


def test_too_long_for_the_small_model_is_an_error(tiny_models):
    model = compose(tiny_models, "qwen2", "gpt_neo")  # GPT-Neo tiny: 64 positions
    with pytest.raises(LLMModulesError, match="position"):
        model(input_ids=random_ids(model, 1, 65))


def test_bad_bridge_options_are_clear_errors(tiny_models):
    with pytest.raises(LLMModulesError, match="head kind"):
        compose(tiny_models, head="bogus")
    with pytest.raises(LLMModulesError, match="divisible"):
        compose(tiny_models, num_heads=5)


@pytest.mark.parametrize("head", ["new", "residual"])
@pytest.mark.parametrize("chunk", [256, 3])  # 3: the head runs in recomputed chunks of 3 positions
def test_loss_only_head_gives_the_same_loss_and_gradients(tiny_models, head, chunk):
    model = compose(tiny_models, head=head).train()
    model.loss_chunk_tokens = chunk
    model.bridge.layers[0].dropout = model.bridge.layers[1].dropout = 0.0
    nudge(model)
    ids = random_ids(model, 2, 10)
    labels = ids.clone()
    labels[0, :6] = -100
    full = model(input_ids=ids, labels=labels)
    full_sum = next_token_loss(full.logits, labels, "sum")
    full_sum.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    grads = {n: p.grad.clone() for n, p in trained}
    model.zero_grad()
    picked = model(input_ids=ids, labels=labels, loss="sum")
    assert picked.logits is None
    torch.testing.assert_close(picked.loss, full_sum)
    picked.loss.backward()
    assert any(n.startswith("head.") for n in grads) and any(n.startswith("bridge.") for n in grads)
    for n, p in trained:
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    with torch.no_grad():
        mean = model(input_ids=ids, labels=labels, loss="mean").loss
        torch.testing.assert_close(mean, model(input_ids=ids, labels=labels).loss)


def test_bridge_and_head_take_the_small_models_dtype(tiny_models):
    model = compose(tiny_models, "qwen2", "gpt_neo", head="new", dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    ids = random_ids(model, 1, 5)
    assert model(input_ids=ids).logits.dtype == torch.float64


def test_forward_takes_what_training_and_plain_decoding_need_and_the_reads_go_through_one_object(tiny_models):
    """Issue 34, item 3: `forward` has at most 8 parameters (self included); what the bridge reads otherwise
    is one `LargeRead`, through `forward_read`, whose default read is forward's own."""
    import inspect

    from llm_modules.bridges import LargeRead

    assert list(inspect.signature(LLMModulesModel.forward).parameters) == [
        "self", "input_ids", "attention_mask", "labels", "large_states", "cache", "logits_to_keep", "loss"]
    model = compose(tiny_models, "qwen2", "llama", head="residual", dtype=torch.float64).eval()
    nudge(model)
    ids = random_ids(model, 2, 7)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_read(LargeRead(), input_ids=ids).logits,
                                   model(input_ids=ids).logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="loss must be"):
            model(input_ids=ids, labels=ids, loss="total")
