"""`--drafter-targets generated` keeps the states the generating pass computed (`generated.StateCapture`): the
answers are those of a generation that keeps nothing, every row's states (its last token included) equal a
fresh forward over its prompt and answer, and a state cache built from them equals one the large model
computes, with no example run through the large model again."""

from __future__ import annotations

import random

import pytest
import torch

from llm_modules.decoding.generation import generate
from llm_modules.decoding.steppers import Decoder
from llm_modules.models.large import num_layers, tapped_states
from llm_modules.states.store import HeldStates, StateCache, ids_hash
from llm_modules.tensors import left_pad
from llm_modules.training import generated

from ..helpers import TINY

PAD, MAX_LENGTH = 0, 20


@pytest.fixture(scope="module")
def large():
    torch.manual_seed(11)
    return TINY["qwen2"]().eval().double()  # float64: what differs below is the float32 storage only


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(3)
    return [[rng.randrange(1, 120) for _ in range(rng.randint(2, 9))] for _ in range(7)]


@pytest.fixture(scope="module")
def eos(large, prompts):
    """A token the model writes in the middle of some rows' answers (not all): rows then end at different steps,
    some at EOS, the others at the length limit."""
    ids, mask = left_pad(prompts, PAD, "cpu")
    out = generate(large, ids, mask, max_new_tokens=MAX_LENGTH - max(map(len, prompts)), eos_token_id=[999])
    counts: dict[int, int] = {}
    for row in out[:, ids.shape[1] + 1:].tolist():
        for t in set(row):
            counts[t] = counts.get(t, 0) + 1
    return [min(counts, key=lambda t: (abs(counts[t] - len(prompts) / 2), t))]


def taps(large) -> list[int]:
    return [1, num_layers(large)]  # an inner layer and the final, normed state


def recomputed(large, ids: list[int]) -> torch.Tensor:
    full = torch.tensor([ids])
    states, _ = tapped_states(Decoder(large.base_model), taps(large), num_layers(large), input_ids=full,
                              attention_mask=torch.ones_like(full), position_ids=torch.arange(len(ids))[None])
    return states[0].float()  # (T, K, dL)


def test_kept_states_equal_a_fresh_forward_and_the_answers_do_not_change(large, prompts, eos):
    capture = generated.StateCapture(taps(large), "float32", "key")
    rows = list(range(len(prompts)))
    answers, states = generated.answer_batch(large, prompts, rows, MAX_LENGTH, eos, PAD, capture)
    plain, nothing = generated.answer_batch(large, prompts, rows, MAX_LENGTH, eos, PAD)
    assert answers == plain and nothing is None
    ended = [a[-1] in eos for a in answers]
    assert any(ended) and not all(ended)  # rows left the batch at different steps, for both reasons
    assert all(len(p) + len(a) <= MAX_LENGTH for p, a in zip(prompts, answers))
    # the target alone's greedy continuation, row by row
    for p, a in zip(prompts, answers):
        alone = generate(large, torch.tensor([p]), max_new_tokens=MAX_LENGTH - len(p), eos_token_id=eos)[0, len(p):]
        assert a == alone.tolist()[: len(a)] and (a[-1] in eos or len(p) + len(a) == MAX_LENGTH)
    for p, a, s in zip(prompts, answers, states):
        assert s.shape == (len(p) + len(a), 2, large.config.hidden_size) and s.dtype == torch.float32
        torch.testing.assert_close(s, recomputed(large, p + a), atol=1e-6, rtol=1e-6)  # the last token's too


def test_a_state_cache_built_from_kept_states_equals_one_computed_and_runs_nothing(tmp_path, large, prompts, eos,
                                                                                 monkeypatch):
    monkeypatch.setattr(generated, "GENERATE_BATCH", 3)
    model_key = "m" * 64
    capture = generated.StateCapture(taps(large), "float32", model_key)
    key = generated.generation_key(large, "tiny", prompts, MAX_LENGTH, eos)
    path = tmp_path / "answers" / f"{key}.json"
    answers, info = generated.load_or_generate(path, key, large, prompts, MAX_LENGTH, eos, PAD, capture=capture)
    assert info["generated"] and len(list(generated.states_folder(path).glob("batch-*.safetensors"))) == 3
    held = HeldStates(generated.states_folder(path), model_key, "float32")
    examples = [type("Example", (), {"input_ids": p + a})() for p, a in zip(prompts, answers)]
    assert len(held) == len(examples) and all(ids_hash(e.input_ids) in held for e in examples)

    class Model:  # the state cache's view of the large model (`encode_large` at the taps)
        config = type("Config", (), {"head": None})()

        def __init__(self):
            self.large = large

        def encode_large(self, input_ids, attention_mask, position_ids):
            return tapped_states(Decoder(large.base_model), taps(large), num_layers(large), input_ids=input_ids,
                                 attention_mask=attention_mask, position_ids=position_ids)

    from_held = StateCache.open_or_build(tmp_path / "a", "k" * 64, Model(), examples, progress=False,
                                         model_key=model_key, held=held)
    computed = StateCache.open_or_build(tmp_path / "b", "k" * 64, Model(), examples, progress=False,
                                        model_key=model_key)
    assert from_held.computed == 0 and computed.computed == len(examples)
    for i in range(len(examples)):
        torch.testing.assert_close(from_held[i], computed[i].float(), atol=1e-6, rtol=1e-6)
    # states kept for another model key (other taps, say) or another dtype are not used
    assert len(HeldStates(generated.states_folder(path), "x" * 64, "float32")) == 0
    assert len(HeldStates(generated.states_folder(path), model_key, "bfloat16")) == 0
    other = StateCache.open_or_build(tmp_path / "c", "k" * 64, Model(), examples, progress=False,
                                     model_key="x" * 64, held=HeldStates(generated.states_folder(path), "x" * 64,
                                                                         "float32"))
    assert other.computed == len(examples)
    # nor states held for another model key than the cache's own
    mismatched = StateCache.open_or_build(tmp_path / "d", "k" * 64, Model(), examples, progress=False,
                                          model_key="y" * 64, held=held)
    assert mismatched.computed == len(examples)


def test_an_interrupted_generation_keeps_the_states_of_its_finished_batches(tmp_path, large, prompts, eos,
                                                                            counted):
    capture = generated.StateCapture(taps(large), "float32", "m" * 64)
    key = generated.generation_key(large, "tiny", prompts, MAX_LENGTH, eos)
    path = tmp_path / f"{key}.json"
    counted.update(die_at=3)  # batches of 3: two kept, the third interrupted
    with pytest.raises(KeyboardInterrupt):
        generated.load_or_generate(path, key, large, prompts, MAX_LENGTH, eos, PAD, capture=capture)
    assert len(HeldStates(generated.states_folder(path), "m" * 64, "float32")) == 6
    counted.update(n=0, die_at=None)
    answers, info = generated.load_or_generate(path, key, large, prompts, MAX_LENGTH, eos, PAD, capture=capture)
    assert info == {"generated": True, "resumed": 6}
    held = HeldStates(generated.states_folder(path), "m" * 64, "float32")
    assert len(held) == len(prompts)
    for p, a in zip(prompts, answers):
        torch.testing.assert_close(held[ids_hash(p + a)], recomputed(large, p + a), atol=1e-6, rtol=1e-6)
