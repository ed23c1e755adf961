"""`--cpu-linear`: a float32 model's linear layers run through oneDNN compute what nn.Linear computes from the very
same parameters (tied embeddings, weight digests, autograd where it is asked for), speculative decoding over
converted layers is the converted target's own output, and `auto` converts only on the CPUs where torch's MKL path
is slow."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from llm_modules import LLMModulesModel
from llm_modules.decoding.engine import DecodeBatch
from llm_modules.decoding.generation import generate
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.decoding.speculative.tree_proposer import TreeProposer
from llm_modules.errors import LLMModulesError
from llm_modules.models import cpu_linear, small_m
from llm_modules.models.cpu_linear import OneDnnLinear, linear_kernel, use_cpu_linear
from llm_modules.models.loading import load_model

from ..helpers import OPTIONS, decode_rows, nudge_gates, save_tiny_composed

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _qwen(tied=True, seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=120,
                                        max_position_embeddings=128, tie_word_embeddings=tied)).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_converted_layers_compute_what_torch_computes_from_the_same_parameters(tied):
    from llm_modules.models.large_identity import weights_digest

    model = _qwen(tied)
    digest, parameters = weights_digest(model), dict(model.named_parameters())
    ids = torch.randint(0, 120, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, output_hidden_states=True)
    assert use_cpu_linear(model, "onednn") == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert linear_kernel(model) == "oneDNN"
    with torch.no_grad():
        got = model(ids, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.hidden_states[1], want.hidden_states[1], rtol=1e-5, atol=1e-5)
    head = model.get_output_embeddings()
    assert isinstance(head, OneDnnLinear)
    assert (head.weight is model.get_input_embeddings().weight) == tied
    assert dict(model.named_parameters()) == parameters and weights_digest(model) == digest  # in place, no copy
    body = model.model.layers[0].mlp.up_proj
    with torch.no_grad():  # leading dimensions of any rank, and no rows at all
        x = torch.randn(2, 3, 4, 32)
        torch.testing.assert_close(body(x), x @ body.weight.T, rtol=1e-5, atol=1e-5)
        assert body(torch.randn(0, 32)).shape == (0, 64)
    model(ids).logits.sum().backward()  # with autograd asked for, it computes as nn.Linear does
    assert body.weight.grad is not None and body.weight.grad.abs().sum() > 0


def test_a_converted_layer_refuses_what_it_cannot_run():
    layer = OneDnnLinear(torch.nn.Linear(8, 4))
    with pytest.raises(LLMModulesError, match="float32 CPU inputs"), torch.no_grad():
        layer(torch.randn(2, 8, dtype=torch.float64))


needs_kernel = pytest.mark.skipif(small_m.kernel() is None,
                                  reason="our AVX2 kernel cannot be built here (no AVX2 and FMA, or no C compiler)")


@needs_kernel
@pytest.mark.parametrize("rows", [2, 3, 4, 5, 6, 7, 8, 11, 13, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_our_kernel_computes_the_product_for_any_shape(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 77, generator=g), torch.randn(37, 77, generator=g)  # odd N, K not a multiple of 8
    b = torch.randn(37, generator=g) if bias else None
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    torch.testing.assert_close(small_m.small_m_linear(x, w, b).double(), want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_model_on_our_kernel_scores_passes_of_any_width_as_torch_does():
    model = _qwen()
    ids = torch.randint(0, 120, (1, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    assert use_cpu_linear(model, "avx2") == 15 and linear_kernel(model) == "oneDNN and ours for 2-16 rows"
    with torch.no_grad():
        cache = model(ids[:, :3], use_cache=True).past_key_values  # then passes of 1, 2, 5 and 6 tokens (2-16 rows)
        got = [model(ids[:, :3]).logits]
        for start, end in ((3, 4), (4, 6), (6, 11), (11, 17)):
            got.append(model(ids[:, start:end], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)


def test_our_kernel_is_asked_for_only_where_it_can_be_built(monkeypatch):
    monkeypatch.setattr(small_m, "kernel", lambda: None)
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "AuthenticAMD")
    with pytest.raises(LLMModulesError, match="--cpu-linear avx2: our kernel needs"):
        use_cpu_linear(_qwen(), "avx2")
    if torch.backends.mkl.is_available():
        model = _qwen()
        assert use_cpu_linear(model, "auto") == 15 and linear_kernel(model) == "oneDNN"  # oneDNN's alone


def test_a_compiler_that_fails_is_an_error_the_loader_reports(tmp_path):
    import subprocess

    with pytest.raises(subprocess.CalledProcessError):
        small_m.build(tmp_path, "false")
    assert not list(tmp_path.glob("*.so"))


def test_auto_converts_only_float32_models_on_cpus_where_mkl_is_slow(monkeypatch):
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    assert use_cpu_linear(_qwen(), "auto") == 0
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: None)  # unknown (no /proc/cpuinfo)
    assert use_cpu_linear(_qwen(), "auto") == 0
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "AuthenticAMD")
    assert use_cpu_linear(_qwen().to(torch.bfloat16), "auto") == 0
    assert use_cpu_linear(_qwen(), "torch") == 0
    if torch.backends.mkl.is_available():
        assert use_cpu_linear(_qwen(), "auto") == 15
    with pytest.raises(LLMModulesError, match="float32 models on a CPU"):
        use_cpu_linear(_qwen().to(torch.bfloat16), "onednn")
    with pytest.raises(LLMModulesError, match="--cpu-linear must be one of"):
        use_cpu_linear(_qwen(), "fast")


def test_load_model_converts_a_plain_model_as_asked(mapped_pair):
    loaded = load_model(mapped_pair["large"], cpu_linear="onednn")
    assert linear_kernel(loaded.model) == "oneDNN"
    assert linear_kernel(load_model(mapped_pair["large"], cpu_linear="torch").model) == "torch"


def _composed(pair):
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=pair["large"], small=pair["small"], bridge="ladder", small_inputs="mapped",
                                    head="projected", **OPTIONS["ladder"])
    nudge_gates(model)
    return model.eval()


@pytest.mark.parametrize("choice", ["onednn", "avx2"])
def test_speculative_decoding_over_converted_layers_is_the_converted_targets_own(mapped_pair, choice):
    if choice == "avx2" and small_m.kernel() is None:
        pytest.skip("our AVX2 kernel cannot be built here (no AVX2 and FMA, or no C compiler)")
    model = _composed(mapped_pair)
    target = model.large
    g = torch.Generator().manual_seed(4)
    prompts = []
    for i in range(4):
        span = torch.randint(3, model.vocab_size, (5,), generator=g).tolist()
        prompts.append(span * 3 if i % 2 == 0 else span)
    options = [SamplingOptions(max_new_tokens=n) for n in (12, 7, 10, 5)]
    before = decode_rows(DecodeBatch(target), prompts, options)
    assert use_cpu_linear(target, choice) > 0
    alone = decode_rows(DecodeBatch(target), prompts, options)
    proposer = TreeProposer(ComposedProposer(model, draft_tokens=3), PromptLookup(model.vocab_size, draft_tokens=4),
                            width=2)
    spec = SpeculativeBatch(target, proposer)
    assert decode_rows(spec, prompts, options, join_at=1) == alone
    assert spec.stats.passes > 0
    assert alone == before  # a random tiny model's greedy choices are not near ties at float32's rounding


def test_a_composed_model_decodes_the_same_with_its_large_model_converted(tiny_pair_with_tokenizer, tmp_path):
    folder = save_tiny_composed(tiny_pair_with_tokenizer, tmp_path / "composed")
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    outputs = {}
    for choice in ("torch", "onednn"):
        loaded = load_model(folder, cpu_linear=choice)
        assert linear_kernel(loaded.model.large) == ("oneDNN" if choice == "onednn" else "torch")
        assert linear_kernel(loaded.model.small) == "torch"  # only the large model is converted
        outputs[choice] = generate(loaded.model, ids, None, SamplingOptions(max_new_tokens=8)).tolist()
    assert outputs["onednn"] == outputs["torch"]


def test_a_generation_stage_decodes_converted_and_hands_back_the_same_layers(monkeypatch):
    from llm_modules.models.cpu_linear import decoding_linears

    model = _qwen()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = torch.randint(0, 120, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    with decoding_linears(model, "onednn") as converted, torch.no_grad():
        assert converted == len(layers) and linear_kernel(model) == "oneDNN"
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == layers
    model(ids).logits.sum().backward()  # trainable again: autograd reaches the restored weights
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    with decoding_linears(model) as converted:
        assert converted == 0
