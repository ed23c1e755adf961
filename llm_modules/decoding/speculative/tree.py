"""Draft trees: what a verify pass checks for one row.

A tree's node 0 is the row's pending token (the root: the target's own choice, not read by it yet); every
other node is a draft token whose parent is an earlier node, so a chain of K drafts is a tree of width 1
and several proposers' candidates (a drafter's chain and its runners-up, prompt lookup's copy) share one
tree, and one pass of the target over all its nodes (each reading its own path only: `ancestors`, with
positions by depth) scores them all (SpecInfer, Miao et al. 2024; EAGLE-2, Li et al. 2024). The row then keeps
the longest path the target agrees with.

Each node lists its *attempts*, in the order they are tried: (child, proposal), the proposal being the
distribution the child's token was drawn from, or None when it was chosen without a draw (a copy, a
greedy or ranked choice: a one-hot proposal). Two proposers proposing the same token share the child node
and add one attempt each. Acceptance (`acceptance.accept_tree_greedy` / `accept_tree_sampled`) walks the
attempts; for sampled rows the rule is recursive rejection sampling, which keeps the target's distribution
when every attempt's token is drawn from its proposal independently of the acceptance draws and of any
attempt tried before it (a runner-up chosen after seeing a drawn token is tried after that token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    """tokens, parents (-1 for the root), attempts per node, and sources: per node, which proposer first put it
    there ("root" for node 0; e.g. "drafter", "runner-up", "lookup"), which `policy.DraftPolicy` learns
    acceptance rates by."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    attempts: list[list[tuple[int, torch.Tensor | None]]] = field(default_factory=lambda: [[]])
    sources: list[str] = field(default_factory=lambda: ["root"])

    @classmethod
    def root(cls, token: int) -> "DraftTree":
        return cls([int(token)])

    @classmethod
    def chain(cls, root: int, drafts: list[int], proposals: list[torch.Tensor | None] | None = None,
              source: str = "draft") -> "DraftTree":
        tree = cls.root(root)
        tree.add_chain(0, drafts, proposals, source)
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    def child(self, node: int, token: int) -> int | None:
        """The child of `node` holding `token`, if any."""
        for c, _ in self.attempts[node]:
            if self.tokens[c] == token:
                return c
        return None

    def add(self, parent: int, token: int, proposal: torch.Tensor | None = None, source: str = "draft") -> int:
        """One attempt at `token` after `parent` -> the child node (a new one unless the parent has that token).
        A second deterministic attempt at a child that one has tried already adds nothing (its token has no
        mass left), so it is left out."""
        token = int(token)
        node = self.child(parent, token)
        if node is None:
            node = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.attempts.append([])
            self.sources.append(source)
        elif proposal is None and any(c == node and s is None for c, s in self.attempts[parent]):
            return node
        self.attempts[parent].append((node, proposal))
        return node

    def add_chain(self, parent: int, tokens: list[int], proposals: list[torch.Tensor | None] | None = None,
                  source: str = "draft") -> list[int]:
        """Drafts one after another from `parent` -> their nodes."""
        nodes = []
        for i, token in enumerate(tokens):
            parent = self.add(parent, token, None if proposals is None else proposals[i], source)
            nodes.append(parent)
        return nodes

    def depths(self) -> list[int]:
        out = [0] * len(self.tokens)
        for i in range(1, len(self.tokens)):
            out[i] = out[self.parents[i]] + 1
        return out

    def path(self, node: int) -> list[int]:
        """The nodes from the root to `node`, both included."""
        out = [node]
        while self.parents[out[-1]] >= 0:
            out.append(self.parents[out[-1]])
        return out[::-1]

    def ancestors(self, size: int | None = None) -> torch.Tensor:
        """(size, size) bool: [i, j] when node j is on node i's path (itself included); rows past the tree's
        nodes (padding up to `size`) see themselves only."""
        size = size if size is not None else len(self.tokens)
        out = torch.eye(size, dtype=torch.bool)
        for i in range(1, len(self.tokens)):
            out[i] |= out[self.parents[i]]
        return out

    def subtree(self, keep: list[int]) -> "DraftTree":
        """The tree of the nodes in `keep` only (the root and every kept node's parent among them), renumbered
        in their order here; attempts at nodes left out go too."""
        kept = sorted(set(keep) | {0})
        new = {old: i for i, old in enumerate(kept)}
        if any(self.parents[n] not in new for n in kept[1:]):
            raise ValueError("a subtree must hold every kept node's parent")
        return DraftTree([self.tokens[n] for n in kept], [new.get(self.parents[n], -1) for n in kept],
                         [[(new[c], s) for c, s in self.attempts[n] if c in new] for n in kept],
                         [self.sources[n] for n in kept])
