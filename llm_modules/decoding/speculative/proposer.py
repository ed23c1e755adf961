"""What a proposer implements for a SpeculativeBatch: the interface every source of draft tokens is held to.

Words used once each: a *proposer* is anything that proposes draft tokens at decode time (this interface);
a *drafter* is the trained draft network (`train --method drafter`: a composed model folder plus its
`DrafterRecord`), which `composed_proposer.ComposedProposer` runs as a proposer; `prompt_lookup.PromptLookup`
is a proposer with no network.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from llm_modules.decoding.speculative.tree import DraftTree


class Proposer(Protocol):
    """Proposes tokens for the rows of a SpeculativeBatch and keeps its own per-row state in step with them.

    `taps`: the target's hidden-state indices it reads (as in `output_hidden_states`; the target's layer
    count stands for the final, normed state); [] when it reads none. A proposer may carry a `policy`
    (`policy.DraftPolicy`), which a SpeculativeBatch built for it drafts by unless given another; the policy
    rests it (k = 0) after passes whose drafts paid nothing, unless it is `free` (True: it runs no network,
    prompt lookup)."""

    taps: list[int]
    draft_tokens: int

    def join(self, rows: list[Any], ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor | None) -> None:
        """New rows (their left-padded prompts and tokens, mask, the target's states at `taps` over them) join
        the batch."""

    def propose(self, first: torch.Tensor, k: int, rows: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """first (B,): each row's token that the target has not read yet -> (B, k) drafts following it and,
        when some row samples, the drafter's probabilities (B, k, V) they were drawn from."""

    def commit(self, accepted: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None) -> None:
        """After the target's pass: row b kept `first` and accepted[b] drafts, tokens[b, :accepted[b] + 1]
        (B, L), whose target states are states[b, :accepted[b] + 1] (B, L, K, dL)."""

    def keep(self, index: list[int]) -> None:
        """Keep only these rows (and cut the columns that are padding in all of them)."""


def propose_trees(proposer: Any, first: torch.Tensor, k: int, rows: list[Any], policy: Any = None) -> list[DraftTree]:
    """One draft tree per row: the proposer's own (`propose_tree`, a proposer of trees, given the drafting `policy`,
    which decides between its sources), else its chain of k drafts as a tree of width 1 (each draft's proposal: the
    proposer's distribution, when some row samples). k = 0: each row's root alone, the proposer not asked (a pass
    the drafting policy rests it for; its commit then keeps the pass's tokens for its next proposal)."""
    if k == 0 and not hasattr(proposer, "propose_tree"):
        return [DraftTree.root(token) for token in first.tolist()]
    if hasattr(proposer, "propose_tree"):
        return proposer.propose_tree(first, k, rows, policy)
    drafts, q = proposer.propose(first, k, rows)
    drafts = drafts.tolist()
    q = None if q is None else q.detach().float().cpu()
    return [DraftTree.chain(root, drafts[b], None if q is None else list(q[b].unbind(0)))
            for b, root in enumerate(first.tolist())]
