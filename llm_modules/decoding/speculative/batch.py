"""The rows that decode speculatively: the drafter proposes, the target verifies, each row keeps what the
acceptance rule keeps, and the caches roll back past the rest."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from llm_modules.decoding.rows import RowBatch, processed
from llm_modules.decoding.speculative.acceptance import accept_greedy, accept_sampled
from llm_modules.decoding.speculative.proposer import Proposer
from llm_modules.decoding.speculative.target import (
    TargetStepper,
    drop_last,
    shift_right,
)
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

    def __init__(self, target: Any, drafter: Proposer, pad_id: int = 0, draft_tokens: int | None = None):
        k = draft_tokens if draft_tokens is not None else drafter.draft_tokens
        if k < 1:
            raise LLMModulesError(f"--draft-tokens must be >= 1, got {k}")
        super().__init__(TargetStepper(target, drafter.taps), target.device, pad_id)
        self.drafter, self.k = drafter, k
        self.stats = SpeculativeStats()
        drafter.last_batch_stats = self.stats  # how the last batch it drafted for went (read by benchmarks)

    @property
    def max_positions(self) -> int | None:
        limits = [x for x in (self.stepper.max_positions, getattr(self.drafter, "max_positions", None)) if x is not None]
        return min(limits) - self.k - 1 if limits else None  # a verify pass reads K + 1 positions ahead

    def _prefill(self, rows, ids, mask):
        logits, states, cache = self.stepper.run(ids, mask, None, logits_to_keep=1)  # the prompt's last position
        pending = [seq.choose(logits[i, -1].float().cpu()) for i, seq in enumerate(rows)]
        self.drafter.join(rows, ids, mask, states)  # last: it joins only rows the batch takes
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
            for token in drafts[b, : accepted[b]].tolist():
                if seq.finished:
                    break
                self._emit(seq, token, emitted)
        self._drop_finished()

    def _verify(self) -> tuple[list[int], torch.Tensor]:
        """Draft K tokens per row, run the target over them once, choose each row's next `pending`, roll the
        caches back past the rejected drafts -> (accepted count per row, drafts (B, K) on the CPU). A row
        whose own choice raises ends with its error (it keeps none of the drafts)."""
        k = self.k
        first = torch.tensor(self.pending, device=self.device)  # (B,)
        clock = time.perf_counter()
        drafts, q = self.drafter.propose(first, k, self.rows)  # (B, k), (B, k, V) or None
        inputs = torch.cat([first[:, None], drafts.to(self.device)], 1)  # (B, k + 1)
        ids = torch.cat([self.ids, inputs], 1)
        mask = torch.cat([self.mask, torch.ones_like(inputs)], 1)
        clock = self._lap("draft_seconds", clock)
        logits, states, self.cache = self.stepper.run(inputs, mask, self.cache)  # (B, k + 1, V)
        self.ids, self.mask = ids, mask
        clock = self._lap("verify_seconds", clock)
        accepted, pending = [], []
        logits = logits.float().cpu()
        drafts_cpu = drafts.cpu()
        for b, seq in enumerate(self.rows):
            a, nxt = 0, 0  # a row that ended (its drafting failed, or its check does) leaves after this pass
            if not seq.finished:
                try:  # this row's own work: its processors and draws
                    a, nxt = self._check(seq, drafts_cpu[b], None if q is None else q[b].float().cpu(), logits[b])
                except Exception as err:
                    seq.fail(err)
            accepted.append(a)
            pending.append(nxt)
        self.stats.passes += 1
        self.stats.row_passes += len(self.rows)
        self.stats.drafted += k * len(self.rows)
        self.stats.accepted += sum(accepted)
        self.pending = pending
        accepted_t = torch.tensor(accepted, device=self.device)
        # the target read first + all k drafts; each row keeps first + its accepted ones
        drop = k - accepted_t
        width = self.width - int(drop.min())
        self.ids = shift_right(self.ids, drop - drop.min(), 1)[:, : self.ids.shape[1] - int(drop.min())]
        self.mask = shift_right(self.mask, drop - drop.min(), 1)[:, : self.mask.shape[1] - int(drop.min())]
        drop_last(self.stepper.slots(self.cache), drop, width)
        self.stepper.set_length(self.cache, width)
        self.drafter.commit(accepted_t, inputs, states)
        self._cut_padding()
        self._lap("rollback_seconds", clock)
        return accepted, drafts_cpu

    def _lap(self, name: str, since: float) -> float:
        now = time.perf_counter()
        setattr(self.stats, name, getattr(self.stats, name) + now - since)
        return now

    def _check(self, seq: Any, drafts: torch.Tensor, q: torch.Tensor | None, logits: torch.Tensor
               ) -> tuple[int, int]:
        """The row's accepted count and next token, with its own processors applied at every position
        (the prefix each sees includes the drafts before it)."""
        k = drafts.shape[0]
        scores = torch.stack([processed(seq, logits[i], drafts[:i].tolist()) for i in range(k + 1)])  # (k + 1, V)
        if not seq.options.do_sample:
            return accept_greedy(drafts, scores.argmax(-1))
        p = torch.softmax(scores, -1)
        if q is None:
            raise LLMModulesError("the drafter gave no probabilities for a sampled row")
        return accept_sampled(drafts, q, p, seq.generator)
