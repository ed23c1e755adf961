"""A drafter reads its rows' prompts at its first proposal, not when they join: a batch whose drafter never runs
never pays for reading them.

When rows join a SpeculativeBatch, the target has just read their prompts; a drafter (a network) reads them too,
through its own forward over every prompt token. Where the drafting policy finds that drafting cannot pay (a wide
batch on a CPU whose target is compute-bound), the drafter is never run, yet that read was paid: at 16 rows here
(float32, 2 AVX2 cores, the general drafter) the batch's prefill took 48.2 s with it and 45.9 s without, most of
what the batch lost against the target alone (reports/speculative/batch_sweep_avx2_first_read/NOTES.md). So rows
that join while the drafter has not proposed for its batch wait: their prompt tokens and the target's states at
them, then every token verified after them with its states; at its first proposal the drafter reads all of it as
the rows' prompts (its own join), and from then on rows join at once. When the batch empties, rows wait again.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.tensors import left_pad


class ReadsAtFirstProposal:
    """Mixed into a drafter whose rows are a `RowBatch`: it implements `_join_now`, `_keep_now`, `_commit_now` and
    `_propose_now` (the `Proposer` methods, acting at once) and sets `self._waiting = []` when made."""

    _waiting: list[tuple[Any, list[int], list[torch.Tensor]]] | None  # per row: (row, token ids, state pieces);
    # None once the drafter has read its rows

    def join(self, rows: list[Any], ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor | None) -> None:
        if self._waiting is None:  # a drafter always gets the target's states at its taps
            self._join_now(rows, ids, mask, states)
            return
        for i, row in enumerate(rows):
            real = mask[i].bool()
            self._waiting.append((row, ids[i][real].tolist(), [states[i][real.to(states.device)]]))

    def keep(self, index: list[int]) -> None:
        if self._waiting is not None:
            self._waiting = [self._waiting[i] for i in index]
            return
        self._keep_now(index)
        if not index:  # the batch emptied: the next rows wait for the next first proposal
            self._waiting = []

    def commit(self, accepted: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None) -> None:
        if self._waiting is None:
            self._commit_now(accepted, tokens, states)
            return
        tokens = tokens.tolist()
        for i, a in enumerate(accepted.tolist()):
            row, ids, pieces = self._waiting[i]
            self._waiting[i] = (row, ids + tokens[i][: a + 1], pieces + [states[i, : a + 1].detach()])

    def propose(self, first: torch.Tensor, k: int, rows: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._waiting is not None:
            self._read_waiting()
        return self._propose_now(first, k, rows)

    @torch.no_grad()
    def _read_waiting(self) -> None:
        """Join the waiting rows now, each with everything verified so far as its prompt."""
        waiting, self._waiting = self._waiting, None
        if not waiting:
            return
        ids, mask = left_pad([tokens for _, tokens, _ in waiting], self.pad_id, self.device)
        pieces = [torch.cat(parts) for _, _, parts in waiting]  # (n, K, dL) per row
        states = pieces[0].new_zeros((len(waiting), ids.shape[1], *pieces[0].shape[1:]))
        for i, part in enumerate(pieces):
            states[i, ids.shape[1] - part.shape[0]:] = part
        self._join_now([row for row, _, _ in waiting], ids, mask, states)
