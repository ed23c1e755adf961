"""The drafting policy: per pass and row, draft only what is predicted to pay (never when it is predicted to
lose), learn each source's acceptance from the nodes the target reached, and leave the target's output as it is."""

from __future__ import annotations

import pytest
import torch

from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.policy import BatchCost, DraftPolicy
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.decoding.speculative.tree import DraftTree
from llm_modules.decoding.speculative.tree_proposer import TreeProposer

from ..helpers import decode_rows
from .test_draft_trees import _model, _prompts, _target_alone


class Row:
    """A stand-in for a decoding row (the policy keys its rates by row)."""


def _tree():
    tree = DraftTree.chain(1, [2, 3, 4], source="drafter")  # nodes 1-3
    tree.add(0, 5, source="runner-up")  # node 4
    tree.add_chain(0, [6, 7], source="lookup")  # nodes 5-6
    return tree


def test_a_subtree_keeps_the_kept_nodes_attempts_and_sources():
    tree = _tree()
    sub = tree.subtree([1, 2, 5])
    assert sub.tokens == [1, 2, 3, 6] and sub.parents == [-1, 0, 1, 0]
    assert sub.sources == ["root", "drafter", "drafter", "lookup"]
    assert [c for c, _ in sub.attempts[0]] == [1, 3] and [c for c, _ in sub.attempts[1]] == [2]
    assert tree.subtree([]).tokens == [1]


def test_the_first_pass_at_a_batch_size_times_a_plain_step():
    policy = DraftPolicy()
    rows = [Row(), Row()]
    assert [len(t) for t in policy.prune(rows, [_tree(), _tree()])] == [1, 1]
    policy.observe(rows, [DraftTree.root(1)] * 2, [[0], [0]], verify_seconds=0.5, draft_seconds=0.0)
    assert policy.costs[2].step == 0.5 and policy.idle.get(2, 0) == 0  # timing is not choosing to draft nothing


def test_nothing_is_drafted_when_drafting_is_predicted_to_lose():
    policy = DraftPolicy()
    policy.costs[1] = BatchCost(step=1.0, slope=2.0)  # every node per row costs two more steps
    assert [len(t) for t in policy.prune([Row()], [_tree()])] == [1]
    policy.costs[1] = BatchCost(step=1.0, slope=0.01)  # nodes nearly free: the whole tree pays at prior rates
    assert [len(t) for t in policy.prune([Row()], [_tree()])] == [7]


def test_a_row_whose_drafts_do_not_pay_drafts_nothing_beside_one_whose_do():
    policy = DraftPolicy()
    good, bad = Row(), Row()
    policy.rates[good] = {"drafter": 0.9, "runner-up": 0.3, "lookup": 0.5}
    policy.rates[bad] = {"drafter": 0.0, "runner-up": 0.0, "lookup": 0.0}
    policy.costs[2] = BatchCost(step=1.0, slope=0.05)
    pruned = policy.prune([good, bad], [_tree(), _tree()])
    assert len(pruned[0]) > 1 and len(pruned[1]) == 1
    # the good row keeps its likeliest nodes: the trunk first
    assert pruned[0].tokens[:3] == [1, 2, 3]


def test_acceptance_is_learned_from_the_nodes_the_target_reached():
    policy = DraftPolicy(prior_rate=0.5, memory=0.5)
    row = Row()
    tree = _tree()
    policy.costs[1] = BatchCost(step=1.0, slope=0.01)
    # the target kept the trunk's first node only: 1 tested and kept, 2 tested and rejected, 3 never reached;
    # the runner-up and lookup's first node tested and rejected; lookup's second never reached
    policy.observe([row], [tree], [[0, 1]], verify_seconds=1.1, draft_seconds=0.1)
    assert policy.rates[row]["drafter"] == (0.5 * 0.5 + 0.5 * 1.0) * 0.5 + 0.5 * 0.0
    assert policy.rates[row]["runner-up"] == 0.25 and policy.rates[row]["lookup"] == 0.25
    assert policy.costs[1].slope == pytest.approx(0.5 * 0.01 + 0.5 * 0.1 / 6) and policy.costs[1].draft == 0.1


def test_a_row_that_drafts_nothing_learns_when_its_drafter_is_right_again():
    """Drafts pruned right after the root are judged by the target's next token: a row whose rates fell low
    enough to draft nothing sees them rise again while its drafter's first drafts are right."""
    policy = DraftPolicy(memory=0.5)
    row = Row()
    policy.rates[row] = {"drafter": 0.05, "runner-up": 0.05, "lookup": 0.05}
    policy.costs[1] = BatchCost(step=1.0, slope=0.05, draft=0.3)
    tree = _tree()
    assert len(policy.prune([row], [tree])[0]) == 1  # predicted to lose: nothing drafted
    policy.observe([row], [tree.subtree([])], [[0]], 1.0, 0.3, next_tokens=[2])  # the trunk's first was right
    assert policy.rates[row]["drafter"] == 0.5 * 0.05 + 0.5 and policy.rates[row]["runner-up"] == 0.025
    assert len(policy.prune([row], [tree])[0]) > 1  # drafting pays again


class FixedClock(DraftPolicy):
    """The policy with a pass's cost given, not timed: 1 + 0.05 per node per row (the test must not depend on
    the machine's speed)."""

    def observe(self, rows, trees, paths, verify_seconds, draft_seconds, next_tokens=None):
        n = max(len(t) for t in trees)
        super().observe(rows, trees, paths, 1.0 + 0.05 * (n - 1), 0.0, next_tokens)


def test_greedy_output_with_the_policy_is_the_targets_and_a_noise_drafter_is_soon_left_idle(mapped_pair):
    model = _model(mapped_pair, "ladder", noise=True)
    target = model.large
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, model.vocab_size, (6,), generator=g).tolist() for _ in range(4)]
    options = [SamplingOptions(max_new_tokens=40)] * 4
    alone = _target_alone(target, prompts, options)
    spec = SpeculativeBatch(target, TreeProposer(ComposedProposer(model, draft_tokens=3), None, width=2),
                            policy=FixedClock())
    drafted = []
    verify = spec._verify

    def counting():
        before = spec.stats.drafted
        out = verify()
        drafted.append(spec.stats.drafted - before)
        return out

    spec._verify = counting
    assert decode_rows(spec, prompts, options) == alone
    third = len(drafted) // 3
    assert drafted[0] == 0 and sum(drafted[1:third]) > 0  # a timed plain step, then drafting at prior rates
    assert sum(drafted[-third:]) < sum(drafted[1:third]) / 3  # the noise drafter's nodes stop paying


def test_greedy_output_with_the_policy_is_the_targets_with_rows_joining_and_leaving(mapped_pair):
    model = _model(mapped_pair, "ladder")
    target = model.large
    prompts = _prompts(model.vocab_size, seed=11)
    options = [SamplingOptions(max_new_tokens=n) for n in (30, 12, 25, 28, 9, 30)]
    proposer = TreeProposer(ComposedProposer(model, draft_tokens=3), PromptLookup(model.vocab_size, draft_tokens=4),
                            width=2)
    spec = SpeculativeBatch(target, proposer, policy=FixedClock())
    assert decode_rows(spec, prompts, options, join_at=2) == _target_alone(target, prompts, options)


def test_sampled_rows_with_the_policy_decode_to_the_end(mapped_pair):
    model = _model(mapped_pair, "eca")
    target = model.large
    prompts = _prompts(model.vocab_size, seed=12, n=3)
    options = [SamplingOptions(max_new_tokens=10, do_sample=True, temperature=0.9, seed=s) for s in (1, 2, 3)]
    spec = SpeculativeBatch(target, TreeProposer(ComposedProposer(model, draft_tokens=3), None, width=2),
                            policy=FixedClock())
    out = decode_rows(spec, prompts, options)
    assert [len(t) for t in out] == [10, 10, 10] and all(0 <= t < model.vocab_size for row in out for t in row)
    assert torch.tensor(out).numel() == 30


def test_the_drafter_rests_after_a_pass_that_kept_none_of_its_nodes_and_explores_again():
    policy = DraftPolicy()
    assert policy.draft_tokens(4, 5) == 5  # nothing known at this size: the whole K
    policy.depth[4] = 2  # the last pass at batch 4 kept drafter nodes down to depth 2
    assert policy.draft_tokens(4, 5) == 3
    policy.depth[4] = 0  # it kept none: the drafter rests, then drafts fully on every 16th pass
    asked = [policy.draft_tokens(4, 5) for _ in range(2 * DraftPolicy.EXPLORE_EVERY)]
    explore = DraftPolicy.EXPLORE_EVERY - 1
    assert asked[explore] == asked[2 * explore + 1] == 5 and asked.count(0) == len(asked) - 2
    assert policy.draft_tokens(8, 5) == 5  # another batch size keeps its own account
    assert DraftPolicy().draft_tokens(1, 1) == 1  # a drafter of K = 1 drafts before anything is known
