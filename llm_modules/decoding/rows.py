"""The row bookkeeping every batch that decodes rows together shares: joining rows (a prefill of the
newcomers, left-padded, then their caches aligned to the running rows' width and concatenated), keeping
some rows (and cutting the columns that are padding in all of them), realigning padding, failing, and
choosing a token through a row's processors.

`RowBatch` is the abstract surface (as transformers' `CandidateGenerator` is for candidate generators):
the plain batch (`engine.DecodeBatch`), the speculative batch (`speculative.batch.SpeculativeBatch`) and the
composed model's proposer (`speculative.composed_proposer.ComposedProposer`) build on it, so a row joins,
leaves and fails the same way in each. A subclass says how its newcomers are prefilled (`_prefill`), which
more tensors move with the columns (`COLUMNS`, (B, S) like the mask) and which per-row state moves with the
rows (`ROW_STATE`: lists, or tensors with the rows on dim 0).
"""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.decoding.steppers import Stepper, align_rows, join_rows
from llm_modules.tensors import left_pad


def processed(seq: Any, scores: torch.Tensor, after: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """scores (V,) -> the row's processors applied, the row having read its prompt, its tokens and `after`."""
    if not seq.processors:
        return scores
    ids = torch.tensor([seq.prompt + seq.tokens + list(after)], device=scores.device)
    return seq.processors(ids, scores[None])[0]


def choose(seq: Any, scores: torch.Tensor, after: list[int] | tuple[int, ...] = ()) -> int:
    """scores (V,) float logits -> the row's next token after `after`: its processors, then argmax or a draw."""
    scores = processed(seq, scores, after)
    if seq.options.do_sample:
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=seq.generator))
    return int(scores.argmax())


class RowBatch:
    """Rows that decode together: `rows` (one per prompt), ids and 0/1 mask of every position so far (B, S),
    right-aligned, and the stepper's cache, whose slots move row by row with them.

    A subclass implements `_prefill` (and `step`); `add`, `_keep`, `_aligned`, `fail` and `_rebuild` are
    this class's. A row's own failure ends that row only (`Sequence.fail`): a prefill that raises is run
    again row by row, and the rows that fail alone end with their error.
    """

    COLUMNS: tuple[str, ...] = ()  # more (B, S) tensors aligned with the mask (zeros on padding)
    ROW_STATE: tuple[str, ...] = ()  # per-row lists or tensors (rows on dim 0)

    def __init__(self, stepper: Stepper, device: Any, pad_id: int = 0):
        self.stepper, self.device, self.pad_id = stepper, device, pad_id
        self.rows: list[Any] = []
        self.ids = self.mask = self.cache = None  # (B, S), (B, S)
        for name in self.COLUMNS + self.ROW_STATE:
            setattr(self, name, None)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def max_positions(self) -> int | None:
        return self.stepper.max_positions

    # ------------------------------------------------------------------ the abstract surface
    def _prefill(self, rows: list[Any], ids: torch.Tensor, mask: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        """Run the newcomers' left-padded ids, mask (B, S) -> their cache and their COLUMNS and ROW_STATE
        entries by name. Raises when the model does (`add` then tries each newcomer alone)."""
        raise NotImplementedError

    def step(self) -> list[tuple[Any, int]]:
        """Give each row its next token(s); returns (row, token) in the order emitted."""
        raise NotImplementedError

    # ------------------------------------------------------------------ joining
    def add(self, seqs: list[Any]) -> None:
        """Prefill the newcomers together (left-padded prompt + tokens: a row that rejoins after a failed
        step carries its tokens) and join them to the running rows. When that prefill raises, each
        newcomer is prefilled alone: one that fails alone ends with its error, the others join."""
        seqs = [s for s in seqs if not s.finished]
        if not seqs:
            return
        ids, mask = left_pad([s.prompt + s.tokens for s in seqs], self.pad_id, self.device)
        try:
            cache, state = self._prefill(seqs, ids, mask)
        except Exception as err:
            if len(seqs) == 1:
                seqs[0].fail(err)
            else:
                for seq in seqs:
                    self.add([seq])
            return
        self._join(seqs, ids, mask, cache, state)

    def _join(self, rows: list[Any], ids: torch.Tensor, mask: torch.Tensor, cache: Any, state: dict[str, Any]
              ) -> None:
        """Append prefilled rows: their ids, mask (B', S'), cache, and COLUMNS / ROW_STATE entries by name."""
        if not self.rows:
            self.ids, self.mask, self.cache = ids, mask, cache
            for name in self.COLUMNS + self.ROW_STATE:
                setattr(self, name, state[name])
        else:
            width = max(self.width, ids.shape[1])
            self._align(width)
            new_ids, new_mask, new_columns = self._aligned_parts(ids, mask, [state[n] for n in self.COLUMNS], cache,
                                                                 width)
            if cache is not None:
                for old, new in zip(self.stepper.slots(self.cache), self.stepper.slots(cache)):
                    old.set(join_rows(old, old.get(), new.get()))
            self.ids, self.mask = torch.cat([self.ids, new_ids]), torch.cat([self.mask, new_mask])
            for name, column in zip(self.COLUMNS, new_columns):
                setattr(self, name, torch.cat([getattr(self, name), column]))
            for name in self.ROW_STATE:
                old, new = getattr(self, name), state[name]
                setattr(self, name, old + new if isinstance(old, list) else torch.cat([old, new]))
        self.rows = self.rows + list(rows)

    # ------------------------------------------------------------------ selecting and realigning
    def _keep(self, index: list[int]) -> None:
        """Keep only the rows in `index`, then cut the columns that are padding in all of them."""
        self.rows = [self.rows[i] for i in index]
        if not self.rows:
            self.ids = self.mask = self.cache = None
            for name in self.COLUMNS + self.ROW_STATE:
                setattr(self, name, None)
            return
        rows = torch.tensor(index, device=self.device)
        self.ids, self.mask = self.ids[rows], self.mask[rows]
        for name in self.COLUMNS:
            setattr(self, name, getattr(self, name)[rows])
        for name in self.ROW_STATE:
            value = getattr(self, name)
            setattr(self, name, [value[i] for i in index] if isinstance(value, list) else value[rows.to(value.device)])
        if self.cache is not None:
            for slot in self.stepper.slots(self.cache):
                slot.set(slot.get().index_select(0, rows))
        self._cut_padding()

    def _cut_padding(self) -> None:
        """Cut the leading columns that are padding in every row."""
        if self.rows:
            real = int((self.mask.cumsum(1) > 0).sum(1).max())  # columns from each row's first token on
            if real < self.width:
                self._align(real)

    def _align(self, width: int) -> None:
        """Left-pad (or cut leading padding from) the rows' ids, mask, COLUMNS and cache to `width` positions."""
        columns = [getattr(self, n) for n in self.COLUMNS]
        self.ids, self.mask, columns = self._aligned_parts(self.ids, self.mask, columns, self.cache, width)
        for name, column in zip(self.COLUMNS, columns):
            setattr(self, name, column)

    def _aligned_parts(self, ids: torch.Tensor, mask: torch.Tensor, columns: list[torch.Tensor], cache: Any,
                       width: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        have = ids.shape[1]
        if width > have:
            columns = [torch.cat([c.new_zeros((c.shape[0], width - have)), c], 1) for c in columns]
        else:
            columns = [c[:, have - width:] for c in columns]
        ids, mask = align_rows(self.stepper, ids, mask, cache, width, self.pad_id)
        return ids, mask, columns

    def _drop_finished(self) -> None:
        going = [i for i, s in enumerate(self.rows) if not s.finished]
        if len(going) < len(self.rows):
            self._keep(going)

    def _drop_cancelled(self) -> None:
        for seq in self.rows:
            if seq.cancelled:
                seq.finish("cancelled")
        self._drop_finished()

    # ------------------------------------------------------------------ failing
    def _emit(self, seq: Any, token: int, emitted: list[tuple[Any, int]]) -> None:
        """Give a row its token, guarded: its stop strings or its listener raising end that row alone."""
        try:
            emitted.append((seq, token))
            seq.append(token)
        except Exception as err:
            seq.fail(err)

    def _rebuild(self, err: Exception) -> None:
        """After a failed model call: prefill each row alone from its prompt and tokens (`add`); the rows that
        fail alone end with their own error, the others go on. When none fails alone, the failure is not any
        one row's, and every row ends with `err`."""
        rows = self.rows
        self._keep([])
        for seq in rows:
            self.add([seq])
        if len(self.rows) == len(rows):
            self.fail(f"{type(err).__name__}: {err}", err)

    def fail(self, message: str, err: BaseException | None = None) -> None:
        """End every row with an error (the model raised): the rows go, the batch is empty again."""
        for seq in self.rows:
            if err is not None:
                seq.fail(err)
            else:
                seq.finish("error", message)
        self._keep([])
