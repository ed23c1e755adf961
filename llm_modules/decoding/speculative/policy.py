"""How much to draft, per pass and per row, so that speculation pays at every batch size.

A verify pass over N nodes per row costs more than a one-token step, and more so the more rows a batch holds
(a pass reads B x N tokens; the drafter's own time comes on top). Drafting pays only while the tokens it adds
outweigh that. `DraftPolicy` keeps two estimates, both from the batch's own passes:

- per row and per source of drafts (a tree node's `source`: the drafter's trunk, its runners-up, prompt
  lookup's copy), the chance that the target keeps a node of that source once it reaches it (an exponential
  average over the row's passes, starting from the same source's chance pooled over every row seen so far, so
  a row joining a batch starts from what its neighbours showed, not from the prior), so a node's chance of
  being kept is the product along its path. A node right after the root and a node after another draft are
  learned apart (`rate_key`: "lookup" and "lookup+"): once a copy's first token is right its next ones
  usually are too, so a long copy is priced as it pays, not as the first token's chance to the power of its
  length; siblings are exclusive (the target keeps at most one child of a
  node), so the chances of one node's children are scaled down to sum to at most its own;
- the cost of a pass by the columns it reads (rows x nodes per row, `PassCosts`), whatever the row count.

Each pass it keeps the same number N - 1 of nodes for every row (a batch's pass reads N columns per row,
padding included, so a row's unlikely nodes cost nothing more than its padding would), each row's likeliest
nodes (they form a subtree: a child is never likelier than its parent), choosing N to maximise expected tokens
per second: the batch's rows plus the kept nodes' chances, over the pass's cost at N, where a pass that drafts
(N > 1) also pays for this pass's proposals (`draft_seconds`: the drafter's time when it ran, only lookup's scan
when it rested; so the drafter's nodes must pay for it, and a copy while the drafter rests need not). N = 1
drafts nothing: a plain step. The drafter drafts one token deeper than the deepest of its nodes the last pass
kept (its own time falls with K); after a pass that kept none of its nodes it rests (is not run at all: a pass
then costs what a plain step costs, plus prompt lookup's scan; the drafter reads the tokens verified meanwhile
at its next proposal), and every `EXPLORE_EVERY`-th pass in a row that rested it drafts one token so that its chance is
measured anew; a proposer with no network to rest (`free`: prompt lookup alone) proposes every pass. In a tree
with prompt lookup, the drafter also stands aside on a pass where every row has a copy worth more than the
drafter's time would buy beside it (`beside_copies`). A pass's
cost is the target's pass and the rollback after it; the first two passes, and one in every `retime_every` after,
are plain steps, timed (the drafter is not run for them).
"""

from __future__ import annotations

import statistics
import weakref
from dataclasses import dataclass, field
from typing import Any

from llm_modules.decoding.speculative.tree import DraftTree


@dataclass
class PassCosts:
    """Seconds of a target pass (with the rollback after it) by the columns it reads, T = rows x nodes per row,
    padding included: what a pass costs depends on T far more than on how T splits into rows and nodes (here,
    Qwen2.5-Coder-1.5B in bfloat16, 2 threads, reports/speculative/batch_sweep: a one-token step over 8 rows
    215-220 ms and a pass over one row of 11 nodes 215-217 ms; over 16 rows a step 214-235 ms and a speculative
    step of 3 to 5 nodes a row 442-633 ms, drafting included). Per T seen, the median of its last `window`
    readings, the first reading dropped once a second comes (a first reading carries one-off costs: the first
    16-row step after a prefill took 330 ms here against 257 ms later, and taken as the step's cost it priced a
    32-column pass at 1.26 steps, not 1.6; and one 883 ms step among 300-390 ms ones, averaged in, made a 32-column
    pass look as cheap as a step, so that the batch drafted every pass at a loss); between two, interpolated;
    past the largest, extended along the slope from the smallest to the largest (two close widths' noise gave a
    flat slope here, and a 132-column pass priced as a 32-column one cost 1.8x it;
    `prior_slope` of the largest's seconds per column while only one is seen); below the smallest, its seconds.
    Never decreasing in T.
    A batch whose rows leave or join meets a new row count each time: the account of every count serves it, so no
    pass is spent timing it.
    A prefill is a pass over its rows x their padded width, and is added as one (`SpeculativeBatch._prefill`): a
    wide, measured point, so that the first drafted pass is priced by interpolation towards it, not by the prior
    slope. Where a target's step turns compute-bound early the prior priced it far too cheap: here (float32 on 2
    AVX2 cores) a 16-row step cost 570 ms, and the first 32-column pass after it, priced at 1.24 steps, cost 1,125
    ms (1.97 steps: with the drafter's first run at 16 rows, the 2% the sweep lost at 8 and 16 rows,
    reports/speculative/batch_sweep_avx2_float32); interpolated towards the prompts' prefill (2,256 columns, 46 s)
    it costs 1.57 steps."""

    prior_slope: float = 0.015
    window: int = 5
    seen: dict[int, float] = field(default_factory=dict)  # columns -> the estimate
    readings: dict[int, list[float]] = field(default_factory=dict)  # columns -> its last readings
    counts: dict[int, int] = field(default_factory=dict)  # columns -> passes timed

    def add(self, columns: int, seconds: float) -> None:
        count = self.counts.get(columns, 0)
        self.counts[columns] = count + 1
        kept = [] if count == 1 else self.readings.get(columns, [])  # the second reading replaces the first
        self.readings[columns] = kept = (kept + [seconds])[-self.window:]
        self.seen[columns] = statistics.median(kept)

    def __call__(self, columns: int) -> float | None:
        if not self.seen:
            return None
        known = sorted(self.seen)
        below = [t for t in known if t <= columns]
        if not below:
            return self.seen[known[0]]
        low = below[-1]
        floor = max(self.seen[t] for t in below)  # never below a narrower pass's cost
        if low == columns:
            return max(self.seen[low], floor)
        above = [t for t in known if t > columns]
        if above:
            high = above[0]
            value = self.seen[low] + (self.seen[high] - self.seen[low]) * (columns - low) / (high - low)
        else:
            if len(known) >= 2:
                a, b = known[0], known[-1]
                slope = max((self.seen[b] - self.seen[a]) / (b - a), 0.0)
            else:
                slope = self.prior_slope * self.seen[low]
            value = self.seen[low] + slope * (columns - low)
        return max(value, floor)


@dataclass
class DraftPolicy:
    """Chooses each pass's tree size and prunes every row's tree to it (`prune`), then learns from what the
    target kept and what the pass cost (`observe`)."""

    prior_rate: float = 0.5  # a source's chance before a row has shown any
    memory: float = 0.8  # weight of the past in the exponential averages
    # the target's extra time per column, as a fraction of a one-column pass, before two widths are measured: a
    # pass over 1 + 10 tokens cost 1.13x a step at batch 1 here (benchmarks/verify_pass_cost.py)
    prior_slope: float = 0.015
    retime_every: int = 64  # passes between timed plain steps
    # a pass drafts only when predicted to yield this share more tokens per second than a plain step: at 16
    # rows here a drafted pass is near break-even (a 32-column pass 1.3-1.45x a step for 4-9 tokens more over
    # 16 rows; lookup-only passes' gains were predicted 5-7 and kept 1-9), and passes drafted on a predicted
    # gain within the predictions' error lost: 0.82-0.94x the target alone over three runs
    # (reports/speculative/batch_8_16_holes/NOTES.md)
    margin: float = 0.1
    stand_aside: bool = True  # whether the drafter may stand aside for prompt lookup's copies (`beside_copies`)
    EXPLORE_EVERY = 16  # passes the drafter rests before it drafts (one token) again

    rates: Any = field(default_factory=weakref.WeakKeyDictionary)  # row -> {source: chance}
    # source -> [kept, tested] over every row, both decayed by `memory` each pass; starts at `prior_weight`
    # pseudo-tests of `prior_rate`, so the first pass's rows (many at a large batch) replace the prior at once
    pooled: dict[str, list[float]] = field(default_factory=dict)
    prior_weight: float = 2.0
    passes: PassCosts | None = None  # seconds of a pass by its columns (rows x nodes); made in __post_init__
    since_step: int = 0  # passes since a plain step was timed
    steps_timed: int = 0  # plain steps timed so far (the first two are, whatever the rows predict)
    timing: bool = False  # the last pass timed a plain step
    depth: int | None = None  # deepest drafted node the last pass kept (None: nothing kept or pruned yet)
    resting: int = 0  # passes in a row the drafter did not run
    proposed: list[DraftTree] = field(default_factory=list)  # the last pass's trees before pruning
    drafting: int = 0  # tokens the drafter drafts this pass (0: it does not run)
    skipped: bool = False  # this pass the drafter stood aside for prompt lookup's copies (`beside_copies`)
    # batch size -> the drafter's seconds per drafted token (an exponential average over its proposals)
    drafter_seconds: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.passes is None:
            self.passes = PassCosts(self.prior_slope)

    def draft_tokens(self, batch: int, k: int) -> int:
        """How many tokens the drafter drafts this pass: one more than the deepest drafted node the last pass kept,
        at most k; none after a pass that kept none of its nodes (the drafter rests: it is not run, and its next
        proposal reads the tokens verified meanwhile), except one on every EXPLORE_EVERY-th pass in a row that
        rested it, so that its first draft's chance is measured anew (one draft: a full K at batch 16 cost ~70 ms,
        a quarter of a step; once a draft is kept, the next pass drafts one deeper). None on a timed plain step.
        The last pass is the batch's last, whatever its size then (rows leave and join between passes)."""
        self.skipped = False
        self.drafting = self._draft_tokens(k)
        if self.drafting and not self.may_pay(batch, self.drafting):
            self.drafting = 0
        return self.drafting

    def may_pay(self, batch: int, k: int) -> bool:
        """Whether the drafter's chain of at most k tokens a row, at the chances pooled over every row, is predicted
        to beat a plain step by the margin at this batch size, its own time included (once measured): if not, it
        is not run. Where a pass over twice a batch's columns costs near twice its step (16 rows here in float32:
        1.97 steps), the drafter's first run, whose drafts the pass then pruned, cost 151 ms on a 570 ms step, and
        each run exploring again 90 ms."""
        return self._chain_pays(batch, k, "drafter", self.drafter_seconds.get(batch, 0.0))

    def plain_pass(self, batch: int, k: int) -> bool:
        """Whether this pass asks no proposer at all and is a plain step: a timed one, or one where no source's
        chain of at most k tokens a row (the drafter's, prompt lookup's, any other seen) is predicted to pay at
        its pooled chances (`may_pay`). Asking prompt lookup and pruning every copy cost 2-3 ms a pass at 16
        rows here; the batch then runs the pass as its plain step, with nothing to roll back. A source's chances
        pooled over every row return to the prior while it is not asked, so a batch that shrinks, or a cheaper
        pass, asks again."""
        timed = self._times_step() or self.passes(batch) is None
        sources = {"drafter", "lookup"} | {s for s in self.pooled if not s.endswith("+")}
        if not timed and any(self._chain_pays(batch, k, s, self.drafter_seconds.get(batch, 0.0) if drafted(s) else 0.0)
                             for s in sources):
            return False
        self.skipped, self.drafting, self.proposed, self.timing = False, 0, [], timed
        return True

    def _chain_pays(self, batch: int, k: int, source: str, per_token: float) -> bool:
        """Whether a chain of at most k tokens a row from `source`, at its pooled chances, costing `per_token`
        seconds a token to propose, is predicted to beat a plain step by the margin (True before any step is
        measured)."""
        if self.passes(batch) is None:
            return True
        first, rest = self.rate(source), self.rate(source + "+")
        plain = batch / self.cost(batch, 1) * (1 + self.margin)
        return any((batch + batch * sum(first * rest ** d for d in range(n))) / self.cost(batch, n + 1, per_token * n)
                   > plain for n in range(1, k + 1))

    def _draft_tokens(self, k: int) -> int:
        if self._times_step():  # a timed plain step: nothing to draft
            return 0
        if self.depth is None:  # nothing kept or pruned yet: the whole K
            return k
        if self.depth > 0:
            self.resting = 0
            return min(k, self.depth + 1)
        self.resting += 1
        return 1 if self.resting % self.EXPLORE_EVERY == 0 else 0

    def beside_copies(self, rows: list[Any], trees: list[DraftTree], k: int) -> int:
        """How many tokens the drafter drafts after prompt lookup's copies are in the rows' trees: k, or 0 when the
        drafts are predicted to add fewer tokens than the drafter's time is worth. Per row, the drafter's chain adds
        its expected kept tokens only where the copy's first token is not kept; the drafter costs its seconds per
        token (measured at this batch size) times k, as a share of a plain step; the pass yields 1 + the copy's
        expected kept tokens per row without it. So where every row's answer is quoting its context and the copies
        are being kept, the drafter is not run and the pass costs what prompt lookup's alone does (on Spec-Bench's
        summarization and HumanEval questions the drafter's 18 ms a pass was 7% of a step, on passes where its
        drafts added next to nothing beside the copy: reports/spec_bench/holes_margin). Until the drafter's time
        at this batch size is measured, it drafts."""
        per_token, step = self.drafter_seconds.get(len(rows)), self.passes(len(rows))
        if not self.stand_aside or k == 0 or per_token is None or step is None or all(len(t) == 1 for t in trees):
            return k
        gain = base = 0.0
        for row, tree in zip(rows, trees):
            rates = self.rates.get(row, {})
            chance = self.chances(row, tree)
            first = sum(chance[i] for i in range(1, len(tree)) if tree.parents[i] == 0)
            r1, rest = self._row_rate(rates, "drafter"), self._row_rate(rates, "drafter+")
            gain += (1.0 - first) * sum(r1 * rest ** d for d in range(k))
            base += sum(chance)  # the root's 1 and the copy's nodes
        if gain >= per_token * k / step * base:
            return k
        self.skipped, self.drafting = True, 0
        return 0

    def _times_step(self) -> bool:
        """Whether this pass is a timed plain step: the first two passes (the second's reading replaces the first's,
        which carries one-off costs), and one in every `retime_every` after."""
        return self.steps_timed < 2 or self.since_step >= self.retime_every

    def rate(self, source: str) -> float:
        """A source's chance pooled over every row the policy has seen (the prior before any)."""
        kept, tested = self.pooled.get(source, (0.0, 0.0))
        return (kept + self.prior_weight * self.prior_rate) / (tested + self.prior_weight)

    def _row_rate(self, rates: dict[str, float], key: str) -> float:
        """A row's own chance for this key, or the pooled one while the row has shown none."""
        own = rates.get(key)
        return self.rate(key) if own is None else own

    @staticmethod
    def rate_key(tree: DraftTree, node: int) -> str:
        """What a node's chance is learned as: its source, with "+" when its parent is a draft, not the root."""
        return tree.sources[node] if tree.parents[node] == 0 else tree.sources[node] + "+"

    def chances(self, row: Any, tree: DraftTree) -> list[float]:
        """Per node, the chance the target keeps it: the product of its path's sources' rates (root: 1), the
        rates of one node's children scaled to sum to at most 1 (the target keeps at most one of them)."""
        rates = self.rates.get(row, {})
        own = [1.0] + [self._row_rate(rates, self.rate_key(tree, i)) for i in range(1, len(tree))]
        siblings = [0.0] * len(tree)
        for i in range(1, len(tree)):
            siblings[tree.parents[i]] += own[i]
        out = [1.0] * len(tree)
        for i in range(1, len(tree)):  # a parent comes before its children
            parent = tree.parents[i]
            out[i] = out[parent] * own[i] / max(1.0, siblings[parent])
        return out

    def cost(self, batch: int, nodes: int, draft_seconds: float = 0.0) -> float:
        """A pass over `nodes` per row at this batch size, in plain steps at this size; one that drafts (nodes > 1)
        also pays `draft_seconds`, what proposing its nodes cost."""
        step = self.passes(batch)
        if step is None:
            return 1.0 + self.prior_slope * batch * (nodes - 1)
        drafting = draft_seconds / step if nodes > 1 else 0.0
        return self.passes(batch * nodes) / step + drafting

    def prune(self, rows: list[Any], trees: list[DraftTree], draft_seconds: float = 0.0) -> list[DraftTree]:
        """Every row's tree cut to the N best for the batch (its likeliest N - 1 nodes and the root), N chosen for
        the most expected tokens per unit of cost (`draft_seconds`: what proposing these trees took), N > 1 only
        when that beats a plain step's by `margin`. The pass
        reads N columns of every row, padding included: a row whose nodes are unlikely still fills its columns
        (they cost the pass nothing more), so a row drafts nothing only when the batch does, when no N > 1 is
        predicted to pay."""
        batch = len(rows)
        if self.drafting:  # the drafter ran this pass: what proposing cost, per drafted token
            seen = draft_seconds / self.drafting
            known = self.drafter_seconds.get(batch)
            self.drafter_seconds[batch] = seen if known is None else self.memory * known + (1 - self.memory) * seen
        self.proposed = trees
        self.timing = self._times_step()
        if self.timing:  # time a plain step
            return [t.subtree([0]) for t in trees]
        ranked = []
        for row, tree in zip(rows, trees):
            chance = self.chances(row, tree)
            ranked.append(sorted(range(1, len(tree)), key=lambda i: (-chance[i], i)))
            ranked[-1] = [(i, chance[i]) for i in ranked[-1]]
        best, best_value = 1, batch / self.cost(batch, 1) * (1 + self.margin)
        for n in range(2, max(len(t) for t in trees) + 1):
            gained = sum(p for order in ranked for _, p in order[: n - 1])
            value = (batch + gained) / self.cost(batch, n, draft_seconds)
            if value > best_value:
                best, best_value = n, value
        out = [tree.subtree([i for i, _ in order[: best - 1]]) for tree, order in zip(trees, ranked)]
        if self.skipped:  # the drafter stood aside for the copies: it neither failed nor paid; its depth stands
            return out
        self.depth = max((d for t in out for d, source in zip(t.depths(), t.sources) if drafted(source)), default=0)
        return out

    def observe_prefill(self, columns: int, seconds: float) -> None:
        """A prefill over `columns` (rows x their padded width) took `seconds`: a wide pass measured (`PassCosts`)."""
        self.passes.add(columns, seconds)

    def observe(self, rows: list[Any], trees: list[DraftTree], paths: list[list[int]], verify_seconds: float,
                next_tokens: list[int] | None = None) -> None:
        """Learn from a pass: per row and source, which nodes the target reached and kept, and which of the
        drafts pruned right after the root the target's next token (`next_tokens`, after the kept path) shows it
        would have kept (so a row that drafts nothing still learns when its drafter is right again); the pass's
        cost."""
        m = self.memory
        proposed = self.proposed if len(self.proposed) == len(trees) else [None] * len(trees)
        tally = []  # (source, kept) over every row: the pooled chances
        for b, (row, tree, path) in enumerate(zip(rows, trees, paths)):
            on_path = set(path)
            try:
                rates = self.rates.setdefault(row, {})
            except TypeError:  # a row that cannot be weakly referenced is not learned from
                continue
            seen = []  # (source, kept)
            for i in range(1, len(tree)):
                if tree.parents[i] in on_path:  # the target reached this node's parent: it tested this node
                    seen.append((self.rate_key(tree, i), i in on_path))
            full = proposed[b]
            if full is not None and next_tokens is not None:
                kept = {tree.tokens[i] for i in range(1, len(tree)) if tree.parents[i] == 0}
                for i in range(1, len(full)):
                    if full.parents[i] == 0 and full.tokens[i] not in kept:
                        seen.append((self.rate_key(full, i), len(path) == 1 and full.tokens[i] == next_tokens[b]))
            for source, was_kept in seen:
                rates[source] = m * self._row_rate(rates, source) + (1 - m) * float(was_kept)
            tally.extend(seen)
        for count in self.pooled.values():
            count[0] *= m
            count[1] *= m
        for source, was_kept in tally:
            count = self.pooled.setdefault(source, [0.0, 0.0])
            count[0] += float(was_kept)
            count[1] += 1.0
        batch = len(rows)
        nodes = max(len(t) for t in trees)
        self.passes.add(batch * nodes, verify_seconds)
        self.since_step = 0 if nodes == 1 else self.since_step + 1
        self.steps_timed += nodes == 1


def drafted(source: str) -> bool:
    """Whether a node of this source comes from the drafter (not the root, not prompt lookup's copies)."""
    return source != "root" and not source.startswith("lookup")
