"""One draft tree per row from a drafter and prompt lookup together: the target verifies both in one pass.

The drafter's chain of K drafts is the tree's trunk; with `width` > 1 the drafter's runners-up at every depth
(its next most likely tokens after the same prefix) hang off the trunk as leaves: when the target rejects
the drafter's first choice at some depth but takes a runner-up, the row still gains that token and the
target's own after it (EAGLE-2's trees expand the likeliest nodes further; a leaf costs no extra drafter
pass). Prompt lookup's copy (where the row's context ends in a repeated n-gram of at least `min_match`
tokens) is a second branch from the root, shared with the trunk where they agree. A verify pass over N
nodes costs about one decode step while N is small (`benchmarks/verify_pass_cost.py`), so the row keeps
whichever source was right, at the price of the wider pass.

Sampled rows: the trunk's drafts carry the drafter's probabilities, runners-up and copies are one-hot
proposals tried after the drafted token they were chosen beside (`tree`), so the output keeps the target's
distribution.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.decoding.speculative.prompt_lookup import PromptLookup, copy_source
from llm_modules.decoding.speculative.proposer import Proposer
from llm_modules.decoding.speculative.tree import DraftTree
from llm_modules.errors import LLMModulesError


class TreeProposer:
    """A tree proposer (`proposer.propose_trees` calls `propose_tree`) over a `drafter` (a proposer that keeps
    its per-draft logits in `last_logits`, as `ComposedProposer` does; None: lookup only) and a `lookup`
    (a `PromptLookup`; None: the drafter's tree only). Drafts the drafter's K; copies up to lookup's K.

    Counts since it was made, for benchmarks: `passes`, `lookup_rows` (rows given a copy, summed over passes)."""

    # a copy after a 1-token match too: on a Spec-Bench summarization question, lookup alone took 35 passes for 128
    # tokens, the tree's lookup 44 with matches of 2 tokens and more only, 35 with 1-token matches
    # (reports/spec_bench/copies_policy/diag_sum.log); such a copy's source is "lookup1" ("lookup" after a longer
    # match), so the drafting policy learns how often each kind is right
    DEFAULT_MIN_MATCH = 1
    # runners-up per depth + 1 when none is asked for: on Spec-Bench (1 question per category + 1 HumanEval, the
    # general drafter with lookup, bfloat16; reports/spec_bench/trees) width 5 kept 1.90 tokens per pass, width 3
    # 1.83, width 1 1.69; timed with nothing else running (trees_quiet) width 5 with lookup gave 1.11x, width 3 1.09x
    DEFAULT_WIDTH = 5

    def __init__(self, drafter: Proposer | None, lookup: PromptLookup | None, width: int = 1,
                 min_match: int = DEFAULT_MIN_MATCH):
        if drafter is None and lookup is None:
            raise LLMModulesError("a draft tree needs a drafter, prompt lookup, or both")
        if width < 1:
            raise LLMModulesError(f"--draft-width must be >= 1, got {width}")
        if lookup is not None and not lookup.min_ngram <= min_match <= lookup.max_ngram:
            raise LLMModulesError(f"a draft tree's lookup needs min_match between prompt lookup's n-gram sizes "
                                  f"({lookup.min_ngram} and {lookup.max_ngram}), got {min_match}")
        self.drafter, self.lookup, self.width, self.min_match = drafter, lookup, width, min_match
        self.sources = [s for s in (drafter, lookup) if s is not None]
        self.taps = list(drafter.taps) if drafter is not None else []
        self.draft_tokens = (drafter or lookup).draft_tokens
        self.last_batch_stats: Any = None  # set by the SpeculativeBatch it drafts for
        self.passes = self.lookup_rows = 0

    @property
    def max_depth(self) -> int:
        """The deepest node a tree can hold (a verify pass reads this many positions past the root)."""
        return max(s.draft_tokens for s in self.sources)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.drafter, "max_positions", None)

    def counts(self) -> dict[str, int]:
        return {"passes": self.passes, "lookup_rows": self.lookup_rows}

    def join(self, rows: list[Any], ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor | None) -> None:
        for source in self.sources:  # the drafter first: the one that can fail (a forward pass)
            source.join(rows, ids, mask, states)

    def propose_tree(self, first: torch.Tensor, k: int, rows: list[Any], policy: Any = None) -> list[DraftTree]:
        """Each row's tree: lookup's copy, then the drafter's k drafts and runners-up, unless the drafting `policy`
        (a `DraftPolicy`) rests the drafter beside the copies (`beside_copies`)."""
        trees = [DraftTree.root(token) for token in first.tolist()]
        self.passes += 1
        # lookup's copy first: a node both sources propose is the copy's, so the drafter is credited (and the
        # drafting policy keeps it drafting deep) only for what it adds beyond the copy
        if self.lookup is not None:
            copied = self.lookup.copies(first, self.lookup.draft_tokens)  # no padding, no one-hot proposals
            for tree, found, matched in zip(trees, copied, self.lookup.matched):
                if matched >= self.min_match:
                    tree.add_chain(0, found, source=copy_source(matched))
                    self.lookup_rows += 1
            if policy is not None and self.drafter is not None:
                k = policy.beside_copies(rows, trees, k)
        if self.drafter is not None and k > 0:  # k = 0: the drafting policy rests the drafter this pass
            self._add_drafts(trees, first, k, rows)
        return trees

    def _add_drafts(self, trees: list[DraftTree], first: torch.Tensor, k: int, rows: list[Any]) -> None:
        """The drafter's chain into each tree (its probabilities as proposals when some row samples), then its
        runners-up at every depth as leaves, tried after the drafted token."""
        drafts, q = self.drafter.propose(first, k, rows)
        drafts = drafts.tolist()
        q = None if q is None else q.detach().float().cpu()
        trunks = [tree.add_chain(0, row, None if q is None else list(q[b].unbind(0)), "drafter")
                  for b, (tree, row) in enumerate(zip(trees, drafts))]
        if self.width == 1:
            return
        for depth, logits in enumerate(self.drafter.last_logits):
            ranked = logits.topk(self.width, -1).indices.tolist()  # (B, width)
            for tree, trunk, row, best in zip(trees, trunks, drafts, ranked):
                parent = trunk[depth - 1] if depth else 0
                for token in [t for t in best if t != row[depth]][: self.width - 1]:
                    tree.add(parent, token, source="runner-up")

    def commit(self, accepted: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None) -> None:
        for source in self.sources:
            source.commit(accepted, tokens, states)

    def keep(self, index: list[int]) -> None:
        for source in self.sources:
            source.keep(index)
