"""Prompt lookup as a drafter: what it copies, and that speculative decoding with it gives the target's own
greedy tokens and, sampling, the target's distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_modules.decoding.engine import DecodeBatch, Sequence
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.acceptance import accept_tree_sampled
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.prompt_lookup import (
    PromptLookup,
    find_continuation,
    find_match,
)
from llm_modules.decoding.speculative.tree import DraftTree
from llm_modules.errors import LLMModulesError

from ..helpers import decode_rows, tiny_eagle3_target


def test_the_first_occurrence_of_the_longest_ngram_is_copied():
    #          0  1  2  3  4  5  6  7  8  9
    context = [5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7]
    # the tail (6, 7) first occurred at 1..2, followed by 8, 1, 6 (not at 5..6, followed by 9, 2, 6)
    assert find_continuation(context, 3, max_ngram=2) == [8, 1, 6]
    # the 3-gram (2, 3, 4) at 1..3 beats the 2-gram (3, 4) at 5..6
    assert find_continuation([1, 2, 3, 4, 9, 3, 4, 0, 2, 3, 4], 2, max_ngram=3) == [9, 3]
    assert find_continuation([1, 2, 3], 2) == []  # nothing repeats
    assert find_continuation([4], 2) == []
    assert find_continuation([4, 4], 3) == [4]  # a follower right up to the tail itself


def test_the_match_reports_the_ngram_it_used():
    assert find_match([1, 2, 3, 4, 9, 3, 4, 0, 2, 3, 4], 2, max_ngram=3) == ([9, 3], 3)
    assert find_match([5, 6, 7, 8, 1, 6, 7], 2, max_ngram=3) == ([8, 1], 2)
    assert find_match([5, 6, 7, 8, 1, 7], 2, max_ngram=3) == ([8, 1], 1)
    assert find_match([5, 6, 7, 8, 1, 7], 2, max_ngram=3, min_ngram=2) == ([], 0)
    assert find_match([1, 2, 3], 2) == ([], 0)
    proposer = PromptLookup(vocab_size=20, draft_tokens=2)
    proposer.join([None, None], torch.tensor([[5, 6, 7, 8, 1, 6], [0, 0, 1, 2, 3, 4]]),
                  torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]), None)
    options = SamplingOptions(max_new_tokens=4)
    proposer.propose(torch.tensor([7, 9]), 2, [Sequence([1], options, []), Sequence([1], options, [])])
    assert proposer.matched == [2, 0] and (proposer.hits, proposer.proposals) == (1, 2)


def test_a_copy_that_reaches_the_end_is_looked_up_again():
    proposer = PromptLookup(vocab_size=20, draft_tokens=5, max_ngram=2)
    proposer.join([None], torch.tensor([[0, 3, 4, 3, 4]]), torch.tensor([[0, 1, 1, 1, 1]]), None)
    drafts, q = proposer.propose(torch.tensor([3]), 5, [Sequence([3], SamplingOptions(max_new_tokens=4), [])])
    assert drafts.tolist() == [[4, 3, 4, 3, 4]] and q is None


def test_a_rows_tree_holds_its_copy_alone_and_no_match_leaves_the_root_alone():
    proposer = PromptLookup(vocab_size=20, draft_tokens=4)
    proposer.join([None, None], torch.tensor([[5, 6, 7, 8, 1, 6], [0, 0, 1, 2, 3, 4]]),
                  torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]), None)
    options = SamplingOptions(max_new_tokens=4)
    trees = proposer.propose_tree(torch.tensor([7, 9]), 4, [Sequence([1], options, []), Sequence([1], options, [])])
    # row 0 ends in (6, 7), first seen at 1..2: copies 8, 1, 6, 7 (the copy runs on from what it copied); row 1:
    # 9 occurs nowhere, so its tree is its own token alone (the chain would pad it with four 9s)
    assert [t.tokens for t in trees] == [[7, 8, 1, 6, 7], [9]]
    assert set(trees[0].sources[1:]) == {"lookup"}


def test_a_row_without_a_match_verifies_its_own_token_only():
    """The engine's drafted count is the copies found, never padding: rows with no match add no node. (A target
    with an untied head: a tiny tied one mostly repeats its last token, so every row would match.)"""
    target = tiny_eagle3_target().double()
    prompts = _repetitive_prompts(3, seed=2) + [[11, 52, 3, 87], [40, 9], [77, 31, 65]]
    options = [SamplingOptions(max_new_tokens=n) for n in (12, 12, 12, 6, 6, 6)]
    proposer = PromptLookup(target.config.vocab_size, draft_tokens=5)
    spec = SpeculativeBatch(target, proposer)
    found = []
    real = proposer.propose_tree

    def counted(first, k, rows, policy=None):
        trees = real(first, k, rows, policy)
        found.append(list(proposer.found))
        return trees

    proposer.propose_tree = counted
    assert decode_rows(spec, prompts, options) == decode_rows(DecodeBatch(target), prompts, options)
    assert spec.stats.drafted == sum(map(sum, found))
    assert min(map(min, found)) < 5  # some row found less than K: a chain would have padded it


def test_bad_options_are_refused():
    with pytest.raises(LLMModulesError, match="min_ngram"):
        PromptLookup(10, min_ngram=3, max_ngram=2)
    with pytest.raises(LLMModulesError, match="draft_tokens"):
        PromptLookup(10, draft_tokens=0)


@pytest.fixture
def target(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float64).eval()


def _repetitive_prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        span = torch.randint(3, 120, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        prompts.append(span * 3 + span[:2])  # the answer may well continue the pattern
    return prompts


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_output_is_the_targets_own_with_rows_joining_and_leaving(target, k):
    prompts = _repetitive_prompts(6, seed=k)
    options = [SamplingOptions(max_new_tokens=n) for n in (20, 9, 25, 14, 30, 5)]
    alone = decode_rows(DecodeBatch(target), prompts, options)
    proposer = PromptLookup(target.config.vocab_size, draft_tokens=k)
    spec = SpeculativeBatch(target, proposer)
    assert decode_rows(spec, prompts, options, join_at=2) == alone
    assert proposer.hits > 0 and spec.stats.passes > 0


def test_copying_saves_passes_on_an_answer_that_repeats_its_prompt(target):
    """A random tiny model falls into loops; once it does, copies are accepted: fewer verify passes than tokens."""
    prompts = _repetitive_prompts(1, seed=5)
    options = [SamplingOptions(max_new_tokens=60)]
    spec = SpeculativeBatch(target, PromptLookup(target.config.vocab_size, draft_tokens=4))
    out = decode_rows(spec, prompts, options)
    assert out == decode_rows(DecodeBatch(target), prompts, options)
    assert spec.stats.accepted > 0 and spec.stats.passes < len(out[0])


def test_a_one_hot_proposal_keeps_the_targets_distribution():
    """Chi-square over 5 tokens (4 dof, 0.1% level 18.47): the rule with a deterministic draft samples from p."""
    p = torch.tensor([[0.4, 0.25, 0.2, 0.1, 0.05]] * 2)
    q = torch.nn.functional.one_hot(torch.tensor([2]), 5).float()
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(5)
    for _ in range(n):
        path, nxt = accept_tree_sampled(DraftTree.chain(0, [2], list(q)), p, g)
        counts[2 if len(path) == 2 else nxt] += 1
    expected = p[0] * n
    assert float(((counts - expected) ** 2 / expected).sum()) < 18.47


def test_sampled_rows_decode_with_one_hot_probabilities(target):
    prompts = _repetitive_prompts(2, seed=3)
    options = [SamplingOptions(max_new_tokens=12, do_sample=True, temperature=0.8, seed=s) for s in (1, 2)]
    spec = SpeculativeBatch(target, PromptLookup(target.config.vocab_size, draft_tokens=3))
    with torch.no_grad():
        out = decode_rows(spec, prompts, options)
    assert [len(o) for o in out] == [12, 12]
