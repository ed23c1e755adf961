"""Speculative decoding: a drafter proposes K tokens per row, the target checks all of them in one pass, and
every row keeps the longest prefix the target agrees with plus one token of the target's own.

The output is the target's: greedy rows give exactly the tokens the target gives alone (up to float
rounding of a K+1-token pass against 1-token passes, exact in float64), and sampled rows follow the
target's distribution after its processors (temperature, top-k, top-p, repetition penalty...), by the
standard rule (Leviathan et al. 2023; Chen et al. 2023): draft d with drafter probability q(d) is kept
with probability min(1, p(d) / q(d)); at the first rejection the row samples from the normalised
positive part of p - q; when all K are kept it samples its extra token from p.

The drafter proposes and learns which tokens were kept (`Drafter`); the target is any causal LM run
through a `TargetStepper` that also returns the hidden states a drafter reads; the rows, their caches
and their rollback past rejected tokens are `SpeculativeBatch`'s, which decodes like
`engine.DecodeBatch` (rows join between steps, leave when done), so generate, chat, eval and serve
take it in its place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from llm_modules.decoding.rows import RowBatch, processed
from llm_modules.decoding.steppers import (
    Decoder,
    PlainStepper,
    Slot,
    right_aligned,
)
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import positions_from_mask


# ---------------------------------------------------------------------------------------- the rule
def accept_sampled(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
                   ) -> tuple[int, int]:
    """One row's speculative sampling. drafts (K,) tokens drawn from q (K, V); p (K + 1, V) the target's
    probabilities at each draft and after the last. Returns (accepted count a, the row's next token):
    the first a drafts are kept and the next token follows them."""
    k = drafts.shape[0]
    for i in range(k):
        token = int(drafts[i])
        ratio = (p[i, token] / q[i, token].clamp_min(1e-30)).clamp(max=1.0)
        if float(torch.rand((), generator=generator)) < float(ratio):
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        if not total > 0:  # p == q up to rounding: any draw from p is the residual's
            residual, total = p[i], p[i].sum()
        return i, int(torch.multinomial(residual / total, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def accept_greedy(drafts: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """drafts (K,), target (K + 1,) the target's own choices at each draft and after the last ->
    (accepted count a, the target's next token after them)."""
    agree = (drafts == target[:-1]).long()
    a = int(agree.cumprod(0).sum())
    return a, int(target[a])


# ---------------------------------------------------------------------------------------- the drafter
class Drafter(Protocol):
    """Proposes tokens for the rows of a SpeculativeBatch and keeps its own per-row state in step with them.

    `taps`: the target's hidden-state indices it reads (as in `output_hidden_states`; the target's layer
    count stands for the final, normed state); [] when it reads none."""

    taps: list[int]
    draft_tokens: int

    def join(self, rows: list[Any], ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor | None) -> None:
        """New rows (their left-padded prompts and tokens, mask, the target's states at `taps` over them) join
        the batch."""

    def propose(self, first: torch.Tensor, k: int, rows: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """first (B,): each row's token that the target has not read yet -> (B, k) drafts following it and,
        when some row samples, the drafter's probabilities (B, k, V) they were drawn from."""

    def commit(self, accepted: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None) -> None:
        """After the target's pass over tokens (B, k + 1) (`first` and the drafts): row b kept its first
        accepted[b] + 1, whose target states are states[b, :accepted[b] + 1] (B, k + 1, K, dL)."""

    def keep(self, index: list[int]) -> None:
        """Keep only these rows (and cut the columns that are padding in all of them)."""


# ---------------------------------------------------------------------------------------- the target
class TargetStepper(PlainStepper):
    """A Hugging Face causal LM as a speculative target: every position's logits, and its hidden states
    at the drafter's taps."""

    def __init__(self, model: Any, taps: list[int]):
        super().__init__(model)
        self.body = Decoder(model.base_model)
        self.head = model.get_output_embeddings()
        self.taps = list(taps)
        self.layers = model.config.get_text_config().num_hidden_layers

    def run(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any, logits_to_keep: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """ids (B, T), mask (B, S) -> logits (B, T, V) (the last `logits_to_keep` positions' when > 0),
        states (B, T, K, dL) at the taps (None without), cache."""
        inner = any(t != self.layers for t in self.taps)
        out, cache = self.body(cache=cache, use_cache=True, input_ids=ids, attention_mask=mask,
                               position_ids=positions_from_mask(mask)[:, -ids.shape[1]:], output_hidden_states=inner)
        last = out.last_hidden_state  # (B, T, dL)
        states = None
        if self.taps:
            states = torch.stack([last if t == self.layers else out.hidden_states[t] for t in self.taps], 2)
        # contiguous: a strided (B, n, dL) view into the head was 500x slower in bfloat16 on this CPU
        return self.head(last[:, -logits_to_keep:].contiguous() if logits_to_keep else last), states, cache


# ---------------------------------------------------------------------------------------- rollback
def shift_right(t: torch.Tensor, shifts: torch.Tensor, dim: int) -> torch.Tensor:
    """Move row b of `t` (rows on dim 0) right by shifts[b] along `dim`, zeros coming in on the left and
    the last shifts[b] entries falling off. One copy of the tensor, row by row (slices, no index tensor:
    a gather over a batch's whole KV cache cost ~50 ms a verify pass at batch 8)."""
    if not bool(shifts.any()):
        return t
    width, axis = t.shape[dim], dim - 1  # `dim` of `t` is `axis` of a row
    rows = []
    for row, s in zip(t.unbind(0), shifts.tolist()):
        s = min(int(s), width)
        if s:
            zeros = row.new_zeros(row.shape[:axis] + (s,) + row.shape[axis + 1:])
            row = torch.cat([zeros, row.narrow(axis, 0, width - s)], axis)
        rows.append(row)
    return torch.stack(rows)


def drop_last(slots: list[Slot], drop: torch.Tensor, positions_after: int) -> None:
    """Roll each row's cached tensors back by drop[b] positions: the last min(drop) columns go from every
    row, then row b moves right by drop[b] - min(drop) (its newest keys fall off; zeros, masked, come
    in on the left). `positions_after`: the positions the batch spans afterwards."""
    common = int(drop.min())
    for slot in slots:
        if slot.window is not None:
            raise LLMModulesError("speculative decoding cannot roll back a sliding-window cache")
        t = slot.get()  # (B, nh, N, hs)
        t = t[:, :, : t.shape[2] - common * slot.per_position]
        slot.set(right_aligned(shift_right(t, (drop - common) * slot.per_position, 2), slot.cols(positions_after)))


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


# ---------------------------------------------------------------------------------------- the batch
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

    def __init__(self, target: Any, drafter: Drafter, pad_id: int = 0, draft_tokens: int | None = None):
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
        for seq, token in zip(self.rows, self.pending):  # each row's pending token is the target's own
            self._emit(seq, token, emitted)
        self._drop_finished()
        if not self.rows:
            return emitted
        try:
            accepted, drafts = self._verify()
        except Exception as err:  # caches may be half rolled back: start again from the rows' tokens
            self._rebuild(err)
            return emitted
        for b, seq in enumerate(list(self.rows)):
            for token in drafts[b, : accepted[b]].tolist():
                if seq.finished:
                    break
                self._emit(seq, token, emitted)
        self.stats.emitted += len(emitted)
        self._drop_finished()
        return emitted

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
