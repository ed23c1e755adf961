"""The rows that decode speculatively: the drafter proposes, the target verifies, each row keeps what the
acceptance rule keeps, and the caches roll back past the rest."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from llm_modules.decoding.rows import RowBatch, processed
from llm_modules.decoding.speculative.acceptance import (
    accept_tree_greedy,
    accept_tree_sampled,
)
from llm_modules.decoding.speculative.policy import DraftPolicy
from llm_modules.decoding.speculative.proposer import Proposer, propose_trees
from llm_modules.decoding.speculative.target import (
    TargetStepper,
    close_holes,
    gather_columns,
    keep_cache_paths,
    keep_paths,
    path_mask,
)
from llm_modules.decoding.speculative.tree import DraftTree
from llm_modules.errors import LLMModulesError


@dataclass
class SpeculativeStats:
    """Verify passes, drafted and accepted tokens since the batch was made (mean accepted per pass =
    accepted / passes; every pass also yields one token of the target's own)."""

    passes: int = 0
    row_passes: int = 0  # rows verified, summed over passes (passes x rows while none has left)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_seconds: float = 0.0  # the drafter's proposals
    verify_seconds: float = 0.0  # the target's passes over first + K drafts
    rollback_seconds: float = 0.0  # acceptance, rolling caches back, the drafter's commit
    prefill_seconds: float = 0.0  # joining rows: the target over their prompts, the drafter's join
    closed: int = 0  # times the rollbacks' holes were closed (`SpeculativeBatch._close_holes`)

    @property
    def accepted_per_pass(self) -> float:
        return self.accepted / max(self.passes, 1)


class SpeculativeBatch(RowBatch):
    """Rows that decode together with a drafter; the same surface as `engine.DecodeBatch` (`RowBatch`: `add`,
    `step`, `rows`, `fail`), so every caller of the engine can decode speculatively.

    Per row: ids and 0/1 mask of every position the target has read (B, S), right-aligned, its KV cache,
    and `pending`, the row's next token (chosen from the target's scores, not yet read by it). A step
    emits `pending`, has the drafter propose K tokens after it, runs the target once over the K + 1,
    keeps the agreed prefix, chooses the next `pending`, and rolls the caches back past the rest.

    A failure ends only the rows whose own computation fails, as in the plain batch: a row's choice of
    token (its processors, its draws), its stop strings and its listener are each guarded; when the
    drafter or the target raises, each row is prefilled alone again (its prompt and tokens) and the rows
    that fail alone end with their error. Only a failure no row causes alone ends every row.
    """

    ROW_STATE = ("pending",)
    # holes (and leading padding beyond what the longest row needs) let stand before they are closed: at most
    # the larger of HOLES columns and HOLE_SHARE of the width
    HOLES, HOLE_SHARE = 32, 0.125

    def __init__(self, target: Any, drafter: Proposer, pad_id: int = 0, draft_tokens: int | None = None,
                 policy: DraftPolicy | None = None):
        k = draft_tokens if draft_tokens is not None else drafter.draft_tokens
        if k < 1:
            raise LLMModulesError(f"--draft-tokens must be >= 1, got {k}")
        super().__init__(TargetStepper(target, drafter.taps), target.device, pad_id)
        self.drafter, self.k = drafter, k
        # how much to draft per pass and row (None: every row drafts the whole tree every pass); a proposer
        # loaded for the command line carries one (`models.loading.load_drafter`)
        self.policy = policy if policy is not None else getattr(drafter, "policy", None)
        self.stats = SpeculativeStats()
        drafter.last_batch_stats = self.stats  # how the last batch it drafted for went (read by benchmarks)

    @property
    def max_positions(self) -> int | None:
        limits = [x for x in (self.stepper.max_positions, getattr(self.drafter, "max_positions", None)) if x is not None]
        depth = getattr(self.drafter, "max_depth", self.k)  # a tree proposer's deepest node
        return min(limits) - depth - 1 if limits else None  # a verify pass reads K + 1 positions ahead

    def _prefill(self, rows, ids, mask):
        clock = time.perf_counter()
        logits, states, cache = self.stepper.run(ids, mask, None, logits_to_keep=1)  # the prompt's last position
        pending = [seq.choose(logits[i, -1].float().cpu()) for i, seq in enumerate(rows)]
        if self.policy is not None:  # a pass over every column of the prompts (`PassCosts`)
            self.policy.observe_prefill(ids.numel(), time.perf_counter() - clock)
        self.drafter.join(rows, ids, mask, states)  # last: it joins only rows the batch takes
        self._lap("prefill_seconds", clock)
        return cache, {"pending": pending}

    def _keep(self, index: list[int]) -> None:
        super()._keep(index)
        self.drafter.keep(index)

    def step(self) -> list[tuple[Any, int]]:
        """One verify pass: emits 1 to K + 1 tokens per row; returns (row, token) in order."""
        self._drop_cancelled()
        emitted: list[tuple[Any, int]] = []
        self._step(emitted)
        self.stats.emitted += len(emitted)  # every token given, also on a step that ends early
        return emitted

    def _step(self, emitted: list[tuple[Any, int]]) -> None:
        for seq, token in zip(self.rows, self.pending):  # each row's pending token is the target's own
            self._emit(seq, token, emitted)
        self._drop_finished()
        if not self.rows:
            return
        try:
            accepted, drafts = self._verify()
        except Exception as err:  # caches may be half rolled back: start again from the rows' tokens
            self._rebuild(err)
            return
        for b, seq in enumerate(list(self.rows)):
            for token in drafts[b]:
                if seq.finished:
                    break
                self._emit(seq, token, emitted)
        self._drop_finished()

    def _verify(self) -> tuple[list[int], list[list[int]]]:
        """Propose a draft tree per row (a chain of K, or what a tree proposer builds), run the target over every
        node once, choose each row's next `pending`, roll the caches back to each row's kept path -> (accepted
        count per row, the accepted draft tokens per row). A row whose own choice raises ends with its error
        (it keeps none of the drafts)."""
        first = torch.tensor(self.pending, device=self.device)  # (B,)
        clock = time.perf_counter()
        if self.policy is not None and self.policy.plain_pass(len(self.rows), self.k):
            trees = [DraftTree.root(token) for token in self.pending]  # no proposer asked
        else:
            rests = self.policy is not None and not getattr(self.drafter, "free", False)  # a network it can rest
            k = self.policy.draft_tokens(len(self.rows), self.k) if rests else self.k
            trees = propose_trees(self.drafter, first, k, self.rows, self.policy)
            if self.policy is not None:
                trees = self.policy.prune(self.rows, trees, time.perf_counter() - clock)
        size = max(len(t) for t in trees)
        inputs = torch.tensor([t.tokens + [self.pad_id] * (size - len(t)) for t in trees], device=self.device)
        clock = self._lap("draft_seconds", clock)
        if size == 1:  # nothing drafted: the plain step (no tree mask; below, nothing to roll back)
            grown = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
            logits, states, self.cache = self.stepper.run(inputs, grown, self.cache)
        else:
            ancestors = torch.stack([t.ancestors(size) for t in trees])  # (B, N, N)
            depths = torch.tensor([t.depths() + [0] * (size - len(t)) for t in trees])  # (B, N)
            logits, states, self.cache = self.stepper.run_tree(inputs, ancestors, depths, self.mask, self.cache)
        started, clock = clock, self._lap("verify_seconds", clock)
        verified = clock - started
        paths, pending = [], []
        # plain greedy rows need only each node's arg-max (taken where the logits are, in their dtype: the same
        # choice); the others their float scores on the CPU, (N, V) per row, not the whole batch's (B, N, V)
        plain = [not seq.processors and not seq.options.do_sample for seq in self.rows]
        choices = logits.argmax(-1).tolist() if any(plain) else None
        for b, (seq, tree) in enumerate(zip(self.rows, trees)):
            path, nxt = [0], 0  # a row that ended (its drafting failed, or its check does) leaves after this pass
            if not seq.finished:
                try:  # this row's own work: its processors and draws
                    if plain[b]:
                        path, nxt = accept_tree_greedy(tree, choices[b][: len(tree)])
                    else:
                        path, nxt = self._check(seq, tree, logits[b, : len(tree)].float().cpu())
                except Exception as err:
                    seq.fail(err)
            paths.append(path)
            pending.append(nxt)
        accepted = [len(path) - 1 for path in paths]
        self.stats.passes += 1
        self.stats.row_passes += len(self.rows)
        self.stats.drafted += sum(len(t) - 1 for t in trees)
        self.stats.accepted += sum(accepted)
        self.pending = pending
        if size == 1:  # every row keeps its root, which the cache holds already
            self.ids, self.mask = torch.cat([self.ids, inputs], 1), grown
            tokens, kept_states = inputs, states
        else:
            tokens, kept_states = self._roll_back(inputs, states, paths)
        self.drafter.commit(torch.tensor(accepted, device=self.device), tokens, kept_states)
        self._cut_padding()
        done = self._lap("rollback_seconds", clock)
        if self.policy is not None:  # what the pass cost: the target's pass and the rollback after it
            self.policy.observe(self.rows, trees, paths, verified + done - clock, pending)
        return accepted, [tokens[b, 1: 1 + a].tolist() for b, a in enumerate(accepted)]

    def _roll_back(self, inputs: torch.Tensor, states: torch.Tensor | None, paths: list[list[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After a pass over the trees' nodes `inputs` (B, N): the target read every node; each row keeps its root
        and its accepted path (ids, mask, caches) -> the kept tokens (B, L) and their states at the taps."""
        past = self.width
        self.ids = keep_paths(torch.cat([self.ids, inputs], 1), 1, past, paths)
        self.mask = torch.cat([self.mask, path_mask(paths, self.mask)], 1)
        keep_cache_paths(self.stepper.slots(self.cache), past, paths)
        self.stepper.set_length(self.cache, self.width)
        longest = max(len(path) for path in paths)
        self._close_holes()
        index = torch.tensor([path + [0] * (longest - len(path)) for path in paths], device=self.device)  # (B, L)
        tokens = inputs.gather(1, index)
        if states is None:
            return tokens, None
        return tokens, states.gather(1, index[:, :, None, None].expand(-1, -1, *states.shape[2:]).to(states.device))

    def _close_holes(self) -> None:
        """Close the holes the rollbacks left (`keep_paths`) once they, with the leading padding beyond what
        the longest row needs, exceed `HOLES` columns and `HOLE_SHARE` of the width: every
        row's real columns, right-aligned, in one copy of the cache. A hole costs every later pass a column of
        attention and of the cache's append; closing them costs a copy of the cache, so they are closed only
        now and then."""
        if self.width - int(self.mask.sum(1).max()) <= max(self.HOLES, self.HOLE_SHARE * self.width):
            return
        index = close_holes(self.mask)
        if index is None:
            return
        self.ids, self.mask = self.ids.gather(1, index), self.mask.gather(1, index)
        for name in self.COLUMNS:
            setattr(self, name, getattr(self, name).gather(1, index))
        for slot in self.stepper.slots(self.cache):
            if not slot.fixed:
                slot.set(gather_columns(slot.get(), 2, index, slot.per_position))
        self.stepper.set_length(self.cache, index.shape[1])
        self.stats.closed += 1

    def _lap(self, name: str, since: float) -> float:
        now = time.perf_counter()
        setattr(self.stats, name, getattr(self.stats, name) + now - since)
        return now

    def _check(self, seq: Any, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        """The row's kept path and next token, with its own processors applied at every node (the prefix each
        sees includes the drafts on its path)."""
        tokens = tree.tokens
        scores = torch.stack([processed(seq, logits[i], [tokens[n] for n in tree.path(i)[1:]])
                              for i in range(len(tree))])  # (N, V)
        if not seq.options.do_sample:
            return accept_tree_greedy(tree, scores.argmax(-1).tolist())
        return accept_tree_sampled(tree, torch.softmax(scores, -1), seq.generator)
