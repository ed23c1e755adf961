"""Draft trees: the verify pass over a tree scores every node as a recompute of its own path would, rolling
back to any path leaves the target's cache as a recompute, greedy output with a tree proposer (drafter
trunk, runners-up, prompt lookup's branch) is the target's own, and the tree rule for sampled rows keeps
the target's distribution."""

from __future__ import annotations

import pytest
import torch

from llm_modules import LLMModulesModel
from llm_modules.decoding.engine import DecodeBatch
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.acceptance import (
    accept_tree_greedy,
    accept_tree_sampled,
)
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.decoding.speculative.target import TargetStepper, keep_cache_paths, path_mask
from llm_modules.decoding.speculative.tree import DraftTree
from llm_modules.decoding.speculative.tree_proposer import TreeProposer
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import left_pad

from ..helpers import OPTIONS, decode_rows, nudge_gates


def _model(pair, bridge="eca", noise=False):
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=pair["large"], small=pair["small"], bridge=bridge, small_inputs="mapped",
                                    head="projected", **OPTIONS[bridge])
    nudge_gates(model)
    if noise:
        with torch.no_grad():
            model.head.up.weight.normal_(0, 5.0)  # the drafter's drafts are noise
    return model.double().eval()


def _prompts(vocab, seed, n=6):
    """Prompts that repeat a span (lookup can copy) interleaved with random ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        span = torch.randint(3, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        out.append(span * 3 + span[:2] if i % 2 == 0 else span)
    return out


def _a_tree():
    """Root 5; trunk 7 -> 8 -> 9; runners-up 11 (after the root) and 12 (after 7); a lookup branch 7 -> 13."""
    tree = DraftTree.chain(5, [7, 8, 9])
    tree.add(0, 11)
    tree.add(1, 12)
    tree.add_chain(0, [7, 13])
    return tree


def test_a_tree_merges_shared_prefixes_and_knows_its_paths():
    tree = _a_tree()
    assert tree.tokens == [5, 7, 8, 9, 11, 12, 13]
    assert tree.parents == [-1, 0, 1, 2, 0, 1, 1]
    assert tree.depths() == [0, 1, 2, 3, 1, 2, 2]
    assert tree.path(6) == [0, 1, 6] and tree.path(3) == [0, 1, 2, 3]
    anc = tree.ancestors(8)
    assert anc[6].nonzero().flatten().tolist() == [0, 1, 6]
    assert anc[7].nonzero().flatten().tolist() == [7]  # padding sees itself only
    # a second deterministic attempt at 7 adds nothing; a drawn one adds an attempt at the same node
    assert [c for c, _ in tree.attempts[0]] == [1, 4]
    tree.add(0, 7, torch.full((20,), 0.05))
    assert [c for c, _ in tree.attempts[0]] == [1, 4, 1]


def test_greedy_tree_rule_follows_the_targets_choices():
    tree = _a_tree()
    # choices[i]: the target's token after node i
    assert accept_tree_greedy(tree, [7, 13, 0, 0, 0, 0, 4]) == ([0, 1, 6], 4)
    assert accept_tree_greedy(tree, [11, 0, 0, 0, 3, 0, 0]) == ([0, 4], 3)
    assert accept_tree_greedy(tree, [7, 8, 9, 2, 0, 0, 0]) == ([0, 1, 2, 3], 2)
    assert accept_tree_greedy(tree, [6, 8, 9, 2, 0, 0, 0]) == ([0], 6)


# ---------------------------------------------------------------------- the target's pass over a tree
def _verify_pass(target, prompts):
    """The prompts prefilled (left-padded), then one pass over a tree per row: (stepper, the prompts' mask,
    the trees, the pass's logits, states and cache)."""
    stepper = TargetStepper(target, [1, 2])
    ids, mask = left_pad(prompts, 0)
    _, _, cache = stepper.run(ids, mask, None, logits_to_keep=1)
    trees = [_a_tree(), DraftTree.chain(4, [10, 12])]
    size = max(len(t) for t in trees)
    nodes = torch.tensor([t.tokens + [0] * (size - len(t)) for t in trees])
    depths = torch.tensor([t.depths() + [0] * (size - len(t)) for t in trees])
    with torch.no_grad():
        out = stepper.run_tree(nodes, torch.stack([t.ancestors(size) for t in trees]), depths, mask, cache)
    return stepper, mask, trees, out


def _alone(target, tokens):
    with torch.no_grad():
        out = target(torch.tensor([tokens]), output_hidden_states=True)
    return out.logits[0, -1], torch.stack([out.hidden_states[1][0, -1], out.hidden_states[2][0, -1]])


def test_every_node_of_a_tree_scores_as_its_own_path_alone(mapped_pair):
    target = _model(mapped_pair).large
    prompts = [[3, 9, 4, 17, 5], [8, 6, 2]]  # left-padded: rows of different lengths
    stepper, mask, trees, (logits, states, cache) = _verify_pass(target, prompts)
    for b, (prompt, tree) in enumerate(zip(prompts, trees)):
        for i in range(len(tree)):
            want_logits, want_states = _alone(target, prompt + [tree.tokens[n] for n in tree.path(i)])
            torch.testing.assert_close(logits[b, i], want_logits, rtol=0, atol=1e-10)
            torch.testing.assert_close(states[b, i], want_states, rtol=0, atol=1e-10)


@pytest.mark.parametrize("paths", [[[0, 1, 6], [0, 1]], [[0, 4], [0, 1, 2]], [[0], [0]], [[0, 1, 2, 3], [0]]])
def test_rolling_back_to_any_path_leaves_the_cache_of_a_recompute(mapped_pair, paths):
    target = _model(mapped_pair).large
    prompts = [[3, 9, 4, 17, 5], [8, 6, 2]]
    stepper, mask, trees, (_, _, cache) = _verify_pass(target, prompts)
    past, longest = mask.shape[1], max(len(p) for p in paths)
    keep_cache_paths(stepper.slots(cache), past, paths)
    stepper.set_length(cache, past + longest)
    kept = [prompt + [tree.tokens[n] for n in path] for prompt, tree, path in zip(prompts, trees, paths)]
    mask = torch.cat([mask, path_mask(paths, mask)], 1)  # each row's past, its path, then holes (masked)
    # one more token after each kept path: the rolled-back cache must give what a recompute gives
    nxt = torch.tensor([[21], [22]])
    with torch.no_grad():
        logits, _, _ = stepper.run(nxt, torch.cat([mask, torch.ones_like(nxt)], 1), cache)
    for b, tokens in enumerate(kept):
        torch.testing.assert_close(logits[b, -1], _alone(target, tokens + [int(nxt[b])])[0], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------- decoding with trees
def _target_alone(target, prompts, options):
    return decode_rows(DecodeBatch(target), prompts, options)


@pytest.mark.parametrize("width, lookup, noise", [(1, True, False), (3, False, False), (3, True, False),
                                                  (2, True, True)])
def test_greedy_tree_decoding_is_the_targets_own_with_rows_joining_and_leaving(mapped_pair, width, lookup, noise):
    model = _model(mapped_pair, "ladder", noise=noise)
    target = model.large
    prompts = _prompts(model.vocab_size, seed=3)
    options = [SamplingOptions(max_new_tokens=n) for n in (14, 6, 11, 17, 4, 9)]
    alone = _target_alone(target, prompts, options)
    proposer = TreeProposer(ComposedProposer(model, draft_tokens=3),
                            PromptLookup(model.vocab_size, draft_tokens=5) if lookup else None, width=width)
    spec = SpeculativeBatch(target, proposer)
    assert decode_rows(spec, prompts, options, join_at=2) == alone
    assert spec.stats.passes > 0
    assert (proposer.lookup_rows > 0) == lookup


def test_prompt_lookup_alone_as_a_tree_is_the_targets_own(mapped_pair):
    target = _model(mapped_pair).large
    prompts = _prompts(200, seed=5)
    options = [SamplingOptions(max_new_tokens=12)] * 6
    spec = SpeculativeBatch(target, TreeProposer(None, PromptLookup(target.config.vocab_size, draft_tokens=4)))
    assert decode_rows(spec, prompts, options, join_at=1) == _target_alone(target, prompts, options)


class RunnerUp:
    """A drafter whose first choice is always wrong and whose runner-up is the target's own next token."""

    taps: list[int] = []
    draft_tokens = 3

    def __init__(self, target):
        self.target, self.last_logits = target, []

    def join(self, rows, ids, mask, states):
        pass

    def propose(self, first, k, rows):
        from llm_modules.decoding.generation import generate

        vocab = self.target.config.vocab_size
        right = torch.stack([generate(self.target, torch.tensor([s.prompt + s.tokens]), max_new_tokens=k)[0, -k:]
                             for s in rows])  # (B, k): the target's own continuation after each row's `first`
        wrong = (right + 1) % vocab
        self.last_logits = []
        for j in range(k):
            logits = torch.zeros(len(rows), vocab)
            logits.scatter_(1, wrong[:, j: j + 1], 2.0)
            logits.scatter_(1, right[:, j: j + 1], 1.0)
            self.last_logits.append(logits)
        return wrong, None

    def commit(self, accepted, tokens, states):
        pass

    def keep(self, index):
        pass


def test_a_runner_up_the_target_agrees_with_is_kept(mapped_pair):
    target = _model(mapped_pair).large
    prompts = _prompts(target.config.vocab_size, seed=8, n=2)
    options = [SamplingOptions(max_new_tokens=13)] * 2
    alone = _target_alone(target, prompts, options)
    chain = SpeculativeBatch(target, TreeProposer(RunnerUp(target), None, width=1))
    assert decode_rows(chain, prompts, options) == alone
    assert chain.stats.accepted == 0
    tree = SpeculativeBatch(target, TreeProposer(RunnerUp(target), None, width=2))
    assert decode_rows(tree, prompts, options) == alone
    # every pass keeps the runner-up at depth 1 (a leaf) and the target's token after it
    assert tree.stats.accepted == tree.stats.row_passes
    assert tree.stats.passes < chain.stats.passes


def test_a_tree_proposer_needs_a_source_and_a_width():
    with pytest.raises(LLMModulesError, match="needs a drafter"):
        TreeProposer(None, None)
    with pytest.raises(LLMModulesError, match="--draft-width"):
        TreeProposer(None, PromptLookup(10), width=0)


# ---------------------------------------------------------------------- sampled rows
@pytest.mark.parametrize("copy_first", [False, True])
def test_the_tree_rule_keeps_the_targets_distribution(copy_first):
    """Chi-square over 5 tokens (4 dof, 0.1% level 18.47) of the first token a row gives, for trees holding a
    drawn draft, its runner-up (chosen after seeing the draw) and a copy that often is the same token, tried
    before the draw or after it (a drawn draft equal to a copy tried first must still be tried itself)."""
    p = torch.tensor([0.3, 0.1, 0.35, 0.2, 0.05])
    q = torch.tensor([0.1, 0.05, 0.6, 0.05, 0.2])
    g = torch.Generator().manual_seed(0)
    n = 30000
    counts = torch.zeros(5)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        tree = DraftTree.root(0)
        if copy_first:
            tree.add(0, 2)  # prompt lookup's copy: the drafter's likeliest token too
        tree.add(0, d, q)
        runner_up = int(torch.tensor([q[i] if i != d else -1.0 for i in range(5)]).argmax())
        tree.add(0, runner_up)
        if not copy_first:
            tree.add(0, 2)
        path, nxt = accept_tree_sampled(tree, p[None].expand(len(tree), 5), g)
        counts[tree.tokens[path[1]] if len(path) > 1 else nxt] += 1
    expected = p * n
    assert float(((counts - expected) ** 2 / expected).sum()) < 18.47, (counts, expected)


def test_the_tree_rule_keeps_the_targets_distribution_two_deep():
    """The second token too (given the first is kept along the trunk): a two-level tree, 25 outcomes."""
    p1 = torch.tensor([0.5, 0.3, 0.2])
    p2 = torch.tensor([[0.2, 0.2, 0.6], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])  # after token 0, 1, 2
    q1 = torch.tensor([0.2, 0.6, 0.2])
    g = torch.Generator().manual_seed(1)
    n = 30000
    counts = torch.zeros(3, 3)
    for _ in range(n):
        d1 = int(torch.multinomial(q1, 1, generator=g))
        tree = DraftTree.root(9)
        trunk = tree.add(0, d1, q1)
        tree.add(trunk, 2)  # a deterministic second draft
        tree.add(0, 0)  # a deterministic sibling: a leaf
        p = torch.stack([p1] + [p2[t] if t < 3 else p1 for t in tree.tokens[1:]])
        path, nxt = accept_tree_sampled(tree, p, g)
        toks = [tree.tokens[i] for i in path[1:]] + [nxt]
        if len(toks) < 2:  # the row gave one token this pass; its second would come from the target alone
            toks.append(int(torch.multinomial(p2[toks[0]], 1, generator=g)))
        counts[toks[0], toks[1]] += 1
    expected = (p1[:, None] * p2) * n
    assert float(((counts - expected) ** 2 / expected).sum()) < 27.88  # 8 dof, 0.1% level
