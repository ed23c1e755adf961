"""Speculative decoding with the composed model as drafter: greedy output is the target's own, token for
token (every bridge, batched rows joining and leaving, a deliberately bad drafter); sampling follows the
target's distribution; rollback leaves caches equal to a fresh recompute."""

from __future__ import annotations

import threading

import pytest
import torch

from llm_modules import LLMModulesModel
from llm_modules.decoding.engine import DecodeBatch, Sequence
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.acceptance import (
    accept_tree_greedy,
    accept_tree_sampled,
)
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.target import close_holes, keep_paths, path_mask
from llm_modules.decoding.speculative.tree import DraftTree

from ..helpers import (
    OPTIONS,
    assert_drafter_equals_a_recompute,
    decode_rows,
    joint_chi_square,
    target_joint,
)
from ..helpers import nudge_gates as nudge


def _drafter(pair, bridge, inputs="mapped", seed=0, **extra):
    torch.manual_seed(seed)
    model = LLMModulesModel.compose(large=pair["large"], small=pair["small"], bridge=bridge, small_inputs=inputs,
                                    head="projected", **{**OPTIONS[bridge], **extra})
    nudge(model)
    return model.double().eval()


def _prompts(vocab, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _target_alone(target, prompts, options):
    return decode_rows(DecodeBatch(target), prompts, options)


@pytest.mark.parametrize("bridge, inputs", [("eca", "mapped"), ("ladder", "mapped"), ("xattn", "mapped"),
                                            ("eca", "bridge")])
def test_greedy_speculative_output_is_the_targets_own(mapped_pair, bridge, inputs):
    drafter = _drafter(mapped_pair, bridge, inputs)
    target = drafter.large
    prompts = _prompts(drafter.vocab_size)
    options = [SamplingOptions(max_new_tokens=n) for n in (12, 7, 15, 9)]
    alone = _target_alone(target, prompts, options)
    for k in (1, 3):
        spec = SpeculativeBatch(target, ComposedProposer(drafter, draft_tokens=k))
        assert decode_rows(spec, prompts, options) == alone
        assert spec.stats.passes > 0


def test_rows_joining_and_leaving_keep_the_targets_output(mapped_pair):
    drafter = _drafter(mapped_pair, "xattn")
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, n=6, seed=4)
    options = [SamplingOptions(max_new_tokens=n) for n in (5, 14, 9, 11, 3, 13)]
    alone = _target_alone(target, prompts, options)
    for join_at in (0, 2, 5):
        spec = SpeculativeBatch(target, ComposedProposer(drafter, draft_tokens=3))
        assert decode_rows(spec, prompts, options, join_at=join_at) == alone
        # rows verified per pass: 1 to 6, fewer once rows leave; every verified row drafted 3 tokens
        assert spec.stats.passes <= spec.stats.row_passes < 6 * spec.stats.passes
        assert spec.stats.drafted == 3 * spec.stats.row_passes


def test_a_bad_drafter_still_gives_the_targets_tokens_only_slower(mapped_pair):
    drafter = _drafter(mapped_pair, "eca")
    with torch.no_grad():
        drafter.head.up.weight.normal_(0, 5.0)  # drafts are noise
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, seed=7)
    options = [SamplingOptions(max_new_tokens=10)] * 4
    spec = SpeculativeBatch(target, ComposedProposer(drafter, draft_tokens=4))
    assert decode_rows(spec, prompts, options) == _target_alone(target, prompts, options)
    assert spec.stats.accepted < spec.stats.drafted / 4


def test_a_drafter_that_is_the_target_gets_every_draft_accepted(mapped_pair):
    """Sanity of the acceptance count: a drafter proposing exactly the target's tokens is always right."""

    class Oracle:
        taps: list[int] = []
        draft_tokens = 3

        def __init__(self, target):
            self.target, self.rows = target, []

        def join(self, rows, ids, mask, states):
            self.rows += [row[m.bool()].tolist() for row, m in zip(ids, mask)]

        def propose(self, first, k, rows):
            out = []
            for seq, f in zip(rows, first.tolist()):
                ids = torch.tensor([seq.prompt + seq.tokens])
                from llm_modules.decoding.generation import generate

                out.append(generate(self.target, ids, max_new_tokens=k)[0, ids.shape[1]:].tolist())
            return torch.tensor(out), None

        def commit(self, accepted, tokens, states):
            pass

        def keep(self, index):
            pass

    drafter = _drafter(mapped_pair, "eca")
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, n=2)
    options = [SamplingOptions(max_new_tokens=13)] * 2
    spec = SpeculativeBatch(target, Oracle(target))
    assert decode_rows(spec, prompts, options) == _target_alone(target, prompts, options)


class PartlyRight:
    """Wraps a drafter: its state advances as usual, but some of its drafts are replaced by the target's own
    continuation, so rows accept different numbers of drafts (0 to K) and every rollback path runs."""

    def __init__(self, drafter, target, seed=0):
        self.inner, self.target = drafter, target
        self.taps, self.draft_tokens = drafter.taps, drafter.draft_tokens
        self.g = torch.Generator().manual_seed(seed)
        self.accepted_counts = []

    def join(self, rows, ids, mask, states):
        self.inner.join(rows, ids, mask, states)

    def propose(self, first, k, rows):
        from llm_modules.decoding.generation import generate

        drafts, q = self.inner.propose(first, k, rows)
        for b, (seq, f) in enumerate(zip(rows, first.tolist())):
            ids = torch.tensor([seq.prompt + seq.tokens + [f]])
            right = generate(self.target, ids, max_new_tokens=k)[0, ids.shape[1]:]
            good = int(torch.randint(0, k + 1, (1,), generator=self.g))
            drafts[b, :good] = right[:good]
        return drafts, q

    def commit(self, accepted, tokens, states):
        self.accepted_counts += accepted.tolist()
        self.inner.commit(accepted, tokens, states)

    def keep(self, index):
        self.inner.keep(index)


@pytest.mark.parametrize("bridge", ["eca", "ladder", "xattn"])
def test_rows_accepting_different_numbers_of_drafts_keep_the_targets_output(mapped_pair, bridge):
    drafter = _drafter(mapped_pair, bridge)
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, n=5, seed=9)
    options = [SamplingOptions(max_new_tokens=n) for n in (16, 11, 19, 6, 14)]
    alone = _target_alone(target, prompts, options)
    wrapped = PartlyRight(ComposedProposer(drafter, draft_tokens=3), target)
    spec = SpeculativeBatch(target, wrapped)
    assert decode_rows(spec, prompts, options, join_at=1) == alone
    assert set(wrapped.accepted_counts) == {0, 1, 2, 3}
    # every token given is counted, the last step's too (rows finishing on their pending token)
    assert spec.stats.emitted == sum(len(tokens) for tokens in alone)


@pytest.mark.parametrize("holes", [0, 10_000])
def test_rollbacks_holes_closed_every_pass_or_never_keep_the_targets_output(mapped_pair, holes):
    """A rollback leaves holes after a row's path shorter than the pass's longest (masked columns); closing
    them (every pass here) and never closing them both decode as the target alone does."""
    drafter = _drafter(mapped_pair, "ladder")
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, n=5, seed=4)
    options = [SamplingOptions(max_new_tokens=n) for n in (18, 9, 21, 7, 15)]
    alone = _target_alone(target, prompts, options)
    spec = SpeculativeBatch(target, PartlyRight(ComposedProposer(drafter, draft_tokens=3), target))
    spec.HOLES = spec.HOLE_SHARE = holes
    assert decode_rows(spec, prompts, options, join_at=2) == alone
    assert (spec.stats.closed > 0) == (holes == 0)


@pytest.mark.parametrize("bridge", ["eca", "ladder", "xattn"])
def test_the_drafter_after_rollbacks_equals_a_fresh_recompute(mapped_pair, bridge):
    """After rounds with rejections, the drafter's next logits equal the same model run from scratch over the
    verified tokens, with the target's states and the sources it trained with (blocks = rounds)."""
    k = 3
    drafter = _drafter(mapped_pair, bridge)
    target = drafter.large
    prompt = _prompts(drafter.vocab_size, n=1, seed=3)[0]
    wrapped = PartlyRight(ComposedProposer(drafter, draft_tokens=k), target, seed=2)
    spec = SpeculativeBatch(target, wrapped)
    seq = Sequence(prompt, SamplingOptions(max_new_tokens=60), [])
    spec.add([seq])
    for _ in range(5):
        spec.step()
    assert len(set(wrapped.accepted_counts)) > 1
    assert_drafter_equals_a_recompute(wrapped.inner, drafter, spec, seq, prompt, wrapped.accepted_counts, k)


def test_greedy_rule():
    chain = DraftTree.chain(0, [5, 6, 7])  # choices: the target's token after the root and after each draft
    assert accept_tree_greedy(chain, [5, 6, 9, 1]) == ([0, 1, 2], 9)
    assert accept_tree_greedy(chain, [5, 6, 7, 1]) == ([0, 1, 2, 3], 1)
    assert accept_tree_greedy(chain, [4, 6, 7, 1]) == ([0], 4)


def test_the_sampling_rule_gives_the_targets_distribution():
    """Over many draws, the first token kept by the rule follows p whatever q was: chi-square, 4 dof."""
    p = torch.tensor([[0.5, 0.2, 0.1, 0.15, 0.05]] * 3)
    q = torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.1]] * 2)
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(5)
    for _ in range(n):
        d = torch.multinomial(q[0], 2, replacement=True, generator=g)
        path, nxt = accept_tree_sampled(DraftTree.chain(0, d.tolist(), list(q)), p, g)
        counts[int(d[0]) if len(path) > 1 else nxt] += 1
    expected = p[0] * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (counts, expected)  # p = 0.001 for 4 degrees of freedom


def test_keep_paths_keeps_each_rows_past_and_path_where_they_are_and_masks_the_rest():
    t = torch.arange(1, 13).view(2, 6).float()  # 2 past columns, then 4 nodes

    def kept(paths):  # each row's kept columns: the mask's ones
        out, mask = keep_paths(t, 1, 2, paths), path_mask(paths, torch.ones(1, dtype=torch.long))
        assert out.shape[1] == 2 + mask.shape[1]
        return [row[:2].tolist() + row[2:][m.bool()].tolist() for row, m in zip(out, mask)]

    assert kept([[0, 1, 2], [0]]) == [[1, 2, 3, 4, 5], [7, 8, 9]]
    assert kept([[0, 2], [0, 1]]) == [[1, 2, 3, 5], [7, 8, 9, 10]]
    assert kept([[0, 3], [0, 1, 3]]) == [[1, 2, 3, 6], [7, 8, 9, 10, 12]]
    assert path_mask([[0, 3], [0, 1, 2]], torch.ones(1)).tolist() == [[1, 0, 0, 1], [1, 1, 1, 0]]
    assert keep_paths(t, 1, 2, [[0], [0, 1]]).shape[1] == 4  # up to the last kept node of any row
    cache = torch.arange(1, 2 * 2 * 5 * 3 + 1).view(2, 2, 5, 3)  # (B, heads, positions, size), on dim 2
    out, mask = keep_paths(cache, 2, 1, [[0, 2], [0, 1, 3]]), path_mask([[0, 2], [0, 1, 3]], cache)
    assert torch.equal(out[0][:, [0, 1, 3]], cache[0][:, [0, 1, 3]]) and mask[0].tolist() == [1, 0, 1, 0]
    assert torch.equal(out[1], cache[1][:, :5])
    two = torch.arange(1, 9).view(1, 8)  # two columns per position
    assert keep_paths(two, 1, 2, [[0, 2]], per_position=2).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


def test_closing_holes_keeps_every_rows_real_columns_in_order_right_aligned():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1], [0, 0, 0, 1, 0, 1]])
    index = close_holes(mask)
    assert mask.gather(1, index).tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    ids = torch.arange(18).view(3, 6)
    real = ids.gather(1, index)[mask.gather(1, index).bool()]
    assert real.tolist() == ids[mask.bool()].tolist()  # each row's real columns, in order
    assert close_holes(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None


def test_generate_with_a_drafter_gives_the_targets_tokens_and_streams_them_in_order(mapped_pair):
    from llm_modules.decoding.generation import generate

    drafter = _drafter(mapped_pair, "ladder")
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, n=3, seed=5)
    from llm_modules.tensors import left_pad

    ids, mask = left_pad(prompts, 0)
    alone = generate(target, ids, mask, max_new_tokens=11, eos_token_id=[])
    streamed = []
    spec = generate(target, ids, mask, max_new_tokens=11, eos_token_id=[], on_token=streamed.append,
                    drafter=ComposedProposer(drafter, draft_tokens=3))
    assert torch.equal(spec, alone)
    assert torch.equal(torch.stack(streamed, 1), alone[:, ids.shape[1]:])


SAMPLES = 1200


def test_sampled_speculative_tokens_follow_the_targets_distribution(mapped_pair):
    """The first two sampled tokens (top-k 3, so 9 cells) over 1200 seeds: chi-square against the target's
    exact joint distribution, p = 0.001 (26.1 for 8 degrees of freedom; cells merged up to 5 expected)."""
    drafter = _drafter(mapped_pair, "eca").float()
    target = drafter.large
    prompt = _prompts(drafter.vocab_size, n=1, seed=8)[0]
    options = SamplingOptions(max_new_tokens=2, do_sample=True, temperature=1.5, top_k=3)
    eos = []
    joint = target_joint(target, prompt, options)
    n = SAMPLES
    # every seed is a row of one batch (rows keep their own generators): one prefill, a few verify passes
    seqs = [Sequence(prompt, options, eos, generator=torch.Generator().manual_seed(seed)) for seed in range(n)]
    batch = SpeculativeBatch(target, ComposedProposer(drafter, draft_tokens=2))
    batch.add(seqs)
    while batch.rows:
        batch.step()
    chi2 = joint_chi_square(joint, seqs)
    assert chi2 < 26.1, chi2  # p = 0.001 for up to 8 degrees of freedom


def test_a_draft_vocabulary_drafts_only_its_tokens_and_keeps_the_targets_output(mapped_pair):
    from llm_modules.decoding.speculative.composed_proposer import draft_vocabulary

    drafter = _drafter(mapped_pair, "eca")
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, seed=6)
    options = [SamplingOptions(max_new_tokens=10)] * 4
    alone = _target_alone(target, prompts, options)
    vocab = draft_vocabulary(alone + prompts, 30, always=[0])
    assert vocab.numel() <= 31 and torch.equal(vocab, vocab.sort().values)
    inner = ComposedProposer(drafter, draft_tokens=3, vocab=vocab)
    proposed = []
    original = inner.propose

    def spy(first, k, rows):
        drafts, q = original(first, k, rows)
        proposed.extend(drafts.flatten().tolist())
        return drafts, q

    inner.propose = spy
    assert decode_rows(SpeculativeBatch(target, inner), prompts, options) == alone
    assert proposed and set(proposed) <= set(vocab.tolist())


def test_a_joining_prompt_runs_the_targets_head_on_its_last_position_only(mapped_pair):
    """Prefill needs one row of logits per prompt: the LM head over every prompt position cost T x |V|
    (0.6 GB of float32 logits for a 1,000-token prompt with a 152k vocabulary). Both batches, same tokens."""
    drafter = _drafter(mapped_pair, "ladder")
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, n=3, seed=2)
    options = [SamplingOptions(max_new_tokens=6)] * 3
    seen = []
    hook = target.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[1] if args[0].is_contiguous() else "strided"))
    try:
        for batch in (DecodeBatch(target), SpeculativeBatch(target, ComposedProposer(drafter, draft_tokens=2))):
            seen.clear()
            batch.add([Sequence(p, o, []) for p, o in zip(prompts, options)])
            # every head call at the join (the drafter's too) over one position, in a contiguous tensor (a
            # strided view of the prompt's states made bfloat16's linear hundreds of times slower on a CPU)
            assert seen and set(seen) == {1}, seen
    finally:
        hook.remove()
    alone = [_target_alone(target, [p], [o])[0] for p, o in zip(prompts, options)]
    assert decode_rows(SpeculativeBatch(target, ComposedProposer(drafter, draft_tokens=2)), prompts, options) == alone


# ---------------------------------------------------------------------- one request never fails another
def _limited(call, limit, prefill_only=False):
    """`call` (a stepper's forward or run), raising as a learned position table of `limit` rows would once a
    row reads more than `limit` positions (at its prefill only, with prefill_only)."""

    def limited(ids, mask, cache, *rest, **kw):
        if int(mask.sum(1).max()) > limit and (cache is None or not prefill_only):
            raise IndexError("index out of range in self")
        return call(ids, mask, cache, *rest, **kw)
    return limited


@pytest.mark.parametrize("speculative", [False, True])
def test_a_prompt_whose_prefill_fails_ends_alone_and_its_neighbours_decode_as_alone(mapped_pair, speculative):
    """Issue 35, defect 5: the rows that joined with a prompt whose prefill fails decode on (both batches)."""
    drafter = _drafter(mapped_pair, "eca")
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, n=2, seed=11)
    options = [SamplingOptions(max_new_tokens=n) for n in (9, 7)]
    alone = _target_alone(target, prompts, options)
    batch = SpeculativeBatch(target, ComposedProposer(drafter, draft_tokens=2)) if speculative else DecodeBatch(target)
    if speculative:
        batch.stepper.run = _limited(batch.stepper.run, 12, prefill_only=True)
    else:
        batch.stepper.forward = _limited(batch.stepper.forward, 12, prefill_only=True)
    long_ = Sequence(list(range(3, 19)), SamplingOptions(max_new_tokens=4), [])
    seqs = [Sequence(p, o, []) for p, o in zip(prompts, options)]
    batch.add([seqs[0], long_, seqs[1]])
    while batch.rows:
        batch.step()
    assert long_.finish_reason == "error" and long_.error.startswith("IndexError") and long_.tokens == []
    assert [s.finish_reason for s in seqs] == ["length", "length"] and [s.tokens for s in seqs] == alone


def test_a_row_whose_own_choice_fails_in_a_verify_pass_ends_alone_and_the_others_decode_as_alone(mapped_pair):
    """A row's processors raise while its drafts are checked: that row ends with its error after the tokens it
    had, the others give the target's own tokens (the per-row guard the plain batch has)."""
    drafter = _drafter(mapped_pair, "xattn")
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, n=3, seed=12)
    options = [SamplingOptions(max_new_tokens=8)] * 3
    alone = _target_alone(target, prompts, options)
    batch = SpeculativeBatch(target, ComposedProposer(drafter, draft_tokens=2))
    bad = Sequence(prompts[0], SamplingOptions(max_new_tokens=20), [])

    def breaks_later(ids, scores):
        if ids.shape[1] > len(prompts[0]) + 4:
            raise ZeroDivisionError("division by zero")
        return scores

    bad.processors.append(breaks_later)
    seqs = [Sequence(p, o, []) for p, o in zip(prompts, options)]
    batch.add([bad, *seqs])
    while batch.rows:
        batch.step()
    assert bad.finish_reason == "error" and bad.error.startswith("ZeroDivisionError") and 0 < len(bad.tokens) < 8
    assert [s.finish_reason for s in seqs] == ["length"] * 3 and [s.tokens for s in seqs] == alone


def test_a_failure_no_row_causes_alone_ends_every_row_and_leaves_the_batch_usable(mapped_pair):
    drafter = _drafter(mapped_pair, "eca")
    target = drafter.large
    prompts = _prompts(drafter.vocab_size, n=3, seed=13)
    inner = ComposedProposer(drafter, draft_tokens=2)
    batch = SpeculativeBatch(target, inner)
    propose, calls = inner.propose, []

    def once(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return propose(*args)

    inner.propose = once
    seqs = [Sequence(p, SamplingOptions(max_new_tokens=10), []) for p in prompts]
    batch.add(seqs)
    while batch.rows:
        batch.step()
    assert all(s.finish_reason == "error" and s.error == "RuntimeError: out of memory" for s in seqs)
    options = [SamplingOptions(max_new_tokens=6)] * 3
    assert decode_rows(batch, prompts, options) == _target_alone(target, prompts, options)


def test_the_engine_with_a_drafter_ends_a_row_whose_listener_raises_and_decodes_the_others(mapped_pair):
    """Issue 35, defect 1: one request's on_update raises inside a speculative step; it ends with that
    error, its neighbour finishes with the target's own tokens, and the engine serves the next request."""
    from llm_modules.decoding.engine import Engine

    drafter = _drafter(mapped_pair, "ladder")
    target = drafter.large
    good_prompt, bad_prompt, next_prompt = _prompts(drafter.vocab_size, n=3, seed=14)
    engine = Engine(target, tokenizer=None, max_batch=4, max_queue=4, drafter=ComposedProposer(drafter, draft_tokens=2))
    done = threading.Semaphore(0)

    def bad_listener(seq):
        if seq.finished:
            done.release()
        elif len(seq.tokens) == 3:
            raise ValueError("the client's socket broke")

    options = SamplingOptions(max_new_tokens=9, eos_token_ids=[])
    good = engine.sequence(good_prompt, options, on_update=lambda s: s.finished and done.release())
    bad = engine.sequence(bad_prompt, options, on_update=bad_listener, request_id="bad")
    engine.submit(good)
    engine.submit(bad)
    engine.start()
    try:
        assert done.acquire(timeout=60) and done.acquire(timeout=60), "a request never ended"
        later = engine.submit(engine.sequence(next_prompt, options, on_update=lambda s: s.finished and done.release()))
        assert done.acquire(timeout=60), "the engine stopped serving"
    finally:
        engine.stop()
    assert bad.finish_reason == "error" and "socket broke" in bad.error and len(bad.tokens) == 3
    expected = _target_alone(target, [good_prompt, next_prompt], [options, options])
    assert [good.finish_reason, later.finish_reason] == ["length", "length"]
    assert [good.tokens, later.tokens] == expected
    assert engine.stats.failed == 1 and engine.stats.errors[-1]["request_id"] == "bad"
