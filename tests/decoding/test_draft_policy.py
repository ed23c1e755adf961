"""The drafting policy: per pass and row, draft only what is predicted to pay (never when it is predicted to
lose), learn each source's acceptance from the nodes the target reached, and leave the target's output as it is."""

from __future__ import annotations

import pytest
import torch

from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.policy import DraftPolicy, PassCosts
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


def _costs(policy: DraftPolicy, seen: dict[int, float]) -> DraftPolicy:
    """The policy past its two timed plain steps, with these costs of a pass by its columns."""
    policy.passes.seen.update(seen)
    policy.passes.readings.update({columns: [seconds] * 4 for columns, seconds in seen.items()})
    policy.passes.counts.update({columns: 4 for columns in seen})
    policy.steps_timed = 2
    return policy


def test_the_first_two_passes_time_a_plain_step_and_a_new_row_count_is_predicted_not_timed():
    policy = DraftPolicy()
    rows = [Row(), Row()]
    for seconds in (0.7, 0.5):  # the second reading replaces the first (which carries one-off costs)
        assert policy.draft_tokens(2, 4) == 0  # the drafter is not run for a timed step
        assert [len(t) for t in policy.prune(rows, [_tree(), _tree()])] == [1, 1] and policy.timing
        policy.observe(rows, [DraftTree.root(1)] * 2, [[0], [0]], verify_seconds=seconds)
    assert policy.passes.seen == {2: 0.5}
    # a row leaves: one row's pass is predicted from the two-row one, so the pass drafts instead of timing
    assert policy.draft_tokens(1, 4) == 4
    assert len(policy.prune([rows[0]], [_tree()])[0]) > 1 and not policy.timing


def test_a_pass_costs_what_its_columns_cost_between_and_beyond_those_seen():
    costs = PassCosts(prior_slope=0.1)
    assert costs(4) is None
    costs.add(4, 1.0)
    assert costs(2) == 1.0 and costs(4) == 1.0 and costs(6) == pytest.approx(1.2)  # the prior slope past one
    costs.add(8, 1.4)
    assert costs(6) == pytest.approx(1.2) and costs(12) == pytest.approx(1.8)  # interpolated; the last slope on
    costs.add(8, 1.0)  # the second reading replaces the first
    assert costs.seen[8] == 1.0
    costs.add(8, 1.4)  # then the median of its last readings: (1.0 + 1.4) / 2
    assert costs.seen[8] == pytest.approx(1.2)
    for seconds in (1.2, 1.2, 4.0):  # a spike (an interrupted pass) does not move it
        costs.add(8, seconds)
    assert costs.seen[8] == pytest.approx(1.2)
    costs.add(9, 1.15)  # past the largest: the slope from the smallest (4: 1.0) to the largest (9: 1.15), not 8-9's
    assert costs(14) == pytest.approx(1.15 + 0.03 * 5)
    costs.add(6, 0.5)  # a noisy narrow reading never makes a wider pass cheaper than a narrower one
    assert costs(6) == 1.0 and costs(7) >= 1.0


def test_nothing_is_drafted_when_drafting_is_predicted_to_lose():
    policy = _costs(DraftPolicy(), {1: 1.0, 2: 3.0})  # every node costs two more steps
    assert [len(t) for t in policy.prune([Row()], [_tree()])] == [1]
    policy = _costs(DraftPolicy(), {1: 1.0, 7: 1.06})  # nodes nearly free: the whole tree pays at prior rates
    assert [len(t) for t in policy.prune([Row()], [_tree()])] == [7]


def test_a_predicted_gain_within_the_margin_drafts_nothing():
    """Drafting must beat a plain step by the policy's margin: predictions near break-even were wrong often
    enough to lose (at 16 rows here)."""
    row = Row()
    copy = DraftTree.chain(1, [6], source="lookup")
    policy = _costs(DraftPolicy(margin=0.1), {1: 1.0, 2: 1.3})
    policy.rates[row] = {"lookup": 0.4}  # 1.4 tokens for 1.3 steps: 8% more a second, within the margin
    assert len(policy.prune([row], [copy])[0]) == 1
    policy.rates[row] = {"lookup": 0.5}  # 1.5 tokens for 1.3 steps: 15% more
    assert len(policy.prune([row], [copy])[0]) == 2
    policy = _costs(DraftPolicy(margin=0.0), {1: 1.0, 2: 1.3})
    policy.rates[row] = {"lookup": 0.4}
    assert len(policy.prune([row], [copy])[0]) == 2


def test_every_row_fills_the_columns_its_batch_pays_for_and_none_drafts_when_none_pays():
    """A pass reads N columns of every row, padding included: a row with unlikely nodes drafts them beside a row
    whose nodes pay (they cost nothing more); when no row's do, no row drafts."""
    good, bad = Row(), Row()
    policy = _costs(DraftPolicy(), {2: 1.0, 14: 1.3})
    policy.rates[good] = {"drafter": 0.9, "runner-up": 0.3, "lookup": 0.5}
    policy.rates[bad] = {"drafter": 0.0, "runner-up": 0.0, "lookup": 0.0}
    pruned = policy.prune([good, bad], [_tree(), _tree()])
    assert len(pruned[0]) == len(pruned[1]) > 1
    assert pruned[0].tokens[:3] == [1, 2, 3]  # the good row keeps its likeliest nodes: the trunk first
    policy.rates[good] = dict(policy.rates[bad])
    assert [len(t) for t in policy.prune([good, bad], [_tree(), _tree()])] == [1, 1]


def test_acceptance_is_learned_from_the_nodes_the_target_reached():
    policy = DraftPolicy(prior_rate=0.5, memory=0.5)
    row = Row()
    tree = _tree()
    _costs(policy, {1: 1.0, 7: 1.06})
    # the target kept the trunk's first node only: 1 tested and kept, 2 tested and rejected, 3 never reached;
    # the runner-up and lookup's first node tested and rejected; lookup's second never reached
    policy.observe([row], [tree], [[0, 1]], verify_seconds=1.1)
    # a node after the root and a node after a draft are learned apart
    assert policy.rates[row]["drafter"] == 0.5 * 0.5 + 0.5 * 1.0 and policy.rates[row]["drafter+"] == 0.25
    assert "lookup+" not in policy.rates[row]  # never reached
    assert policy.rates[row]["runner-up"] == 0.25 and policy.rates[row]["lookup"] == 0.25
    assert policy.passes.seen[7] == pytest.approx(1.06)  # the median of its last readings: four of 1.06, one of 1.1


def test_a_row_that_drafts_nothing_learns_when_its_drafter_is_right_again():
    """Drafts pruned right after the root are judged by the target's next token: a row whose rates fell low
    enough to draft nothing sees them rise again while its drafter's first drafts are right."""
    policy = DraftPolicy(memory=0.5)
    row = Row()
    policy.rates[row] = {"drafter": 0.05, "runner-up": 0.05, "lookup": 0.05}
    _costs(policy, {1: 1.0, 7: 1.3})
    tree = _tree()
    assert len(policy.prune([row], [tree], draft_seconds=0.3)[0]) == 1  # predicted to lose: nothing drafted
    policy.observe([row], [tree.subtree([])], [[0]], 1.0, next_tokens=[2])  # the trunk's first was right
    assert policy.rates[row]["drafter"] == 0.5 * 0.05 + 0.5 and policy.rates[row]["runner-up"] == 0.025
    assert len(policy.prune([row], [tree], draft_seconds=0.3)[0]) > 1  # drafting pays again


def test_a_new_row_starts_from_the_chances_pooled_over_the_rows_seen():
    """At a large batch every row starts together: the first pass's rows replace the prior for each other (and for
    rows joining later), so no row drafts by the prior once its neighbours have shown the drafter's rates."""
    policy = DraftPolicy(memory=0.5)
    rows = [Row() for _ in range(8)]
    trees = [_tree() for _ in rows]
    _costs(policy, {1: 1.0, 7: 1.06})
    # the trunk's first two kept, its third rejected; the runner-up and lookup's first rejected, in every row
    policy.observe(rows, trees, [[0, 1, 2]] * 8, verify_seconds=1.06)
    newcomer = Row()
    chance = policy.chances(newcomer, _tree())
    assert policy.rate("runner-up") == pytest.approx(0.5 * 2 / (8 + 2))  # 8 tests, none kept, 2 prior pseudo-tests
    assert policy.rate("drafter") == pytest.approx((8 + 1) / (8 + 2))  # the trunk's first: kept in every row
    assert policy.rate("drafter+") == pytest.approx((8 + 1) / (16 + 2))  # its second kept, its third not
    # the root's children (drafter 0.9, runner-up 0.1, lookup 0.1) scaled to sum to 1
    assert chance[4] == pytest.approx(policy.rate("runner-up") / 1.1) and chance[4] < 0.15
    policy.observe([newcomer], [_tree()], [[0]], verify_seconds=1.06)
    # its own average starts at the pooled rate, not at the prior
    assert policy.rates[newcomer]["runner-up"] == pytest.approx(0.5 * 0.5 * 2 / (8 + 2))


def test_the_chances_of_one_nodes_children_sum_to_at_most_its_own():
    """The target keeps at most one child of a node: the drafter's first draft, its runner-up and lookup's copy
    off the root are exclusive, so three rates of 0.5 cannot promise 1.5 tokens."""
    policy = DraftPolicy()
    tree = _tree()  # the root's children: nodes 1 (drafter), 4 (runner-up), 5 (lookup)
    chance = policy.chances(Row(), tree)
    assert chance[1] + chance[4] + chance[5] == pytest.approx(1.0)
    assert chance[2] == pytest.approx(chance[1] * 0.5) and chance[6] == pytest.approx(chance[5] * 0.5)
    row = Row()
    policy.rates[row] = {"drafter": 0.3, "runner-up": 0.2, "lookup": 0.1}  # sum under 1: left as they are
    assert policy.chances(row, tree)[1:6:3] == pytest.approx([0.3, 0.2])


def test_a_copy_after_a_one_token_match_is_drafted_and_learned_apart():
    lookup = PromptLookup(50, draft_tokens=3)
    tree = TreeProposer(None, lookup)
    lookup.join([Row(), Row()], torch.tensor([[5, 6, 7, 5], [0, 5, 9, 8]]), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]),
                None)
    quote, word = tree.propose_tree(torch.tensor([6, 5]), 3, [Row(), Row()])
    assert quote.tokens == [6, 7, 5, 6] and set(quote.sources[1:]) == {"lookup"}  # after the 2-token match 5 6
    assert word.tokens == [5, 9, 8, 5] and set(word.sources[1:]) == {"lookup1"}  # after the 1-token match 5


def test_a_long_copy_is_priced_by_how_often_a_copy_goes_on_once_it_started():
    """A node after a draft is learned apart from a node after the root: a copy whose first token is right half
    the time but whose next tokens are then nearly always right is kept whole where nodes are nearly free."""
    row = Row()
    copy = DraftTree.root(1)
    copy.add_chain(0, list(range(2, 12)), source="lookup")  # 10 copied tokens
    policy = _costs(DraftPolicy(), {1: 1.0, 11: 1.1})
    policy.rates[row] = {"lookup": 0.5, "lookup+": 0.95}
    assert policy.chances(row, copy)[10] == pytest.approx(0.5 * 0.95 ** 9)
    assert len(policy.prune([row], [copy])[0]) == 11
    policy.rates[row] = {"lookup": 0.5, "lookup+": 0.5}  # a copy that stops as often as it starts: cut short
    assert len(policy.prune([row], [copy])[0]) < 11


class FixedClock(DraftPolicy):
    """The policy with a pass's cost given, not timed: 1 + 0.05 per node per row, and drafting `per_draft` a drafted
    token (the test must not depend on the machine's speed: on a busy machine a measured drafting time priced
    drafting out of a test that needs it)."""

    per_draft = 0.0

    def prune(self, rows, trees, draft_seconds=0.0):
        return super().prune(rows, trees, self.per_draft * self.drafting)

    def observe(self, rows, trees, paths, verify_seconds, next_tokens=None):
        n = max(len(t) for t in trees)
        super().observe(rows, trees, paths, 1.0 + 0.05 * (n - 1), next_tokens)

    def observe_prefill(self, columns, seconds):
        pass  # the fixed costs have no prefill


def _count_drafted(spec: SpeculativeBatch) -> list[int]:
    """A list that receives the nodes drafted (beyond the roots) by each of the batch's verify passes."""
    drafted = []
    verify = spec._verify

    def counting():
        before = spec.stats.drafted
        out = verify()
        drafted.append(spec.stats.drafted - before)
        return out

    spec._verify = counting
    return drafted


def test_greedy_output_with_the_policy_is_the_targets_and_a_noise_drafter_is_soon_left_idle(mapped_pair):
    model = _model(mapped_pair, "ladder", noise=True)
    target = model.large
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, model.vocab_size, (6,), generator=g).tolist() for _ in range(4)]
    options = [SamplingOptions(max_new_tokens=40)] * 4
    alone = _target_alone(target, prompts, options)
    spec = SpeculativeBatch(target, TreeProposer(ComposedProposer(model, draft_tokens=3), None, width=2),
                            policy=FixedClock())
    drafted = _count_drafted(spec)
    assert decode_rows(spec, prompts, options) == alone
    third = len(drafted) // 3
    assert drafted[:2] == [0, 0] and sum(drafted[2:third]) > 0  # two timed plain steps, then drafting at prior rates
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
    policy = _costs(DraftPolicy(), {4: 1.0})
    assert policy.draft_tokens(4, 5) == 5  # nothing kept yet: the whole K
    policy.depth = 2  # the last pass kept drafter nodes down to depth 2
    assert policy.draft_tokens(4, 5) == 3
    assert policy.draft_tokens(3, 5) == 3  # a row left: the batch's last pass still counts
    policy.depth = 0  # it kept none: the drafter rests, then drafts one token on every 16th pass
    asked = [policy.draft_tokens(4, 5) for _ in range(2 * DraftPolicy.EXPLORE_EVERY)]
    explore = DraftPolicy.EXPLORE_EVERY - 1
    assert asked[explore] == asked[2 * explore + 1] == 1 and asked.count(0) == len(asked) - 2
    policy.depth = 1  # that draft was kept: one deeper each pass
    assert policy.draft_tokens(4, 5) == 2
    assert _costs(DraftPolicy(), {1: 1.0}).draft_tokens(1, 1) == 1  # a drafter of K = 1 drafts before anything is kept


def test_a_pass_pays_for_its_own_proposals_only():
    """Drafting pays for what proposing this pass's nodes took: the drafter's time when it ran, next to nothing
    when it rested and only prompt lookup copied, so a copy that pays is drafted while the drafter rests."""
    row = Row()
    policy = _costs(DraftPolicy(), {1: 1.0, 2: 1.3})
    policy.rates[row] = {"lookup": 0.5}
    copy = DraftTree.chain(1, [6], source="lookup")
    assert len(policy.prune([row], [copy], draft_seconds=0.3)[0]) == 1  # 1.5 tokens for 1.6 steps: a loss
    assert len(policy.prune([row], [copy], draft_seconds=0.001)[0]) == 2  # 1.5 tokens for 1.3 steps


def test_prompt_lookup_alone_is_never_rested(mapped_pair):
    """The policy rests a drafter (a network) after passes that kept none of its nodes; prompt lookup runs none,
    so it copies on every pass its copy is predicted to pay, not on every 16th."""
    model = _model(mapped_pair, "eca")
    target = model.large
    g = torch.Generator().manual_seed(5)
    span = torch.randint(3, model.vocab_size, (6,), generator=g).tolist()
    prompts = [span * 4, span[::-1] * 4]
    options = [SamplingOptions(max_new_tokens=30)] * 2
    spec = SpeculativeBatch(target, PromptLookup(model.vocab_size, draft_tokens=4), policy=FixedClock())
    drafted = _count_drafted(spec)
    assert decode_rows(spec, prompts, options) == _target_alone(target, prompts, options)
    assert drafted[:2] == [0, 0] and sum(d > 0 for d in drafted[2:]) > DraftPolicy.EXPLORE_EVERY // 4


def test_a_prefill_prices_the_first_wide_pass_by_interpolation_not_the_prior_slope():
    """A step whose target is compute-bound: 16 columns 0.57 s, a prefill over 2,256 columns 46 s. Before any
    drafted pass, a 32-column pass is priced along the line to the prefill (1.57 steps), not at the prior slope
    (1.24 steps, when it cost 1.97 here)."""
    policy = DraftPolicy()
    policy.observe(*[[Row()] * 16, [DraftTree.root(1)] * 16, [[0]] * 16], verify_seconds=0.57)
    assert policy.cost(16, 2) == pytest.approx(1 + 0.015 * 16)  # the prior slope
    policy.observe_prefill(2256, 46.0)
    assert policy.cost(16, 2) == pytest.approx((0.57 + 16 * (46.0 - 0.57) / 2240) / 0.57)
    assert policy.cost(16, 1) == 1.0


def test_the_drafter_is_not_run_where_its_chain_cannot_pay_at_its_chances():
    """may_pay: a drafter whose chain of tokens, at the chances pooled over the rows, is predicted to lose at this
    batch's costs is not run (the first full K and the exploring passes alike); where passes are cheap it is."""
    costly = _costs(DraftPolicy(), {16: 1.0, 32: 1.6, 48: 2.2, 80: 3.4})  # a column costs near what a step's does
    assert not costly.may_pay(16, 4) and costly.draft_tokens(16, 4) == 0
    costly.depth = 0
    assert all(costly.draft_tokens(16, 4) == 0 for _ in range(2 * DraftPolicy.EXPLORE_EVERY))  # nor explores
    costly.pooled["drafter"], costly.pooled["drafter+"] = [50.0, 50.0], [50.0, 50.0]  # a drafter always right
    assert costly.may_pay(16, 4)  # 16 x 3 more tokens for 2.2 steps
    cheap = _costs(DraftPolicy(), {1: 1.0, 5: 1.05})
    assert cheap.may_pay(1, 4) and cheap.draft_tokens(1, 4) == 4
    cheap.drafter_seconds[1] = 0.6  # its own time: 0.6 of a step a token
    assert not cheap.may_pay(1, 4)


def test_no_proposer_is_asked_on_a_pass_where_no_source_can_pay(mapped_pair):
    """plain_pass: where no source's chain at its pooled chances is predicted to pay, neither the drafter nor prompt
    lookup is asked and the pass is the target's plain step (nothing to roll back); the output is the target's."""
    model = _model(mapped_pair, "ladder")
    target = model.large
    g = torch.Generator().manual_seed(6)
    span = torch.randint(3, model.vocab_size, (5,), generator=g).tolist()
    prompts = [span * 4, span[::-1] * 4, torch.randint(3, model.vocab_size, (7,), generator=g).tolist()]
    options = [SamplingOptions(max_new_tokens=20)] * 3  # one row count throughout: its costs are all measured

    class Dear(FixedClock):  # every node a row costs a whole step more
        def observe(self, rows, trees, paths, verify_seconds, next_tokens=None):
            DraftPolicy.observe(self, rows, trees, paths, float(max(len(t) for t in trees)), next_tokens)

    drafter, lookup = ComposedProposer(model, draft_tokens=3), PromptLookup(model.vocab_size, draft_tokens=4)
    asked = []
    propose, copies = drafter.propose, lookup.copies
    drafter.propose = lambda first, k, rows: asked.append("drafter") or propose(first, k, rows)
    lookup.copies = lambda *a, **k: asked.append("lookup") or copies(*a, **k)
    spec = SpeculativeBatch(target, TreeProposer(drafter, lookup, width=2), policy=Dear())
    trees = []
    run_tree = spec.stepper.run_tree
    spec.stepper.run_tree = lambda *a: trees.append(1) or run_tree(*a)
    drafted = _count_drafted(spec)
    assert decode_rows(spec, prompts, options) == _target_alone(target, prompts, options)
    # two timed steps, a pass drafted at the prior slope's price (it costs 1 + N - 1 steps), then none is asked
    assert drafted[:2] == [0, 0] and drafted[2] > 0 and sum(drafted[3:]) == 0 and len(drafted) > 10
    assert asked == ["lookup", "drafter"] and trees == [1]
    # the same costs, a policy that must ask: every pass with nothing drafted is still the plain step
    trees.clear()
    cheap = SpeculativeBatch(target, TreeProposer(drafter, lookup, width=2), policy=FixedClock())
    cheap.stepper.run_tree = lambda *a: trees.append(1) or run_tree(*a)
    drafted = _count_drafted(cheap)
    assert decode_rows(cheap, prompts, options) == _target_alone(target, prompts, options)
    assert asked and len(trees) == sum(d > 0 for d in drafted) > 0


def _copy_tree(root: int = 1, length: int = 4) -> DraftTree:
    return DraftTree.chain(root, list(range(10, 10 + length)), source="lookup")


def test_the_drafter_stands_aside_only_where_every_rows_copy_is_worth_more_than_its_time():
    """beside_copies: the drafter's chain adds its expected tokens only where the copy's first token is not kept;
    it costs its seconds per token x k of a plain step. A row with no copy (or a copy seldom kept) keeps it
    drafting; so does a drafter whose time has not been measured at this batch size."""
    quoting, other = Row(), Row()
    policy = _costs(DraftPolicy(), {1: 1.0, 2: 1.0})
    for row in (quoting, other):
        policy.rates[row] = {"lookup": 0.9, "lookup+": 0.9, "drafter": 0.8, "drafter+": 0.8}
    assert policy.beside_copies([quoting], [_copy_tree()], 4) == 4  # its time at batch 1 not measured yet
    policy.drafter_seconds.update({1: 0.05, 2: 0.05})  # 4 tokens: 0.2 of a step
    # one row: 0.1 x (0.8 + 0.64 + 0.51 + 0.41) = 0.24 tokens gained, 0.2 x 4.1 = 0.82 tokens' worth of time
    assert policy.beside_copies([quoting], [_copy_tree()], 4) == 0 and policy.skipped and policy.drafting == 0
    # a row with no copy gains the drafter's 2.36 tokens: the batch drafts
    assert policy.beside_copies([quoting, other], [_copy_tree(), DraftTree.root(2)], 4) == 4
    policy.rates[quoting]["lookup"] = 0.2  # a copy that is seldom kept: the drafter is worth its time
    assert policy.beside_copies([quoting], [_copy_tree()], 4) == 4
    policy.rates[quoting]["lookup"] = 0.9
    policy.drafter_seconds[1] = 0.01  # a drafter at 4% of a step for 4 tokens: worth its 0.24 tokens
    assert policy.beside_copies([quoting], [_copy_tree()], 4) == 4
    assert policy.beside_copies([quoting], [DraftTree.root(2)], 4) == 4  # no copy: nothing to stand aside for


def test_a_pass_the_drafter_stood_aside_leaves_its_depth_and_a_pass_it_ran_times_it():
    row = Row()
    policy = _costs(DraftPolicy(), {1: 1.0, 5: 1.2})
    policy.rates[row] = {"lookup": 0.9, "lookup+": 0.9, "drafter": 0.5, "drafter+": 0.5}
    policy.depth = 2
    assert policy.draft_tokens(1, 4) == 3
    policy.prune([row], [_copy_tree()], draft_seconds=0.3)  # it ran: 0.1 s per drafted token
    assert policy.drafter_seconds == {1: pytest.approx(0.1)}
    policy.depth = 2
    assert policy.draft_tokens(1, 4) == 3 and policy.beside_copies([row], [_copy_tree()], 3) == 0
    policy.prune([row], [_copy_tree()], draft_seconds=0.001)  # lookup's scan only: neither timed nor a failure
    assert policy.depth == 2 and policy.drafter_seconds == {1: pytest.approx(0.1)}
    assert policy.draft_tokens(1, 4) == 3  # it drafts again next pass, as deep as before


class SlowDrafter(FixedClock):
    """FixedClock with a drafter that costs 0.3 of a pass per drafted token."""

    per_draft = 0.3


def test_greedy_output_is_the_targets_when_the_drafter_stands_aside_for_copies(mapped_pair):
    model = _model(mapped_pair, "ladder")
    target = model.large
    g = torch.Generator().manual_seed(21)
    span = torch.randint(3, model.vocab_size, (5,), generator=g).tolist()
    prompts = [span * 4, (span[::-1] * 4)[:-1], torch.randint(3, model.vocab_size, (7,), generator=g).tolist()]
    options = [SamplingOptions(max_new_tokens=n) for n in (40, 30, 20)]
    drafter = ComposedProposer(model, draft_tokens=3)
    policy = SlowDrafter()
    policy.may_pay = lambda batch, k: True  # the drafter's own gate (its chain at its chances) left open: this
    # test is about the gate beside lookup's copies
    events = []  # ("gate", k asked, k given) each pass, ("draft", k) each time the drafter runs
    propose, beside = drafter.propose, policy.beside_copies
    drafter.propose = lambda first, k, rows: events.append(("draft", k)) or propose(first, k, rows)
    policy.beside_copies = lambda rows, trees, k: events.append(("gate", k, beside(rows, trees, k))) or events[-1][2]
    spec = SpeculativeBatch(target, TreeProposer(drafter, PromptLookup(model.vocab_size, draft_tokens=4), width=2),
                            policy=policy)
    assert decode_rows(spec, prompts, options, join_at=1) == _target_alone(target, prompts, options)
    gates = [e for e in events if e[0] == "gate"]
    assert any(asked and not given for _, asked, given in gates)  # it stood aside on some passes
    assert any(given for _, _, given in gates)  # and drafted on others
    for before, after in zip(events, events[1:] + [("end",)]):  # it ran exactly on the passes the gate let it
        if before[0] == "gate":
            assert (after[0] == "draft" and after[1] == before[2]) == (before[2] > 0)
