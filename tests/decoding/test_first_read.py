"""A drafter reads its rows' prompts at its first proposal (`first_read`): until then rows wait with their tokens
and the target's states; the first proposal then equals that of a drafter that joined them with everything
verified so far as their prompts; a batch whose drafter never runs never runs its network."""

from __future__ import annotations

import pytest
import torch

from llm_modules.decoding.engine import Sequence
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.eagle3_proposer import Eagle3Proposer
from llm_modules.decoding.speculative.policy import DraftPolicy
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.decoding.speculative.target import TargetStepper
from llm_modules.decoding.speculative.tree_proposer import TreeProposer
from llm_modules.tensors import left_pad

from ..helpers import decode_rows, tiny_eagle3, tiny_eagle3_target
from .test_draft_policy import FixedClock
from .test_draft_trees import _model, _target_alone


def _pair(kind, mapped_pair):
    if kind == "composed":
        model = _model(mapped_pair, "ladder")
        return model.large, lambda: ComposedProposer(model, draft_tokens=3), model.vocab_size
    target = tiny_eagle3_target().double()
    network = tiny_eagle3(target).double()
    return target, lambda: Eagle3Proposer(network, draft_tokens=3), 100


def _states(target, taps, rows):
    """The target's states at the taps over each token list (left-padded together): ids, mask, states."""
    ids, mask = left_pad(rows, 0)
    _, states, _ = TargetStepper(target, taps).run(ids, mask, None)
    return ids, mask, states


@pytest.mark.parametrize("kind", ["composed", "eagle3"])
def test_the_first_proposal_after_waiting_is_a_join_over_everything_verified(mapped_pair, kind):
    target, make, vocab = _pair(kind, mapped_pair)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 4, 9)]
    verified = [torch.randint(3, vocab, (8,), generator=g).tolist() for _ in prompts]
    accepted = [[0, 2, 1], [1, 0, 2], [2, 1, 0]]  # per pass and row: drafts kept (a pass keeps a + 1 tokens)
    rows = [Sequence(p, SamplingOptions(), []) for p in prompts]  # greedy rows
    waited = make()
    ids, mask, states = _states(target, waited.taps, prompts)
    waited.join(rows, ids, mask, states)
    done = [0] * len(prompts)
    for step in accepted:  # passes the drafter was not run for: their tokens and states wait with the rows
        history = [p + v[:d] for p, v, d in zip(prompts, verified, done)]
        width = max(a for a in step) + 1
        kept = [v[d: d + a + 1] + [0] * (width - a - 1) for v, d, a in zip(verified, done, step)]
        _, _, full = _states(target, waited.taps, [h + k for h, k in zip(history, kept)])
        waited.commit(torch.tensor(step), torch.tensor(kept), full[:, -width:])  # kept tokens first, then padding
        done = [d + a + 1 for d, a in zip(done, step)]
    waited.keep([0, 2])  # a row leaves while they wait
    assert not hasattr(waited, "cache") or waited.cache is None  # nothing read yet
    first = torch.tensor([verified[0][done[0]], verified[2][done[2]]])
    history = [prompts[i] + verified[i][: done[i]] for i in (0, 2)]
    drafts, _ = waited.propose(first, 3, [rows[0], rows[2]])
    fresh = make()
    fresh.join([rows[0], rows[2]], *_states(target, fresh.taps, history))
    expected, _ = fresh.propose(first, 3, [rows[0], rows[2]])
    assert torch.equal(drafts, expected)
    assert all(torch.allclose(a, b) for a, b in zip(waited.last_logits, fresh.last_logits))


class Never(FixedClock):
    """Every node costs a whole step more: no source ever pays after the first drafted pass is measured."""

    def observe(self, rows, trees, paths, verify_seconds, next_tokens=None):
        DraftPolicy.observe(self, rows, trees, paths, float(max(len(t) for t in trees)), next_tokens)


@pytest.mark.parametrize("kind", ["composed", "eagle3"])
def test_a_drafter_never_run_never_reads_and_output_is_the_targets(mapped_pair, kind):
    target, make, vocab = _pair(kind, mapped_pair)
    drafter = make()
    reads = []
    join_now = drafter._join_now
    drafter._join_now = lambda *a: reads.append(len(a[0])) or join_now(*a)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 8, 6)]
    options = [SamplingOptions(max_new_tokens=n) for n in (12, 9, 15)]
    policy = Never()
    policy.drafter_seconds.update({1: 5.0, 2: 5.0, 3: 5.0})  # a drafter never worth its time
    spec = SpeculativeBatch(target, TreeProposer(drafter, PromptLookup(vocab, draft_tokens=3), width=2), policy=policy)
    assert decode_rows(spec, prompts, options, join_at=1) == _target_alone(target, prompts, options)
    assert reads == []
    # a policy that lets it draft: rows joining before its first proposal (two timed steps first) are read together
    # then, rows joining after it at once
    for join_at, expected in ((1, [3]), (3, [1, 2])):
        drafter, lookup = make(), PromptLookup(vocab, draft_tokens=3)
        join_now, reads = drafter._join_now, []
        drafter._join_now = lambda *a, join_now=join_now, reads=reads: reads.append(len(a[0])) or join_now(*a)
        spec = SpeculativeBatch(target, TreeProposer(drafter, lookup, width=2), policy=FixedClock())
        assert decode_rows(spec, prompts, options, join_at=join_at) == _target_alone(target, prompts, options)
        assert reads == expected
