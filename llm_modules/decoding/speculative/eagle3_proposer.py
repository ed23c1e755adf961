"""An EAGLE-3 draft network as a proposer (`proposer.Proposer`), drafting as vLLM's EAGLE proposer does
(`v1/spec_decode/llm_base_proposer.py`: `set_inputs_first_pass`, then K - 1 single steps).

Its cache holds one column per verified target position p: the token at p + 1 with `fuse(taps at p)`. Per row it
keeps the fused states whose next token it does not know yet (`pending`: after a join, the prompt's last
position; after a verify pass, the target's states at the tokens the row kept) with the tokens between them.
A round appends those columns (the last one reading `first`, the row's next token) and drafts its first token
from the last one; each further draft is one column more, reading the draft before it and the layer's own
fed-back output. Those K - 1 columns are dropped once the target has checked them, so the cache only ever holds
verified positions read from the target's own states, as vLLM's draft KV cache does.

The network is `llm_modules.models.eagle3.Eagle3Drafter` (taken as given: decoding sits below models).
"""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.decoding.rows import RowBatch
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.first_read import ReadsAtFirstProposal
from llm_modules.decoding.steppers import Slot, Stepper
from llm_modules.tensors import positions_from_mask


class DraftCache(Stepper):
    """The draft layer's keys and values as the row bookkeeping sees them: two slots, no length to keep."""

    def __init__(self, network: Any):
        super().__init__(network)

    def slots(self, cache: Any) -> list[Slot]:
        return [Slot(cache, "keys"), Slot(cache, "values")]

    def set_length(self, cache: Any, positions: int) -> None:
        pass

    @property
    def max_positions(self) -> int | None:
        return self.model.config.max_position_embeddings


class Eagle3Proposer(ReadsAtFirstProposal, RowBatch):
    """Drafts for a SpeculativeBatch with an EAGLE-3 network reading the target's states at its taps. Its rows
    are the batch's (`RowBatch`); per row, `pending` (m, H) fused states, as the pieces the passes gave (gathered
    when it next proposes: a drafter resting through many passes does not copy them every pass), and `pending_ids`
    (m - 1 tokens)."""

    ROW_STATE = ("pending", "pending_ids")

    def __init__(self, network: Any, draft_tokens: int = 3, pad_id: int = 0):
        first = next(network.parameters())
        super().__init__(DraftCache(network), first.device, pad_id)
        self.network = network.eval()
        self.dtype = first.dtype
        self.draft_tokens = draft_tokens
        self.taps = list(network.config.taps)
        self.last_batch_stats: Any = None  # set by the SpeculativeBatch it drafts for
        self._waiting = []  # rows waiting to be read (`first_read`)
        self._uncommitted: int | None = None  # draft columns appended since the last commit (None: no proposal)

    def _run(self, ids: torch.Tensor, state: torch.Tensor, mask_new: torch.Tensor) -> torch.Tensor:
        """Append columns: ids (B, T), states (B, T, H), mask (B, T) -> the layer's outputs (B, T, H)."""
        self.ids = torch.cat([self.ids, ids], 1)
        self.mask = torch.cat([self.mask, mask_new], 1)
        positions = positions_from_mask(self.mask)[:, -ids.shape[1]:]
        out, self.cache = self.network(ids, state, positions, self.mask, self.cache)
        return out

    # ------------------------------------------------------------------ rows
    @torch.no_grad()
    def _join_now(self, rows: list[Any], ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor | None
                  ) -> None:
        """Prompt position p becomes a column (the token at p + 1, the taps at p) for every p but the last,
        whose next token the target has just chosen (next round's `first`)."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        fused = self.network.fuse(states.to(self.device, self.dtype))  # (B, W, H)
        b = ids.shape[0]
        cols_ids, cols_mask = ids[:, 1:], mask[:, :-1]
        cache = self.network.new_cache(b)
        if cols_ids.shape[1]:
            positions = positions_from_mask(cols_mask)
            _, cache = self.network(cols_ids, fused[:, :-1], positions, cols_mask, cache)
        self._join(rows, cols_ids, cols_mask, cache, {"pending": [[f] for f in fused[:, -1:]],
                                                      "pending_ids": [[] for _ in range(b)]})

    def _keep_now(self, index: list[int]) -> None:
        self._keep(index)
        if not index:  # emptied (the batch's rows ended or are rebuilt): no proposal is waiting for a commit
            self._uncommitted = None

    # ------------------------------------------------------------------ drafting
    @torch.no_grad()
    def _propose_now(self, first: torch.Tensor, k: int, rows: list[Any]
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = first.shape[0]
        pending = [torch.cat(pieces) for pieces in self.pending]  # (m, H) per row, gathered once
        width = max(p.shape[0] for p in pending)
        hidden = pending[0].shape[-1]
        ids = torch.full((b, width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((b, width), dtype=torch.long, device=self.device)
        state = torch.zeros((b, width, hidden), dtype=self.dtype, device=self.device)
        for i, (p, known) in enumerate(zip(pending, self.pending_ids)):
            m = p.shape[0]
            ids[i, width - m:] = torch.tensor(known + [int(first[i])], dtype=torch.long, device=self.device)
            mask[i, width - m:] = 1
            state[i, width - m:] = p
        out = self._run(ids, state, mask)[:, -1:]  # (B, 1, H)
        self.pending, self.pending_ids = [None] * b, [[] for _ in range(b)]
        sampled = any(r.options.do_sample for r in rows)
        drafts, probs, self.last_logits = [], [], []
        one = torch.ones((b, 1), dtype=torch.long, device=self.device)
        for j in range(k):
            logits = self.network.target_logits(self.network.head(out[:, 0]))  # (B, V)
            self.last_logits.append(logits)  # what a tree proposer ranks runners-up by
            token, prob = self._choose(logits, rows, first, drafts, sampled)
            drafts.append(token)
            probs.append(prob)
            if j + 1 < k:
                out = self._run(token[:, None], self.network.feedback(out), one)
        self._uncommitted = k - 1
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if sampled else None)

    _choose = ComposedProposer._choose  # a row's processors and draws, as the composed model's drafts choose

    @torch.no_grad()
    def _commit_now(self, accepted: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None) -> None:
        """Drop the K - 1 columns after the verified ones; the states at the kept tokens become `pending`. After a
        pass it did not draft for (`propose` skipped), the pass's tokens and states join what is pending (the
        pass's first token among them: no proposal read it), and its next proposal reads them all."""
        fused = self.network.fuse(states.to(self.device, self.dtype))  # (B, k + 1, H)
        tokens = tokens.tolist()
        if self._uncommitted is None:
            for i, a in enumerate(accepted.tolist()):
                self.pending[i] = self.pending[i] + [fused[i, : a + 1]]
                self.pending_ids[i] = self.pending_ids[i] + tokens[i][: a + 1]
            return
        keep = self.width - self._uncommitted
        self.ids, self.mask = self.ids[:, :keep], self.mask[:, :keep]
        for slot in self.stepper.slots(self.cache):
            slot.set(slot.get()[:, :, :keep])
        for i, a in enumerate(accepted.tolist()):
            self.pending[i] = [fused[i, : a + 1]]
            self.pending_ids[i] = tokens[i][1: a + 1]
        self._uncommitted = None
        self._cut_padding()
