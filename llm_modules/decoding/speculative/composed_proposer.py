"""The composed model as a speculative drafter (`proposer.Proposer`): its large model IS the target,
whose hidden states it reads only up to the last token the target has verified.

Per round each row hands the drafter a chunk: the token the target chose last round and the drafts it
accepted, with the target's states at them (from the verify pass). The drafter reads the chunk as it
trained (`tensors.draft_source`): every position of the chunk reads the large states up to the position
before the chunk, as when those tokens were drafted; then the row's next token reads up to the end of
the chunk, and K - 1 single steps draft the rest, all reading that same state. The K columns after the
chunk are dropped once the target has checked them, so the cache only ever holds verified positions
(with their real large states as keys). The large model's own cache is never used: the drafter calls
no large model.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.bridges import LargeRead, LargeView
from llm_modules.decoding.rows import RowBatch, processed
from llm_modules.decoding.speculative.first_read import ReadsAtFirstProposal
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import draft_source


class ComposedProposer(ReadsAtFirstProposal, RowBatch):
    """Drafts for a SpeculativeBatch with an LLMModulesModel whose large model is the target. Its rows are the
    batch's (`RowBatch`: joined, kept and realigned as the batch's are), with, per position, the mask of
    the real large states (`large_mask`) and, per row, the target's state at its last verified token
    (`frontier`) and the chunk it reads next round (`chunk`, `chunk_states`)."""

    COLUMNS = ("large_mask",)  # (B, S) 1 where the large state is real
    # (B, K, dL); per row the tokens and the states, as the pieces (n, K, dL) the passes gave: a drafter that rests
    # through many passes at a wide batch gathers them once, when it next proposes (joining each pass's piece as it
    # came copied the row's whole chunk every pass, a cost that grew with every pass it rested)
    ROW_STATE = ("frontier", "chunk", "chunk_states")

    def __init__(self, model: Any, draft_tokens: int = 4, pad_id: int = 0, vocab: torch.Tensor | None = None):
        if model.config.head == "residual":
            raise LLMModulesError("a drafter cannot use the residual head: it adds the large model's logits at the "
                                  "very position it drafts, which the target has not computed yet")
        if not model.config.causal:
            raise LLMModulesError("a drafter must be causal")
        super().__init__(model.decode_stepper(), model.device, pad_id)  # its three caches' slots
        self.model = model.eval()
        # drafts come from these vocabulary ids only (None: all): the head's cost falls with their number
        self.vocab = None if vocab is None else torch.as_tensor(vocab, dtype=torch.long, device=model.device)
        self.draft_tokens = draft_tokens
        self.taps = list(model.large_taps)
        self.last_batch_stats: Any = None  # set by the SpeculativeBatch it drafts for
        self.last_logits: list[torch.Tensor] = []  # per draft of the last proposal: its logits (B, V)
        self._waiting = []  # rows waiting to be read (`first_read`)
        self._uncommitted: int | None = None  # drafts appended since the last commit (None: no proposal since)

    @property
    def max_positions(self) -> int | None:
        return self.model.small_max_positions

    # ------------------------------------------------------------------ rows
    @torch.no_grad()
    def _join_now(self, rows: list[Any], ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor | None
                  ) -> None:
        """Prefill new rows: the prompt read as training reads it, in blocks of K ending at its last token."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = states.to(self.device)  # (B, W, K, dL)
        lengths = mask.sum(1)  # (B,)
        pad = mask.shape[1] - lengths
        source = torch.stack([
            _shifted(draft_source(int(n - 1) % self.draft_tokens, self.draft_tokens, 1, mask.shape[1])[0], int(p))
            for n, p in zip(lengths.tolist(), pad.tolist())])  # (B, W) in columns
        cache = self.model.forward_read(LargeRead(source=source), input_ids=ids, attention_mask=mask,
                                        large_states=states, cache=self.model.new_cache(), logits_to_keep=1).cache
        b = ids.shape[0]
        self._join(rows, ids, mask, cache, {"large_mask": mask.clone(), "frontier": states[:, -1],
                                            "chunk": [[] for _ in range(b)], "chunk_states": [[] for _ in range(b)]})

    def _keep_now(self, index: list[int]) -> None:
        self._keep(index)
        if not index:  # emptied (the batch's rows ended or are rebuilt): no proposal is waiting for a commit
            self._uncommitted = None

    # ------------------------------------------------------------------ drafting
    def _run(self, ids: torch.Tensor, mask_new: torch.Tensor, large_new: torch.Tensor, key_states: torch.Tensor,
             source: torch.Tensor, query_states: torch.Tensor) -> torch.Tensor:
        """Append T columns: ids (B, T), their token mask and real-state mask (B, T), key states (B, T, K, dL),
        sources (B, T) in columns and the states at them (B, T, K, dL) -> last-position logits (B, V)."""
        self.ids = torch.cat([self.ids, ids], 1)
        self.mask = torch.cat([self.mask, mask_new], 1)
        self.large_mask = torch.cat([self.large_mask, large_new], 1)
        read = LargeRead(view=LargeView(source, query_states), mask=self.large_mask)
        out = self.model.forward_read(read, input_ids=ids, attention_mask=self.mask, large_states=key_states,
                                      cache=self.cache, logits_to_keep=1, vocab_rows=self.vocab)
        self.cache = out.cache
        logits = out.logits[:, -1]  # (B, V), or (B, n) over self.vocab
        if self.vocab is None:
            return logits
        full = logits.new_full((logits.shape[0], self.model.vocab_size), float("-inf"))
        return full.index_copy_(1, self.vocab, logits)  # outside the draft vocabulary: probability 0

    @torch.no_grad()
    def _propose_now(self, first: torch.Tensor, k: int, rows: list[Any]
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = first.shape[0]
        taps, dim = self.frontier.shape[1:]
        dtype = self.frontier.dtype
        lengths = [len(c) for c in self.chunk]
        wc = max(lengths)
        base = self.width - 1  # every row's last verified column before this round
        # the chunk, left-padded to the longest, then each row's first token
        ids = torch.full((b, wc + 1), self.pad_id, dtype=torch.long, device=self.device)
        tok_mask = torch.zeros((b, wc + 1), dtype=torch.long, device=self.device)
        key_states = torch.zeros((b, wc + 1, taps, dim), dtype=dtype, device=self.device)
        source = torch.full((b, wc + 1), base, dtype=torch.long, device=self.device)
        query = self.frontier[:, None].expand(b, wc + 1, taps, dim).clone()
        for i, n in enumerate(lengths):
            if n:
                states = torch.cat(self.chunk_states[i]).to(self.device, dtype)  # (n, K, dL)
                ids[i, wc - n: wc] = torch.tensor(self.chunk[i], device=self.device)
                tok_mask[i, wc - n: wc] = 1
                key_states[i, wc - n: wc] = states
                source[i, wc] = base + wc
                query[i, wc] = states[-1]
        ids[:, wc] = first.to(self.device)
        tok_mask[:, wc] = 1
        large_new = tok_mask.clone()
        large_new[:, wc] = 0  # the first token's large state is not known yet
        self.frontier = query[:, wc]
        self.chunk = [[] for _ in range(b)]
        self.chunk_states = [[] for _ in range(b)]
        step_source, step_query = source[:, wc:], query[:, wc:]
        logits = self._run(ids, tok_mask, large_new, key_states, source, query)
        drafts, probs, self.last_logits = [], [], []
        sampled = any(r.options.do_sample for r in rows)
        zeros_state = torch.zeros((b, 1, taps, dim), dtype=dtype, device=self.device)
        one = torch.ones((b, 1), dtype=torch.long, device=self.device)
        for j in range(k):
            self.last_logits.append(logits)  # (B, V): what a tree proposer ranks runners-up by
            token, prob = self._choose(logits, rows, first, drafts, sampled)
            drafts.append(token)
            probs.append(prob)
            if j + 1 < k:
                logits = self._run(token[:, None], one, torch.zeros_like(one), zeros_state, step_source, step_query)
        self._uncommitted = k
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if sampled else None)

    def _choose(self, logits: torch.Tensor, rows: list[Any], first: torch.Tensor, drafts: list[torch.Tensor],
                sampled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not sampled and all(not r.processors for r in rows):
            return logits.argmax(-1), None
        tokens, probs = [], []
        logits = logits.float().cpu()
        for i, seq in enumerate(rows):
            try:  # this row's own work: its processors and draws
                scores = processed(seq, logits[i], [int(first[i])] + [int(d[i]) for d in drafts])
                if seq.options.do_sample:
                    p = torch.softmax(scores, -1)
                    tokens.append(int(torch.multinomial(p, 1, generator=seq.generator)))
                    probs.append(p)
                    continue
                token = int(scores.argmax())
            except Exception as err:  # the row ends (it leaves the batch after this pass); the others draft on
                seq.fail(err)
                token = int(logits[i].argmax())
            tokens.append(token)
            probs.append(torch.nn.functional.one_hot(torch.tensor(token), logits.shape[-1]).float())
        return torch.tensor(tokens, device=self.device), (torch.stack(probs) if sampled else None)

    def _commit_now(self, accepted: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None) -> None:
        """Drop the K columns after the chunk; the row's first token and accepted drafts become next round's chunk.
        After a pass it did not draft for (`propose` skipped: the drafting policy rests it), the pass's tokens
        join the chunk it has not read yet, and its next proposal reads them all."""
        tokens = tokens.tolist()
        if self._uncommitted is None:
            for i, a in enumerate(accepted.tolist()):
                self.chunk[i] = self.chunk[i] + tokens[i][: a + 1]
                self.chunk_states[i] = self.chunk_states[i] + [states[i, : a + 1].detach()]
            return
        k = self._uncommitted
        keep = self.width - k
        self.ids, self.mask, self.large_mask = self.ids[:, :keep], self.mask[:, :keep], self.large_mask[:, :keep]
        for slot in self.stepper.slots(self.cache):
            t = slot.get()
            slot.set(t[:, :, : t.shape[2] - k * slot.per_position])
        self.stepper.set_length(self.cache, keep)
        for i, a in enumerate(accepted.tolist()):
            self.chunk[i] = tokens[i][: a + 1]
            self.chunk_states[i] = [states[i, : a + 1].detach()]
        self._uncommitted = None


def _shifted(source: torch.Tensor, pad: int) -> torch.Tensor:
    """Sources over a row's real positions -> over its columns (the row is left-padded by `pad`)."""
    width = source.shape[0]
    real = source[: width - pad]
    return torch.cat([torch.full((pad,), -1, dtype=torch.long, device=source.device),
                      torch.where(real >= 0, real + pad, -1)])


def draft_vocabulary(sequences: list[list[int]], size: int, always: list[int] = (), vocab_size: int = 0
                     ) -> torch.Tensor:
    """The `size` most frequent token ids of `sequences` (ties: the smaller id), plus `always` (e.g. the
    end-of-sequence ids), sorted: a drafter's smaller vocabulary (EAGLE-3 keeps the target's 32k most
    frequent). Tokens outside it are never drafted; the target still emits them. With `vocab_size` (the
    target's), when `sequences` hold fewer than `size` distinct tokens the lowest ids not yet in it fill it to
    `size`: a byte-pair tokenizer numbers its tokens in the order it merged them, most frequent in its own
    training text first, so a few hundred answers still give a vocabulary for the target's language, not only
    for their topic."""
    counts: dict[int, int] = {}
    for seq in sequences:
        for t in seq:
            counts[t] = counts.get(t, 0) + 1
    chosen = set(sorted(counts, key=lambda t: (-counts[t], t))[:size])
    fill = iter(range(vocab_size))
    while len(chosen) < size and (t := next(fill, None)) is not None:
        chosen.add(t)
    chosen |= set(always)
    return torch.tensor(sorted(chosen), dtype=torch.long)
