"""How much to draft, per pass and per row, so that speculation pays at every batch size.

A verify pass over N nodes per row costs more than a one-token step, and more so the more rows a batch holds
(a pass reads B x N tokens; the drafter's own time comes on top). Drafting pays only while the tokens it adds
outweigh that. `DraftPolicy` keeps two estimates, both from the batch's own passes:

- per row and per source of drafts (a tree node's `source`: the drafter's trunk, its runners-up, prompt
  lookup's copy), the chance that the target keeps a node of that source once it reaches it (an exponential
  average over the row's passes), so a node's chance of being kept is the product along its path;
- per batch size B, the cost of a pass: a plain step (a pass with no drafts, timed when none at that size was
  timed lately), the target's extra time per node per row relative to it (`slope`), and the drafter's time.

Each pass it keeps the same number N - 1 of nodes for every row (a batch's pass reads N columns per row,
padding included), each row's likeliest nodes (they form a subtree: a child is never likelier than its
parent), choosing N to maximise expected tokens per second: the batch's rows plus the kept nodes' chances,
over the pass's cost at N. N = 1 drafts nothing: a plain step. A row whose best node would not pay its own
share of the pass's cost drafts nothing either. The drafter drafts one token deeper than the deepest of its
nodes the last pass kept (its own time falls with K); after a pass that kept none of its nodes it rests (is not
run at all: a pass then costs what a plain step costs, plus prompt lookup's scan; the drafter reads the tokens
verified meanwhile at its next proposal), and every `EXPLORE_EVERY`-th pass in a row that rested it drafts fully
again so that its chances are measured anew. A pass's cost is the target's pass and the rollback after it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from llm_modules.decoding.speculative.tree import DraftTree


@dataclass
class BatchCost:
    """What a pass costs at one batch size: seconds of a plain step (None: not timed yet), the target's extra
    time per node per row as a fraction of a step, the drafter's seconds per pass, and passes since a plain
    step was timed."""

    step: float | None = None
    slope: float = 0.0
    draft: float = 0.0
    since_step: int = 0


@dataclass
class DraftPolicy:
    """Chooses each pass's tree size and prunes every row's tree to it (`prune`), then learns from what the
    target kept and what the pass cost (`observe`)."""

    prior_rate: float = 0.5  # a source's chance before a row has shown any
    memory: float = 0.8  # weight of the past in the exponential averages
    # the target's extra time per node per row, as a fraction of a step, before one is measured: a pass over
    # 1 + 10 tokens cost 1.13x a step at batch 1 here (benchmarks/verify_pass_cost.py); a batch reads B x N
    prior_slope: float = 0.015
    retime_every: int = 64  # passes between timed plain steps at a batch size
    EXPLORE_EVERY = 16  # passes the drafter rests before it drafts fully again

    rates: Any = field(default_factory=weakref.WeakKeyDictionary)  # row -> {source: chance}
    costs: dict[int, BatchCost] = field(default_factory=dict)
    idle: dict[int, int] = field(default_factory=dict)  # batch size -> passes in a row that chose to draft nothing
    resting: dict[int, int] = field(default_factory=dict)  # batch size -> passes in a row the drafter did not run
    timing: dict[int, bool] = field(default_factory=dict)  # batch size -> its last pass timed a plain step
    depth: dict[int, int] = field(default_factory=dict)  # batch size -> deepest drafted node its last pass kept
    proposed: list[DraftTree] = field(default_factory=list)  # the last pass's trees before pruning

    def draft_tokens(self, batch: int, k: int) -> int:
        """How many tokens the drafter drafts this pass: one more than the deepest drafted node the last pass at
        this batch size kept, at most k; none after a pass that kept none of its nodes (the drafter rests: it is
        not run, and its next proposal reads the tokens verified meanwhile), except k on every EXPLORE_EVERY-th
        pass in a row that rested it, so that its chances are measured anew."""
        depth = self.depth.get(batch)
        if depth is None:  # nothing kept or pruned at this batch size yet: the whole K
            return k
        if depth > 0:
            self.resting[batch] = 0
            return min(k, depth + 1)
        rested = self.resting.get(batch, 0) + 1
        self.resting[batch] = rested
        return k if rested % self.EXPLORE_EVERY == 0 else 0

    def chances(self, row: Any, tree: DraftTree) -> list[float]:
        """Per node, the chance the target keeps it: the product of its path's sources' rates (root: 1)."""
        rates = self.rates.get(row, {})
        out = [1.0] * len(tree)
        for i in range(1, len(tree)):
            out[i] = out[tree.parents[i]] * rates.get(tree.sources[i], self.prior_rate)
        return out

    def cost(self, batch: int, nodes: int) -> float:
        """A pass over `nodes` per row at this batch size, in plain steps (the drafter's time included)."""
        c = self.costs.get(batch, BatchCost())
        slope = c.slope if c.step is not None else self.prior_slope * batch
        drafting = c.draft / c.step if c.step else 0.0
        return 1.0 + slope * (nodes - 1) + (drafting if nodes > 1 else 0.0)

    def prune(self, rows: list[Any], trees: list[DraftTree]) -> list[DraftTree]:
        """Every row's tree cut to the N best for the batch (its likeliest N - 1 nodes and the root; none for a row
        whose nodes would not pay their share), N chosen for the most expected tokens per unit of cost."""
        batch = len(rows)
        self.proposed = trees
        c = self.costs.setdefault(batch, BatchCost())
        self.timing[batch] = c.step is None or c.since_step >= self.retime_every
        if self.timing[batch]:  # time a plain step at this batch size
            return [t.subtree([0]) for t in trees]
        ranked = []
        for row, tree in zip(rows, trees):
            chance = self.chances(row, tree)
            ranked.append(sorted(range(1, len(tree)), key=lambda i: (-chance[i], i)))
            ranked[-1] = [(i, chance[i]) for i in ranked[-1]]
        best, best_value = 1, batch / self.cost(batch, 1)
        for n in range(2, max(len(t) for t in trees) + 1):
            value = (batch + sum(p for order in ranked for _, p in order[: n - 1])) / self.cost(batch, n)
            if value > best_value:
                best, best_value = n, value
        # a row's node pays when its chance beats what its share of the extra columns would have given
        share = best_value * (self.cost(batch, best) - self.cost(batch, 1)) / max(best - 1, 1) / batch
        out = []
        for tree, order in zip(trees, ranked):
            keep = [i for i, _ in order[: best - 1]]
            if not order or order[0][1] <= share:
                keep = []
            out.append(tree.subtree(keep))
        self.depth[batch] = max((d for t in out for d, source in zip(t.depths(), t.sources)
                                 if source not in ("root", "lookup")), default=0)
        return out

    def observe(self, rows: list[Any], trees: list[DraftTree], paths: list[list[int]], verify_seconds: float,
                draft_seconds: float, next_tokens: list[int] | None = None) -> None:
        """Learn from a pass: per row and source, which nodes the target reached and kept, and which of the
        drafts pruned right after the root the target's next token (`next_tokens`, after the kept path) shows it
        would have kept (so a row that drafts nothing still learns when its drafter is right again); the pass's
        cost."""
        m = self.memory
        proposed = self.proposed if len(self.proposed) == len(trees) else [None] * len(trees)
        for b, (row, tree, path) in enumerate(zip(rows, trees, paths)):
            on_path = set(path)
            try:
                rates = self.rates.setdefault(row, {})
            except TypeError:  # a row that cannot be weakly referenced is not learned from
                continue
            seen = []  # (source, kept)
            for i in range(1, len(tree)):
                if tree.parents[i] in on_path:  # the target reached this node's parent: it tested this node
                    seen.append((tree.sources[i], i in on_path))
            full = proposed[b]
            if full is not None and next_tokens is not None:
                kept = {tree.tokens[i] for i in range(1, len(tree)) if tree.parents[i] == 0}
                for i in range(1, len(full)):
                    if full.parents[i] == 0 and full.tokens[i] not in kept:
                        seen.append((full.sources[i], len(path) == 1 and full.tokens[i] == next_tokens[b]))
            for source, was_kept in seen:
                rates[source] = m * rates.get(source, self.prior_rate) + (1 - m) * float(was_kept)
        batch = len(rows)
        nodes = max(len(t) for t in trees)
        c = self.costs.setdefault(batch, BatchCost())
        if nodes == 1:
            c.step = verify_seconds if c.step is None else m * c.step + (1 - m) * verify_seconds
            c.since_step = 0
            if not self.timing.get(batch):  # it chose to draft nothing
                self.idle[batch] = self.idle.get(batch, 0) + 1
            return
        c.since_step += 1
        self.idle[batch] = 0
        c.draft = m * c.draft + (1 - m) * draft_seconds if c.draft else draft_seconds
        if c.step:
            slope = max(verify_seconds / c.step - 1.0, 0.0) / (nodes - 1)
            c.slope = m * c.slope + (1 - m) * slope if c.slope else slope
