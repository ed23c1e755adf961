"""Continuous batching: rows that join and leave a running batch decode what they decode alone."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_modules.decoding.engine import DecodeBatch, Engine, EngineFull, Sequence
from llm_modules.decoding.generation import generate
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.errors import LLMModulesError

from ..helpers import compose, nudge, random_ids

# (prompt length, max new tokens, step at which the row joins): rows of different lengths join a
# running batch and leave it at different steps, the longest prompt leaving first.
SCHEDULE = [(3, 10, 0), (13, 4, 0), (7, 9, 2), (5, 6, 5)]


def composed(tiny_models, large, small, bridge):
    # float64: padding changes the order of float sums (logits move by ~1e-5 in float32), which
    # can flip a near-tie; in float64 only a real difference between batch and alone shows.
    model = compose(tiny_models, large, small, head="residual", bridge=bridge, dtype=torch.float64)
    nudge(model, scale=0.5)  # far enough from init that the small side changes the tokens
    return model


def plain(tiny_models, family):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float64).eval()


def prompts_for(model, vocab):
    return [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(40 + n)).tolist()
            for n, _, _ in SCHEDULE]


def run_schedule(model, prompts, options):
    """Decode SCHEDULE on one DecodeBatch; returns each row's tokens and the widths seen."""
    batch = DecodeBatch(model, pad_id=0)
    rows = [Sequence(p, SamplingOptions(max_new_tokens=m, **options), eos_ids=[]) for p, (_, m, _) in
            zip(prompts, SCHEDULE)]
    widths, step = [], 0
    while step == 0 or batch.rows:
        batch.add([r for r, (_, _, join) in zip(rows, SCHEDULE) if join == step])
        widths.append((len(batch.rows), batch.width, int((batch.mask == 0).sum())))
        batch.step()
        step += 1
    return rows, widths


def check_rows_equal_alone(model, vocab, options):
    prompts = prompts_for(model, vocab)
    rows, widths = run_schedule(model, prompts, options)
    assert max(n for n, _, _ in widths) == 3 and any(padded for _, _, padded in widths)  # really batched, padded
    for row, prompt, (_, max_new, _) in zip(rows, prompts, SCHEDULE):
        # alone and recomputing the whole prefix each step: no cache is moved between rows
        alone = generate(model, torch.tensor([prompt], device=model.device), max_new_tokens=max_new, eos_token_id=[],
                         use_cache=False, **options)[0, len(prompt):].tolist()
        assert row.tokens == alone and row.finish_reason == "length", (prompt, row.tokens, alone)
    assert len(set(sum((r.tokens for r in rows), []))) > 5  # not a degenerate constant stream
    return widths


@pytest.mark.parametrize("large,small,bridge", [
    ("qwen2", "llama", "eca"), ("llama", "gpt_neo", "xattn"), ("gpt2", "qwen2", "ladder"),
])
def test_composed_rows_joining_and_leaving_decode_what_they_decode_alone(tiny_models, large, small, bridge):
    model = composed(tiny_models, large, small, bridge)
    widths = check_rows_equal_alone(model, model.vocab_size, dict(repetition_penalty=1.5))
    # the 13-token prompt leaves after 4 tokens: the columns only it needed are cut away
    assert widths[4][1] < widths[3][1] + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="decoding on a CUDA GPU: needs one")
@pytest.mark.parametrize("bridge", ["eca", "ladder", "xattn"])
def test_composed_rows_on_a_gpu_decode_what_they_decode_alone(tiny_models, bridge):
    model = composed(tiny_models, "qwen2", "llama", bridge).to("cuda")
    check_rows_equal_alone(model, model.vocab_size, dict(repetition_penalty=1.5))
    assert model.device.type == "cuda"


@pytest.mark.parametrize("family,options", [
    ("llama", {}),  # plain greedy: one argmax over the batch
    ("gpt_neo", dict(repetition_penalty=1.5)),  # its random weights repeat one token without a penalty
])
def test_plain_model_rows_joining_and_leaving_decode_what_they_decode_alone(tiny_models, family, options):
    model = plain(tiny_models, family)
    check_rows_equal_alone(model, model.config.vocab_size, options)


def test_seeded_sampling_in_a_batch_equals_alone(tiny_models):
    model = composed(tiny_models, "qwen2", "llama", "eca")
    options = SamplingOptions(max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.95)
    prompt, other = random_ids(model, 1, 6, seed=5)[0].tolist(), random_ids(model, 1, 9, seed=6)[0].tolist()

    def seq(p, seed):
        return Sequence(p, options, [], generator=torch.Generator().manual_seed(seed))

    alone = DecodeBatch(model)
    first = seq(prompt, 7)
    alone.add([first])
    while alone.rows:
        alone.step()
    batch = DecodeBatch(model)
    second, neighbour = seq(prompt, 7), seq(other, 8)
    batch.add([neighbour])
    batch.step()
    batch.add([second])
    while batch.rows:
        batch.step()
    assert second.tokens == first.tokens and len(first.tokens) == 8
    different = seq(prompt, 9)
    alone.add([different])
    while alone.rows:
        alone.step()
    assert different.tokens != first.tokens  # the seed matters


def test_engine_thread_serves_concurrent_requests_and_a_cancelled_row_leaves(tiny_models):
    model = composed(tiny_models, "qwen2", "llama", "eca")
    engine = Engine(model, tokenizer=None, max_batch=4, max_queue=4).start()
    try:
        done = {name: threading.Event() for name in ("long", "short")}
        first_token = threading.Event()

        def watcher(name):
            def on_update(seq):
                if seq.tokens:
                    first_token.set()
                if seq.finished:
                    done[name].set()
            return on_update

        options = dict(eos_token_ids=[])
        long_ = engine.submit(engine.sequence(random_ids(model, 1, 5, seed=1)[0].tolist(),
                                              SamplingOptions(max_new_tokens=200, **options), on_update=watcher("long")))
        assert first_token.wait(30)
        short_prompt = random_ids(model, 1, 8, seed=2)[0].tolist()
        short = engine.submit(engine.sequence(short_prompt, SamplingOptions(max_new_tokens=12, **options),
                                              on_update=watcher("short")))
        long_.cancel()
        assert done["long"].wait(30) and done["short"].wait(30)
        assert long_.finish_reason == "cancelled" and len(long_.tokens) < 200
        assert short.finish_reason == "length"
        alone = generate(model, torch.tensor([short_prompt]), max_new_tokens=12, eos_token_id=[])
        assert short.tokens == alone[0, 8:].tolist()
        assert engine.stats.running == 0 and engine.stats.queued == 0 and not engine.batch.rows
    finally:
        engine.stop()


def test_engine_refuses_beyond_batch_plus_queue_and_too_long_requests(tiny_models):
    model = compose(tiny_models, "qwen2", "llama")  # the small llama places 256 positions
    engine = Engine(model, tokenizer=None, max_batch=1, max_queue=1)  # not started: nothing is admitted
    options = SamplingOptions(max_new_tokens=4)
    engine.submit(engine.sequence([1, 2, 3], options))
    engine.submit(engine.sequence([1, 2, 3], options))
    with pytest.raises(EngineFull, match="busy"):
        engine.submit(engine.sequence([1, 2, 3], options))
    with pytest.raises(LLMModulesError, match=r"exceeds the 256 positions.*at most 253 new tokens"):
        engine.sequence([1, 2, 3], SamplingOptions(max_new_tokens=254))


# ---------------------------------------------------------------------- one request never fails another
def greedy_alone(model, prompt, max_new):
    return generate(model, torch.tensor([prompt]), max_new_tokens=max_new, eos_token_id=[])[0, len(prompt):].tolist()


def overflowing(seq_options):
    """A sampling row whose temperature overflows every score to inf (as temperature 1e-300 did before
    requests were validated): its draw raises inside the batch's step."""
    from transformers import TemperatureLogitsWarper

    def make(prompt, **kwargs):
        seq = Sequence(prompt, SamplingOptions(do_sample=True, **seq_options), [],
                       generator=torch.Generator().manual_seed(0), **kwargs)
        seq.processors.append(TemperatureLogitsWarper(1e-300))
        return seq
    return make


def test_a_row_whose_sampling_fails_ends_alone_and_the_others_decode_as_alone(tiny_models):
    model = composed(tiny_models, "qwen2", "llama", "eca")
    good_prompt, bad_prompt = random_ids(model, 1, 6, seed=5)[0].tolist(), random_ids(model, 1, 4, seed=6)[0].tolist()
    good = Sequence(good_prompt, SamplingOptions(max_new_tokens=8, repetition_penalty=1.5), [])
    bad = overflowing(dict(max_new_tokens=8))(bad_prompt)
    batch = DecodeBatch(model)
    batch.add([good, bad])
    while batch.rows:
        batch.step()
    assert bad.finish_reason == "error" and "probability tensor" in bad.error and bad.tokens == []
    assert isinstance(bad.exception, RuntimeError)
    expected = generate(model, torch.tensor([good_prompt]), max_new_tokens=8, eos_token_id=[],
                        repetition_penalty=1.5)[0, 6:].tolist()
    assert good.finish_reason == "length" and good.tokens == expected


def test_a_row_whose_forward_fails_ends_alone_and_the_others_decode_as_alone(tiny_models):
    model = composed(tiny_models, "qwen2", "llama", "eca")
    batch = DecodeBatch(model)
    forward = batch.stepper.forward

    def limited(ids, mask, cache, use_cache):  # as a learned position table of 15 rows would
        if int(mask.sum(1).max()) > 15:
            raise IndexError("index out of range in self")
        return forward(ids, mask, cache, use_cache)

    batch.stepper.forward = limited
    long_prompt, short_prompt, late_prompt = (random_ids(model, 1, n, seed=n)[0].tolist() for n in (10, 3, 5))
    long_ = Sequence(long_prompt, SamplingOptions(max_new_tokens=20), [])
    short = Sequence(short_prompt, SamplingOptions(max_new_tokens=9), [])
    late = Sequence(late_prompt, SamplingOptions(max_new_tokens=6), [])
    too_long = Sequence(random_ids(model, 1, 16, seed=16)[0].tolist(), SamplingOptions(max_new_tokens=2), [])
    batch.add([long_, short])
    steps = 0
    while batch.rows:
        batch.step()
        steps += 1
        if steps == 2:
            batch.add([late, too_long])  # prefilled together: the one that cannot be placed fails alone
    assert long_.finish_reason == "error" and long_.error.startswith("IndexError") and len(long_.tokens) == 6
    assert too_long.finish_reason == "error" and too_long.tokens == []
    assert short.finish_reason == "length" and short.tokens == greedy_alone(model, short_prompt, 9)
    assert late.finish_reason == "length" and late.tokens == greedy_alone(model, late_prompt, 6)


def test_engine_failures_are_logged_once_counted_and_kept_in_a_bounded_list(tiny_models, caplog):
    from collections import deque

    model = composed(tiny_models, "qwen2", "llama", "eca")
    engine = Engine(model, tokenizer=None, max_batch=4, max_queue=4)
    engine.stats.errors = deque(maxlen=2)
    done = threading.Semaphore(0)
    bad = overflowing(dict(max_new_tokens=5))
    prompt = random_ids(model, 1, 5, seed=1)[0].tolist()
    rows = [bad(prompt, request_id=f"req-{i}", on_update=lambda s: s.finished and done.release()) for i in range(3)]
    good = engine.sequence(prompt, SamplingOptions(max_new_tokens=5, eos_token_ids=[]), request_id="good",
                           on_update=lambda s: s.finished and done.release())
    with caplog.at_level("ERROR", logger="llm_modules.decoding.engine"):
        for seq in [*rows, good]:
            engine.submit(seq)
        engine.start()
        try:
            assert all(done.acquire(timeout=30) for _ in range(4))
        finally:
            engine.stop()
    assert good.finish_reason == "length" and good.tokens == greedy_alone(model, prompt, 5)
    assert engine.stats.failed == 3 and [e["request_id"] for e in engine.stats.errors] == ["req-1", "req-2"]
    assert {e["type"] for e in engine.stats.errors} == {"RuntimeError"}
    logged = [r.getMessage() for r in caplog.records if r.name == "llm_modules.decoding.engine"]
    assert len(logged) == 3 and all(f"req-{i}" in m and "RuntimeError" in m for i, m in enumerate(logged))


def test_rows_being_admitted_count_against_the_queue(tiny_models):
    model = compose(tiny_models, "qwen2", "llama")
    engine = Engine(model, tokenizer=None, max_batch=2, max_queue=1)  # not started: the test admits by hand
    options = SamplingOptions(max_new_tokens=4)
    for _ in range(3):
        engine.submit(engine.sequence([1, 2, 3], options))
    admitted = engine._admit()  # two rows taken for prefill: neither in the batch nor in the queue
    assert len(admitted) == 2 and len(engine._waiting) == 1 and not engine.batch.rows
    with pytest.raises(EngineFull, match="2 requests decoding"):
        engine.submit(engine.sequence([1, 2, 3], options))


def test_the_context_limit_is_the_smaller_of_the_two_models(tiny_models):
    model = compose(tiny_models, "gpt2", "llama")  # gpt2: 64 learned positions; the small llama places 256
    assert (model.large_max_positions, model.small_max_positions, model.max_positions) == (64, 256, 64)
    engine = Engine(model, tokenizer=None)
    assert engine.max_positions == 64
    with pytest.raises(LLMModulesError, match=r"exceeds the 64 positions.*at most 4 new tokens"):
        engine.sequence(list(range(60)), SamplingOptions(max_new_tokens=5))
    with pytest.raises(LLMModulesError, match=r"longer than the model can position \(64"):
        model(input_ids=torch.ones(1, 65, dtype=torch.long))


def test_sampling_options_refuse_a_temperature_that_overflows_and_values_that_are_not_finite():
    with pytest.raises(LLMModulesError, match="temperature must be >= 0.01"):
        SamplingOptions(do_sample=True, temperature=1e-300)
    for name in ("temperature", "top_p", "repetition_penalty"):
        with pytest.raises(LLMModulesError, match=f"{name} must be a finite number"):
            SamplingOptions(**{name: float("nan")})
    SamplingOptions(do_sample=False, temperature=1e-300)  # greedy ignores the temperature


# ---------------------------------------------------------------------- stop strings on a tail
class CountingTokenizer:
    """A tokenizer whose decodes are counted by the number of tokens each one reads."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, []

    def batch_decode(self, sequences, **kwargs):
        self.decoded += [len(s) for s in sequences]
        return self.inner.batch_decode(sequences, **kwargs)


def feed(tokens, stops, tokenizer):
    seq = Sequence([1], SamplingOptions(max_new_tokens=len(tokens), stop_strings=stops), [], tokenizer)
    for token in tokens:
        seq.append(token)
        if seq.finished:
            break
    return seq


def test_stop_strings_are_found_across_token_boundaries_on_a_tail_of_the_reply():
    """Issue 35, defect 10: each step decodes a bounded tail (not the whole reply, which made long replies
    ~55% slower), and finds exactly what the whole text holds: a stop string split over tokens, one after
    multi-byte characters split over tokens, and no stop where the whole text has none."""
    from ..helpers import gpt2_tokenizer

    gpt2 = gpt2_tokenizer()
    long_text = "The quick brown fox jumps over the lazy dog. " * 40
    for text, stop in [(long_text + "Answer: 42", "Answer: 4"), (long_text + "naïve café ☃☃ end", "☃ en"),
                       (long_text + "so it ends THE END", "S THE E")]:
        tokens = gpt2(text).input_ids
        tokenizer = CountingTokenizer(gpt2)
        seq = feed(tokens, [stop], tokenizer)
        whole = [i for i in range(1, len(tokens) + 1) if stop in gpt2.decode(tokens[:i])]
        if whole:  # it stops at the first token after which the whole text holds the stop string
            assert seq.finish_reason == "stop" and len(seq.tokens) == whole[0], (stop, len(seq.tokens), whole[0])
        else:
            assert seq.finish_reason == "length"
        assert max(tokenizer.decoded) < 40 < len(tokens)  # a tail, not the whole reply
    # a string of the text's words, but never in this order: no false stop
    tokens = gpt2(long_text).input_ids
    assert feed(tokens, ["dog. quick"], CountingTokenizer(gpt2)).finish_reason == "length"
    # a token that decodes to nothing (half a character) still counts toward the tail it reads
    snowmen = gpt2("☃" * 30 + " stop here").input_ids
    assert feed(snowmen, ["☃☃☃☃☃☃☃☃☃☃ st"], CountingTokenizer(gpt2)).finish_reason == "stop"
