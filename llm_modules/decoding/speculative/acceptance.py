"""Which drafts a row keeps: the longest path of its draft tree (`tree.DraftTree`; a chain is a tree of width
1) that the target agrees with, and the target's next token after it.

Greedy rows follow the target's arg-max from node to node. Sampled rows use recursive rejection sampling
(SpecInfer, Miao et al. 2024; for a chain it is the standard rule of Leviathan et al. 2023 and Chen et al.
2023): at a node with target distribution r, each attempt (child token d drawn from proposal s) is kept
with probability min(1, r(d) / s(d)); when it is not, r becomes the normalised positive part of r - s (a
one-hot s: r with d removed) and the next attempt is tried; when none is kept the row draws its next token
from r. When an attempt is kept the walk moves to that child (the target's distribution there); at a leaf
the next token is drawn from it. The output follows the target's distribution exactly.
"""

from __future__ import annotations

import torch

from llm_modules.decoding.speculative.tree import DraftTree


def accept_tree_greedy(tree: DraftTree, choices: list[int]) -> tuple[list[int], int]:
    """choices[i]: the target's own token after node i -> (the kept path of nodes from the root, the target's
    next token after its last node)."""
    node, path = 0, [0]
    while True:
        child = tree.child(node, choices[node])
        if child is None:
            return path, int(choices[node])
        node = child
        path.append(child)


def accept_tree_sampled(tree: DraftTree, p: torch.Tensor, generator: torch.Generator | None
                        ) -> tuple[list[int], int]:
    """p (N, V): the target's probabilities after each node (its processors applied) -> (kept path, the row's
    next token)."""
    node, path = 0, [0]
    while True:
        r = p[node]
        moved = False
        for child, proposal in tree.attempts[node]:
            token = tree.tokens[child]
            s = proposal[token] if proposal is not None else torch.ones((), dtype=r.dtype)
            ratio = (r[token] / s.clamp_min(1e-30)).clamp(max=1.0)
            if float(torch.rand((), generator=generator)) < float(ratio):
                node, moved = child, True
                path.append(child)
                break
            if proposal is None:
                residual = r.clone()
                residual[token] = 0
            else:
                residual = (r - proposal).clamp_min(0)
            total = residual.sum()
            if total > 0:  # else r == s up to rounding: any draw from r is the residual's
                r = residual / total
        if not moved:
            return path, int(torch.multinomial(r, 1, generator=generator))
