"""A composed model that reads the large model's states of the prompt only (large_reads="prompt"), for every
bridge: nothing after the prompt is read, cached decoding equals a full recompute, the large model runs once
per row (never in a decode step), the mode is saved with the model, and training from a state cache of the
prompts alone gives the loss of the full states under the prompt-only view."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from llm_modules import LLMModulesModel
from llm_modules.bridges import LargeRead
from llm_modules.decoding.engine import DecodeBatch, Sequence
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.errors import LLMModulesError
from llm_modules.models.compose_config import ComposeConfig
from llm_modules.models.saved import CONFIG_FILE
from llm_modules.tensors import IGNORE_INDEX, answer_start, prompt_source

from ..helpers import OPTIONS, decode_cached_and_recomputed
from ..helpers import nudge_gates as nudge


def until(model, start, **inputs):
    """The model's forward reading the prompt only: row b's answer starts at start[b]."""
    return model.forward_read(LargeRead(answer_start=start), **inputs)


BRIDGES = ["eca", "ladder", "xattn"]


def prompt_model(pair, bridge, head="projected", seed=0, **extra):
    torch.manual_seed(seed)
    model = LLMModulesModel.compose(large=pair["large"], small=pair["small"], bridge=bridge, small_inputs="mapped",
                                    head=head, large_reads="prompt", **{**OPTIONS[bridge], **extra}).eval()
    nudge(model)
    return model.double()


def ids_of(model, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.vocab_size, (batch, length), generator=g)


def test_answer_start_and_prompt_source():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX] * 4, [1, 2, 3, 4]])
    assert answer_start(labels).tolist() == [2, 4, 0]
    assert prompt_source(torch.tensor([2, 4, 0]), 3, 4).tolist() == [[0, 1, 1, 1], [0, 1, 2, 3], [-1, -1, -1, -1]]


@pytest.mark.parametrize("bridge", BRIDGES)
def test_no_position_reads_a_large_state_after_the_prompt(mapped_pair, bridge):
    """Noise in the large states of the answer changes no logit; the tokens are still read causally; and the
    prompt is really read (noise in its states does change the answer's logits)."""
    model = prompt_model(mapped_pair, bridge)
    ids = ids_of(model, 2, 12)
    mask = torch.ones_like(ids)
    start = torch.tensor([5, 8])
    states, _ = model.encode_large(ids, mask, torch.arange(12)[None].expand(2, -1))  # (B, T, K, dL)
    out = until(model, start, input_ids=ids, attention_mask=mask, large_states=states).logits
    g = torch.Generator().manual_seed(5)
    noisy = states.clone()
    for row, s in enumerate(start.tolist()):
        noisy[row, s:] = torch.randn(noisy[row, s:].shape, generator=g, dtype=noisy.dtype) * 3
    blind = until(model, start, input_ids=ids, attention_mask=mask, large_states=noisy).logits
    torch.testing.assert_close(blind, out, rtol=0, atol=1e-10)
    # the model running the large model itself (over the prompts only) gives the same logits
    own = until(model, start, input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(own, out, rtol=0, atol=1e-10)
    # labels say the same as answer_start: the first labelled position
    labels = torch.where(torch.arange(12)[None] >= start[:, None], ids, IGNORE_INDEX)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).logits, out, rtol=0, atol=0)
    # causal in the tokens: changing tokens from position 9 on changes no earlier logit
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % model.vocab_size
    later = until(model, start, input_ids=changed, attention_mask=mask).logits
    torch.testing.assert_close(later[:, :9], out[:, :9], rtol=0, atol=1e-10)
    assert (later[:, 9:] - out[:, 9:]).abs().max() > 1e-4
    # the prompt's states are read: noise in them moves the answer's logits
    noisy_prompt = states.clone()
    noisy_prompt[:, :5] += torch.randn(noisy_prompt[:, :5].shape, generator=g, dtype=states.dtype)
    moved = until(model, start, input_ids=ids, attention_mask=mask, large_states=noisy_prompt).logits
    assert (moved[:, 8:] - out[:, 8:]).abs().max() > 1e-4


def left_padded(model):
    short, long_ = ids_of(model, 1, 5, seed=5), ids_of(model, 1, 9, seed=6)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long_])  # (2, 9)
    mask = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(short)], 1),
                      torch.ones_like(long_)])
    return ids, mask


@pytest.mark.parametrize("bridge", BRIDGES)
def test_cached_decoding_equals_full_recompute(mapped_pair, bridge):
    """Greedy in float64 with left padding: the cached decoder (the large model once over each prompt) gives the
    tokens of a full recompute, and its logits are those of one forward over prompt + answer."""
    model = prompt_model(mapped_pair, bridge)
    ids, mask = left_padded(model)
    steps, cached = decode_cached_and_recomputed(model, ids, mask)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
    full = until(model, torch.full((2,), ids.shape[1]), input_ids=cached, attention_mask=full_mask).logits
    torch.testing.assert_close(torch.stack(steps, 1), full[:, ids.shape[1] - 1:-1], rtol=1e-9, atol=1e-9)


def test_rows_joining_and_leaving_keep_each_rows_prompt(mapped_pair):
    """A row that joins mid-decode (its prompt shorter or longer than the running rows) and rows that leave
    early decode as each row alone: the prompt bounds move with the caches."""
    model = prompt_model(mapped_pair, "xattn")
    prompts = [ids_of(model, 1, n, seed=n)[0].tolist() for n in (7, 3, 11)]
    lengths = [6, 2, 5]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=n, eos_token_id=[])[0, len(p):].tolist()
             for p, n in zip(prompts, lengths)]
    batch = DecodeBatch(model)
    seqs = [Sequence(p, SamplingOptions(max_new_tokens=n), []) for p, n in zip(prompts, lengths)]
    batch.add(seqs[:2])
    batch.step()
    batch.add(seqs[2:])  # joins after one step: caches realigned to a new width
    while batch.rows:
        batch.step()
    assert [s.tokens for s in seqs] == alone


@pytest.mark.parametrize("bridge", BRIDGES)
def test_the_large_model_runs_once_per_prompt_and_never_in_a_decode_step(mapped_pair, bridge):
    model = prompt_model(mapped_pair, bridge)
    calls = []
    handle = model.large.base_model.register_forward_hook(lambda m, a, out: calls.append(1))
    ids, mask = left_padded(model)
    batch = DecodeBatch(model)
    batch.add([Sequence(row[m.bool()].tolist(), SamplingOptions(max_new_tokens=8), []) for row, m in zip(ids, mask)])
    assert len(calls) == 1 and batch.cache.large is None  # the prompts, read once; no large cache kept
    while batch.rows:
        batch.step()
    handle.remove()
    assert len(calls) == 1


def test_save_load_records_and_restores_the_mode(mapped_pair, tmp_path):
    model = prompt_model(mapped_pair, "eca").float()
    model.save_pretrained(tmp_path / "prompt")
    assert json.loads((tmp_path / "prompt" / CONFIG_FILE).read_text())["large_reads"] == "prompt"
    loaded = LLMModulesModel.from_pretrained(tmp_path / "prompt").eval()
    assert loaded.config.large_reads == "prompt"
    ids = ids_of(model, 1, 10)
    start = torch.tensor([6])
    torch.testing.assert_close(until(loaded, start, input_ids=ids).logits,
                               until(model, start, input_ids=ids).logits, rtol=0, atol=0)
    assert torch.equal(loaded.generate(ids, max_new_tokens=4, eos_token_id=[]),
                       model.generate(ids, max_new_tokens=4, eos_token_id=[]))
    # a folder saved before the option existed reads everything
    data = json.loads((tmp_path / "prompt" / CONFIG_FILE).read_text())
    del data["large_reads"]
    (tmp_path / "prompt" / CONFIG_FILE).write_text(json.dumps(data))
    assert ComposeConfig.load(tmp_path / "prompt").large_reads == "all"


def test_what_prompt_reads_refuses_is_a_clear_error(mapped_pair):
    base = dict(large=mapped_pair["large"], small=mapped_pair["small"], large_reads="prompt")
    for options, match in ((dict(head="residual", small_inputs="mapped"), "residual head"),
                           (dict(head="new", small_inputs="bridge"), "small_inputs='mapped'"),
                           (dict(head="new", small_inputs="mapped", large_reads="some"), "unknown large_reads")):
        with pytest.raises(LLMModulesError, match=match):
            ComposeConfig.from_options(**{**base, **options})
    model = prompt_model(mapped_pair, "eca")
    with pytest.raises(LLMModulesError, match="answer_start"):
        model(input_ids=ids_of(model, 1, 6))


def test_training_from_prompt_only_states_equals_the_full_states_under_the_view(mapped_pair, tmp_path):
    """The composed objective's state cache holds the prompts' positions only (fewer bytes than every position,
    under another key), and its padded batch gives the loss and gradients of the full states."""
    from llm_modules.data.prepare import TokenizedExample, collate
    from llm_modules.states.store import StateCache, examples_digest, state_cache_key
    from llm_modules.training.objectives.composed import prompt_examples

    model = prompt_model(mapped_pair, "xattn").float().train()
    g = torch.Generator().manual_seed(4)
    examples = []
    for n, prompt in ((9, 4), (14, 9), (11, 6)):
        ids = torch.randint(3, model.vocab_size, (n,), generator=g).tolist()
        examples.append(TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:],
                                         record=SimpleNamespace(source="t")))
    batch = collate(examples, pad_id=0)
    prompts = prompt_examples(examples)
    assert [len(p.input_ids) for p in prompts] == [4, 9, 6]
    key = state_cache_key(model, "prompt:" + examples_digest(prompts))
    assert key != state_cache_key(model, examples_digest(examples))
    cache = StateCache.open_or_build(tmp_path / "p", key, model, prompts, progress=False)
    every = StateCache.open_or_build(tmp_path / "a", state_cache_key(model, examples_digest(examples)), model,
                                     examples, progress=False)
    assert cache.lengths == [4, 9, 6] and cache.size_bytes < every.size_bytes

    def loss_and_grads(states):
        model.zero_grad()
        loss = model(**batch, large_states=states, loss="sum").loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    width = batch["input_ids"].shape[1]
    loss, grads = loss_and_grads(cache.batch([0, 1, 2], pad_to=width))
    full_loss, full_grads = loss_and_grads(every.batch([0, 1, 2], pad_to=width))
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(full_grads)
    for n in grads:
        torch.testing.assert_close(grads[n], full_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_train_cli_reads_the_prompt_only_end_to_end(mapped_pair, tmp_path):
    """`train --large-reads prompt`: the state cache holds the prompts' positions only, the saved model reads
    the prompt only, and --loss-on all (no prompt) is refused."""
    from transformers import AutoTokenizer

    from llm_modules.data.prepare import prepare_data, prompt_length
    from llm_modules.entrypoints.cli import main
    from llm_modules.states.store import INDEX_FILE
    from llm_modules.training.config import TrainConfig

    from ..helpers import write_data

    args = ["train", "--large", mapped_pair["large"], "--small", mapped_pair["small"],
            "--data", write_data(tmp_path / "data.jsonl", n=12), "--output", str(tmp_path / "run"),
            "--template", "stratos", "--batch-size", "2", "--max-length", "1000", "--max-steps", "2",
            "--eval-every", "2", "--num-samples", "1", "--max-new-tokens", "4", "--no-progress",
            "--state-cache-dir", str(tmp_path / "states"), "--bridge", "xattn", "--small-inputs", "mapped",
            "--large-layers", "1,3", "--small-stride", "1", "--num-heads", "4", "--head", "projected",
            "--large-reads", "prompt"]
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "best" / CONFIG_FILE).read_text())["large_reads"] == "prompt"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    stored = sorted(n for p in (tmp_path / "states").glob(f"*/{INDEX_FILE}") for n in json.loads(p.read_text())["lengths"])
    config = TrainConfig.from_file(tmp_path / "run" / "run_config.json")
    data = prepare_data(config.data, AutoTokenizer.from_pretrained(mapped_pair["large"]))
    examples = data.train + data.val
    assert stored == sorted(prompt_length(e) for e in examples)  # train and validation: their prompts only
    assert sum(stored) < sum(len(e.input_ids) for e in examples)
    with pytest.raises(LLMModulesError, match="loss-on all"):
        TrainConfig.from_flags(large="l", small="s", data="d", output="o", head="new", small_inputs="mapped",
                               large_reads="prompt", loss_on="all")
