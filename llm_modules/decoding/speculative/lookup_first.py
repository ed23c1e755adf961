"""Prompt lookup first, the trained drafter elsewhere: per pass and per row, one chain of K drafts from whichever
source suits the row.

Answers that quote their prompt (summaries, retrieval-augmented answers, code edits) are where prompt lookup
wins and a drafter loses: the drafter cannot copy from its context (issue 36: 3.2x against 1.2x on code
completion). So lookup proposes for every row first; a row whose context ends in an n-gram of at least
`min_match` tokens that occurred earlier takes lookup's copy, every other row the drafter's drafts. The
drafter reads every row's verified tokens whichever source drafted them (its `commit`), so it stays in step;
in a pass where every row took lookup's copy it drafts one token instead of K: the one forward over the chunk
it must read anyway.

Sampled rows keep the target's distribution: a row's q is that of the source that drafted it (lookup's
one-hot, the drafter's probabilities), and which source drafts a row is a function of its verified context
alone, not of any draw.

Draft trees (issue 37) will verify both chains in one pass; this chooses one per row.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.decoding.speculative.proposer import Proposer
from llm_modules.errors import LLMModulesError


class LookupFirst:
    """A proposer (`proposer.Proposer`) over two: `lookup` (a `PromptLookup`) for the rows where it matched an
    n-gram of at least `min_match` tokens, `drafter` (e.g. a `ComposedProposer`) for the others. Reads the
    drafter's taps; drafts the drafter's K by default.

    Counts since it was made, for benchmarks: `lookup_rows` and `drafter_rows` (rows each source drafted,
    summed over passes), `passes`, and `light_passes` (passes where every row took lookup's copy, so the
    drafter drafted one token)."""

    DEFAULT_MIN_MATCH = 2  # a 1-token match is any common token seen before, not a quote

    def __init__(self, drafter: Proposer, lookup: PromptLookup, min_match: int = DEFAULT_MIN_MATCH):
        if not lookup.min_ngram <= min_match <= lookup.max_ngram:
            raise LLMModulesError(f"lookup-first needs min_match between prompt lookup's n-gram sizes "
                                  f"({lookup.min_ngram} and {lookup.max_ngram}), got {min_match}")
        self.drafter, self.lookup, self.min_match = drafter, lookup, min_match
        self.taps = list(drafter.taps)
        self.draft_tokens = drafter.draft_tokens
        self.last_batch_stats: Any = None  # set by the SpeculativeBatch it drafts for
        self.lookup_rows = self.drafter_rows = self.passes = self.light_passes = 0

    @property
    def max_positions(self) -> int | None:
        return getattr(self.drafter, "max_positions", None)  # prompt lookup has no position limit

    def counts(self) -> dict[str, int]:
        """The per-source counts as one dict (benchmarks print it, or the difference of two)."""
        return {"lookup_rows": self.lookup_rows, "drafter_rows": self.drafter_rows, "passes": self.passes,
                "light_passes": self.light_passes}

    def join(self, rows: list[Any], ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor | None) -> None:
        self.drafter.join(rows, ids, mask, states)  # first: the one that can fail (a forward pass)
        self.lookup.join(rows, ids, mask, states)

    def propose(self, first: torch.Tensor, k: int, rows: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        copied, copied_q = self.lookup.propose(first, k, rows)  # (B, k), (B, k, V) or None
        takes = [n >= self.min_match for n in self.lookup.matched]
        light = all(takes)
        # the drafter reads this round's chunk in any case; K drafts only when some row will take them
        drafted, drafted_q = self.drafter.propose(first, 1 if light else k, rows)
        self.passes += 1
        self.light_passes += light
        self.lookup_rows += sum(takes)
        self.drafter_rows += len(takes) - sum(takes)
        if light:
            return copied, copied_q
        if not any(takes):
            return drafted, drafted_q
        pick = torch.tensor(takes, device=drafted.device)  # (B,) True: lookup's copy
        drafts = torch.where(pick[:, None], copied.to(drafted.device), drafted)  # (B, k)
        if drafted_q is None:
            return drafts, None
        pick = pick.to(drafted_q.device)
        return drafts, torch.where(pick[:, None, None], copied_q.to(drafted_q), drafted_q)  # (B, k, V)

    def commit(self, accepted: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None) -> None:
        self.drafter.commit(accepted, tokens, states)
        self.lookup.commit(accepted, tokens, states)

    def keep(self, index: list[int]) -> None:
        self.drafter.keep(index)
        self.lookup.keep(index)
