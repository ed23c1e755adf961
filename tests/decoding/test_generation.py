"""Cached decoding equals a full recompute; sampling, EOS, stop strings and streaming behave."""

from __future__ import annotations

import pytest
import torch

from llm_modules.errors import LLMModulesError

from ..helpers import PAIRS, compose, nudge, random_ids

NO_EOS: list[int] = []


def left_padded_batch(model):
    short, long_ = random_ids(model, 1, 4, seed=11), random_ids(model, 1, 9, seed=12)
    ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long_])
    mask = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(short)], 1), torch.ones_like(long_)])
    return ids, mask


@pytest.mark.parametrize("large,small", PAIRS)
@pytest.mark.parametrize("head", ["new", "residual"])
def test_greedy_cached_equals_full_recompute(tiny_models, large, small, head):
    model = compose(tiny_models, large, small, head=head)
    nudge(model, scale=0.5)  # far enough from init that the small side changes the tokens
    ids, mask = left_padded_batch(model)
    # The repetition penalty keeps random tiny models from repeating one token, so the check has teeth.
    options = dict(max_new_tokens=24, eos_token_id=NO_EOS, repetition_penalty=1.5)
    cached = model.generate(ids, mask, use_cache=True, **options)
    recomputed = model.generate(ids, mask, use_cache=False, **options)
    assert cached.shape == (2, 9 + 24)
    assert torch.equal(cached[:, :9], ids)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[1, 9:].tolist())) > 1  # not a degenerate constant stream


def test_cached_step_logits_match_recomputed_logits(tiny_models):
    model = compose(tiny_models, "qwen2", "gpt_neo")
    nudge(model)
    ids = random_ids(model, 1, 12)
    full = model(input_ids=ids).logits
    out = model(input_ids=ids[:, :6], cache=model.new_cache())
    steps = [out.logits]
    for t in range(6, 12):
        out = model(input_ids=ids[:, t : t + 1], attention_mask=torch.ones(1, t + 1, dtype=torch.long),
                    cache=out.cache)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_eos_stops_a_row_and_pads_it(tiny_models):
    model = compose(tiny_models)
    nudge(model)
    ids = random_ids(model, 1, 5)
    free = model.generate(ids, max_new_tokens=8, eos_token_id=NO_EOS)
    first = int(free[0, 5])
    stopped = model.generate(ids, max_new_tokens=8, eos_token_id=first)
    assert stopped.shape[1] == 6 and int(stopped[0, 5]) == first
    at_least = model.generate(ids, max_new_tokens=8, min_new_tokens=3, eos_token_id=first)
    assert at_least.shape[1] >= 8 and first not in at_least[0, 5:7].tolist()


def test_sampling_is_reproducible_with_a_generator_and_uses_processors(tiny_models):
    model = compose(tiny_models)
    nudge(model)
    ids = random_ids(model, 1, 5)
    options = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                   repetition_penalty=1.2, eos_token_id=NO_EOS)
    a = model.generate(ids, generator=torch.Generator().manual_seed(1), **options)
    b = model.generate(ids, generator=torch.Generator().manual_seed(1), **options)
    assert torch.equal(a, b)
    top1 = model.generate(ids, generator=torch.Generator().manual_seed(2), **{**options, "top_k": 1,
                                                                             "repetition_penalty": 1.0})
    greedy = model.generate(ids, max_new_tokens=12, eos_token_id=NO_EOS)
    assert torch.equal(top1, greedy)  # top_k=1 sampling is greedy: the warper really ran
    with pytest.raises(LLMModulesError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)


class CharTokenizer:
    """Decodes id i as chr(97 + i % 26): enough for stop-string tests."""

    def batch_decode(self, rows, skip_special_tokens=False):
        return ["".join(chr(97 + int(i) % 26) for i in row) for row in rows]


def test_stop_strings_end_generation(tiny_models):
    model = compose(tiny_models)
    nudge(model)
    ids = random_ids(model, 1, 5)
    free = model.generate(ids, max_new_tokens=10, eos_token_id=NO_EOS)
    text = CharTokenizer().batch_decode(free[:, 5:])[0]
    stop = text[3:5]
    stopped = model.generate(ids, max_new_tokens=10, eos_token_id=NO_EOS, stop_strings=[stop],
                             tokenizer=CharTokenizer())
    produced = CharTokenizer().batch_decode(stopped[:, 5:])[0]
    assert produced.endswith(stop) and len(produced) == text.index(stop) + len(stop)


def test_streamer_receives_prompt_then_each_token(tiny_models):
    model = compose(tiny_models)
    ids = random_ids(model, 1, 5)

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.ended = True

    recorder = Recorder()
    out = model.generate(ids, max_new_tokens=6, eos_token_id=NO_EOS, streamer=recorder)
    assert recorder.ended and torch.equal(recorder.chunks[0], ids)
    assert torch.equal(torch.cat([c.view(-1) for c in recorder.chunks[1:]]), out[0, 5:])


def test_right_padded_batch_is_refused(tiny_models):
    model = compose(tiny_models)
    ids = random_ids(model, 2, 6)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with pytest.raises(LLMModulesError, match="left-padded"):
        model.generate(ids, mask, max_new_tokens=2)


@pytest.mark.parametrize("large,small", PAIRS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_models, large, small, use_cache):
    # float64: padding changes the order of float sums (logits move by ~1e-5 in float32), which
    # can flip a near-tie; in float64 only a real difference between batch and alone shows.
    model = compose(tiny_models, large, small, head="new", dtype=torch.float64)
    nudge(model, scale=0.5)
    prompts = [random_ids(model, 1, n, seed=20 + n)[0] for n in (3, 11, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), 5), p]) for p in prompts])  # (3, 11), left pad
    mask = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones_like(p)])
                        for p in prompts])
    options = dict(max_new_tokens=12, eos_token_id=NO_EOS, repetition_penalty=1.5, use_cache=use_cache)
    batched = model.generate(ids, mask, **options)[:, width:]  # (3, 12)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **options)[0, len(prompt):]
        assert torch.equal(batched[row], alone), (row, batched[row].tolist(), alone.tolist())
    assert len(set(batched.flatten().tolist())) > 3  # not a degenerate constant stream


def test_the_repetition_penalty_is_bounded_so_sampling_stays_finite():
    """Issue 35, defect 8: 1e-40 turned a logit into 1e40 (inf, then NaN probabilities when sampling); the
    bounds keep even a large logit finite at the lowest sampling temperature."""
    from llm_modules.decoding.sampling import (
        MAX_REPETITION_PENALTY,
        MIN_REPETITION_PENALTY,
        MIN_TEMPERATURE,
        SamplingOptions,
    )

    for value in (1e-40, 0.0, 0.009, 101.0, 1e40):
        with pytest.raises(LLMModulesError, match="repetition_penalty must be between 0.01 and 100"):
            SamplingOptions(repetition_penalty=value)
    scores = torch.tensor([[300.0, -300.0, 5.0, 0.0]], dtype=torch.float32)  # (1, V)
    for penalty in (MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY):
        options = SamplingOptions(do_sample=True, temperature=MIN_TEMPERATURE, repetition_penalty=penalty)
        processed = options.processors(1, [])(torch.tensor([[0, 1, 2]]), scores.clone())
        assert torch.isfinite(torch.softmax(processed, -1)).all(), penalty
