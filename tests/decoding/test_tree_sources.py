"""A drafter and prompt lookup in one draft tree (`TreeProposer`): the drafter stays in step whatever each
pass kept (a copy longer than its K, a runner-up, a pass where it drafted one token), and sampled rows follow
the target's distribution when a tree holds the drafter's draws, its runners-up and lookup's copies."""

from __future__ import annotations

import pytest
import torch

from llm_modules import LLMModulesModel
from llm_modules.decoding.engine import Sequence
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.decoding.speculative.tree_proposer import TreeProposer

from ..helpers import (
    OPTIONS,
    assert_drafter_equals_a_recompute,
    joint_chi_square,
    nudge_gates,
    target_joint,
)


def _model(pair, bridge="eca"):
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=pair["large"], small=pair["small"], bridge=bridge, small_inputs="mapped",
                                    head="projected", **OPTIONS[bridge])
    nudge_gates(model)
    return model.double().eval()


def _tree(model, k, width=2, lookup_tokens=5):
    return TreeProposer(ComposedProposer(model, draft_tokens=k), PromptLookup(model.vocab_size, draft_tokens=lookup_tokens),
                        width=width)


class Alternating:
    """A policy stand-in: the drafter drafts k and 1 tokens on alternate passes; trees are kept whole."""

    def __init__(self, k):
        self.k, self.passes, self.asked = k, 0, []

    def draft_tokens(self, batch, k):
        self.passes += 1
        self.asked.append(k if self.passes % 2 else 1)
        return self.asked[-1]

    def beside_copies(self, rows, trees, k):  # the drafter never stands aside for lookup's copies
        return k

    def prune(self, rows, trees, draft_seconds=0.0):
        return trees

    def observe(self, *args):
        pass

    def observe_prefill(self, columns, seconds):
        pass

    def plain_pass(self, batch, k):  # every pass asks the proposers
        return False


@pytest.mark.parametrize("bridge", ["eca", "ladder", "xattn"])
def test_the_drafter_in_a_tree_equals_a_fresh_recompute_after_any_path(mapped_pair, bridge):
    """After rounds whose kept paths ran through the drafter's trunk, its runners-up and lookup's copies (longer
    than K), some drafted with one token, the drafter's next logits equal the same model run from scratch over
    the verified tokens, with the target's states and the sources it trained with (one block per round)."""
    k = 3
    model = _model(mapped_pair, bridge)
    target = model.large
    g = torch.Generator().manual_seed(1)
    span = torch.randint(3, model.vocab_size, (5,), generator=g).tolist()
    prompt = span * 3 + span[:2]  # lookup's copies can be kept
    proposer = _tree(model, k)
    accepted = []
    commit = proposer.drafter.commit
    proposer.drafter.commit = lambda a, tokens, states: accepted.extend(a.tolist()) or commit(a, tokens, states)
    policy = Alternating(k)
    spec = SpeculativeBatch(target, proposer, policy=policy)
    seq = Sequence(prompt, SamplingOptions(max_new_tokens=60), [])
    spec.add([seq])
    for _ in range(6):
        spec.step()
    assert policy.asked[:2] == [k, 1] and max(accepted) > k  # lookup's copies kept beyond the drafter's K
    assert_drafter_equals_a_recompute(proposer.drafter, model, spec, seq, prompt, accepted, k,
                                      propose=ComposedProposer.propose)  # not the spy on the drafter


# ---------------------------------------------------------------------- the target's distribution
SAMPLES = 1200


def _prompt_with_a_likely_copy(target, vocab, options):
    """A prompt [z, t, w, ..., z] after which the target draws t, then w, each with a probability between 0.2 and
    0.8 (top-k 3): rows whose first token is t copy w, which the target often keeps."""
    g = torch.Generator().manual_seed(8)

    def likely(ids, besides):  # the target's likeliest token after ids, other than those given
        with torch.no_grad():
            logits = target(torch.tensor([ids])).logits[0, -1]
        return next(i for i in logits.argsort(descending=True).tolist() if i not in besides)

    for _ in range(20):
        z, t, w, *rest = torch.randint(3, vocab, (7,), generator=g).tolist()
        for _ in range(3):  # t and w as the prompt they are part of makes them
            t = likely([z, t, w] + rest + [z], {z, *rest})
            w = likely([z, t, w] + rest + [z, t], {z, t, *rest})
        prompt = [z, t, w] + rest + [z]
        if len(set(prompt)) < len(prompt) - 1:  # only z twice: (z, t) is the one 2-gram that can recur
            continue
        joint = target_joint(target, prompt, options)
        p_t = sum(v for (t1, _), v in joint.items() if t1 == t)
        if 0.2 < p_t < 0.8 and 0.2 < joint.get((t, w), 0) / p_t < 0.8:
            return prompt, joint
    pytest.fail("no prompt found")


def test_sampled_tokens_follow_the_targets_distribution_with_every_source_in_one_tree(mapped_pair):
    """The prompt holds (z, t, w): rows whose first token is t get lookup's copy w in the same tree as the
    drafter's draws and runners-up (a q that is not lookup's one-hot would keep w too often). The first two sampled tokens (top-k 3, 9 cells) over
    1200 seeds: chi-square against the target's exact joint, p = 0.001 (26.1 for 8 degrees of freedom; cells merged up to 5 expected)."""
    model = _model(mapped_pair).float()
    target = model.large
    options = SamplingOptions(max_new_tokens=2, do_sample=True, temperature=1.5, top_k=3)
    prompt, joint = _prompt_with_a_likely_copy(target, model.vocab_size, options)
    seqs = [Sequence(prompt, options, [], generator=torch.Generator().manual_seed(seed)) for seed in range(SAMPLES)]
    tree = _tree(model, 2)
    batch = SpeculativeBatch(target, tree)
    batch.add(seqs)
    while batch.rows:
        batch.step()
    assert tree.lookup_rows > 100  # rows whose trees held lookup's copy beside the drafter's nodes
    chi2 = joint_chi_square(joint, seqs)
    assert chi2 < 26.1, chi2  # p = 0.001 for up to 8 degrees of freedom


class Echo:
    """A drafter stand-in whose chain is fixed tokens (and no runners-up: width 1)."""

    taps: list[int] = []
    draft_tokens = 3

    def __init__(self, chain):
        self.chain = chain

    def join(self, *args):
        pass

    def propose(self, first, k, rows):
        return torch.tensor([self.chain[:k]] * first.shape[0]), None


def test_a_node_both_sources_propose_is_lookups_and_the_drafter_owns_only_what_it_adds():
    """The drafting policy credits the drafter (and keeps it drafting deep) only for nodes beyond lookup's copy."""
    lookup = PromptLookup(20, draft_tokens=3)
    tree = TreeProposer(Echo([8, 1, 9]), lookup, width=1)
    lookup.join([None], torch.tensor([[5, 6, 7, 8, 1, 6]]), torch.ones(1, 6, dtype=torch.long), None)
    # the row ends in (6, 7) with the pending 7: lookup copies 8, 1, 6; the drafter agrees on 8, 1, then says 9
    (out,) = tree.propose_tree(torch.tensor([7]), 3, [Sequence([1], SamplingOptions(max_new_tokens=4), [])])
    assert out.tokens == [7, 8, 1, 6, 9] and out.sources == ["root", "lookup", "lookup", "lookup", "drafter"]
    assert out.parents == [-1, 0, 1, 2, 2]


class Resting(Alternating):
    """A policy stand-in: the drafter drafts k on passes 1, 4, 7, ... and rests (0: not run) on the others."""

    def draft_tokens(self, batch, k):
        self.passes += 1
        self.asked.append(k if self.passes % 3 == 1 else 0)
        return self.asked[-1]


def _drafter_reads_every_verified_token(proposer, spec, prompts):
    """What the drafter has read (its real columns) and holds to read next (its chunk, or EAGLE-3's pending ids) is
    every verified token of every row: the prompt (EAGLE-3: from its second token) and the tokens emitted."""
    for b, seq in enumerate(spec.rows):
        real = proposer.ids[b][proposer.mask[b].bool()].tolist()
        held = proposer.chunk[b] if hasattr(proposer, "chunk") else proposer.pending_ids[b]
        start = 0 if hasattr(proposer, "chunk") else 1
        assert real + held == seq.prompt[start:] + seq.tokens


@pytest.mark.parametrize("kind", ["composed", "eagle3"])
def test_a_resting_drafter_is_not_run_and_reads_what_was_verified_meanwhile(mapped_pair, kind):
    """Passes the drafting policy rests the drafter for call no drafter at all; the tokens verified meanwhile join
    what it reads at its next proposal (none lost, none twice), and greedy output stays the target's own."""
    from llm_modules.decoding.engine import DecodeBatch
    from llm_modules.decoding.speculative.eagle3_proposer import Eagle3Proposer

    from ..helpers import decode_rows, tiny_eagle3, tiny_eagle3_target

    k = 3
    if kind == "composed":
        model = _model(mapped_pair, "ladder")
        target, drafter = model.large, ComposedProposer(model, draft_tokens=k)
        vocab = model.vocab_size
    else:
        target = tiny_eagle3_target().double()
        drafter, vocab = Eagle3Proposer(tiny_eagle3(target).double(), draft_tokens=k), 100
    g = torch.Generator().manual_seed(4)
    prompts = [(torch.randint(3, vocab, (4,), generator=g).tolist()) * 2 for _ in range(3)]
    options = [SamplingOptions(max_new_tokens=n) for n in (20, 14, 24)]
    alone = decode_rows(DecodeBatch(target), prompts, options)
    calls = []
    propose = drafter.propose
    drafter.propose = lambda first, n, rows: calls.append(n) or propose(first, n, rows)
    policy = Resting(k)
    spec = SpeculativeBatch(target, TreeProposer(drafter, PromptLookup(vocab, draft_tokens=4), width=2), policy=policy)
    seqs = [Sequence(p, o, []) for p, o in zip(prompts, options)]
    spec.add(seqs)
    while spec.rows:
        spec.step()
        if spec.rows:
            _drafter_reads_every_verified_token(drafter, spec, prompts)
    assert [s.tokens for s in seqs] == alone
    assert 0 in policy.asked and calls == [n for n in policy.asked if n]  # rested passes ran no drafter
