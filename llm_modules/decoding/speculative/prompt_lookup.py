"""Prompt lookup: drafts copied from the row's own context (Saxena 2023, "prompt lookup decoding"; the
n-gram proposers of transformers and vLLM).

Answers that quote their prompt (code edits, summaries, retrieval-augmented answers) repeat long spans of
it. The proposer takes the last n tokens of the row's context (prompt, tokens so far and the token the
target chose last), finds their first occurrence, and proposes the tokens that followed it, longest n first
(`max_ngram` down to `min_ngram`). The first, not the most recent, as transformers' and vLLM's n-gram
proposers take: the prompt is what an answer quotes, while a recent occurrence is often the answer's own
short repeat (replayed on the target's own greedy answers to 26 Spec-Bench and HumanEval questions, the first
occurrence kept 5.0 tokens per pass on HumanEval against 4.2, and 4.3 against 4.1 on summarization, the same
elsewhere: reports/spec_bench/lookup_match/). No network runs: a proposal costs a scan of the
context (a copy that runs into the context's end is looked up again from there). In the engine a row's draft
is its copy alone (`propose_tree`): a row with no match verifies only its own next token, a plain step. (As a
chain, `propose`, a row with no match proposes the token after its last one again, drafts the target rejects.)

Sampled rows: the proposal is deterministic, so its probabilities are one-hot and the acceptance rule
keeps the target's distribution (draft d kept with probability p(d); otherwise the next token is drawn
from p with d removed).
"""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.decoding.speculative.tree import DraftTree
from llm_modules.errors import LLMModulesError

PROMPT_LOOKUP = "prompt-lookup"  # `--draft prompt-lookup`: this proposer, no drafter folder


def find_match(context: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> tuple[list[int], int]:
    """(up to k tokens that followed the first occurrence of the context's last n tokens, n), for the largest n in
    [min_ngram, max_ngram] that occurs before the tail itself; ([], 0) when none does."""
    length = len(context)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = context[length - n:]
        # the first start whose n-gram has at least one follower (so it is not the tail itself)
        for start in range(0, length - n):
            if context[start: start + n] == tail:
                return context[start + n: start + n + k], n
    return [], 0


def find_continuation(context: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """`find_match`'s tokens alone."""
    return find_match(context, k, max_ngram, min_ngram)[0]


class PromptLookup:
    """A proposer (`decoding.speculative.proposer.Proposer`) that copies from each row's context; reads no target states."""

    taps: list[int] = []
    max_positions = None
    free = True  # proposing runs no network: the drafting policy never rests it (`proposer.Proposer`)
    # K when none is asked for: on Spec-Bench (3 questions per category + 3 HumanEval, Qwen2.5-Coder-1.5B bf16,
    # batch 1) K=10 gave 1.14x on the average against K=4's 1.10x, 2.27x against 1.92x on summarization and 2.60x
    # against 1.90x on HumanEval, losing 3-5% where nothing is copied (reports/spec_bench/drafters)
    DEFAULT_TOKENS = 10

    def __init__(self, vocab_size: int, draft_tokens: int = DEFAULT_TOKENS, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise LLMModulesError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        if draft_tokens < 1:
            raise LLMModulesError(f"prompt lookup needs draft_tokens >= 1, got {draft_tokens}")
        self.vocab_size, self.draft_tokens = vocab_size, draft_tokens
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.contexts: list[list[int]] = []  # per row: every token the target has verified
        self.last_batch_stats: Any = None  # set by the SpeculativeBatch it drafts for
        self.hits = self.proposals = 0  # rows given a copied draft, rows asked
        self.matched: list[int] = []  # per row, the n-gram its last proposal matched (0: none)
        self.found: list[int] = []  # per row, how many of its last proposal's drafts were copied (the rest repeat)

    def join(self, rows: list[Any], ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor | None) -> None:
        self.contexts += [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]

    def copies(self, first: torch.Tensor, k: int) -> list[list[int]]:
        """Per row, the up to k tokens its context copies after `first` (none without a match); records `matched`
        (the n-gram each row matched, 0: none) and `found` (how many it copied)."""
        out, self.matched, self.found = [], [], []
        for context, token in zip(self.contexts, first.tolist()):
            found, n = find_match(context + [token], k, self.max_ngram, self.min_ngram)
            self.matched.append(n)
            while found and len(found) < k:  # a copy that reaches the context's end continues from what it copied
                more = find_continuation(context + [token] + found, k - len(found), self.max_ngram, self.min_ngram)
                if not more:
                    break
                found += more
            self.proposals += 1
            self.hits += bool(found)
            self.found.append(len(found))
            out.append(found)
        return out

    def propose(self, first: torch.Tensor, k: int, rows: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        drafts = [found + [found[-1] if found else token] * (k - len(found))
                  for found, token in zip(self.copies(first, k), first.tolist())]
        drafts = torch.tensor(drafts, dtype=torch.long, device=first.device)  # (B, k)
        if not any(r.options.do_sample for r in rows):
            return drafts, None
        return drafts, torch.nn.functional.one_hot(drafts.cpu(), self.vocab_size).float()  # (B, k, V)

    def propose_tree(self, first: torch.Tensor, k: int, rows: list[Any], policy: Any = None) -> list[DraftTree]:
        """Each row's copy alone, up to k tokens (deterministic: one-hot proposals): a row with no match has its
        own token only, so its pass costs a plain step, where `propose`'s chain pads every row to k drafts the
        target rejects. (One source: the drafting `policy` has nothing to decide here.)"""
        copied = self.copies(first, k)
        return [DraftTree.chain(root, found, source=copy_source(n))
                for root, found, n in zip(first.tolist(), copied, self.matched)]

    def commit(self, accepted: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None) -> None:
        for context, row, a in zip(self.contexts, tokens.tolist(), accepted.tolist()):
            context += row[: a + 1]

    def keep(self, index: list[int]) -> None:
        self.contexts = [self.contexts[i] for i in index]


def copy_source(matched: int) -> str:
    """A copy's source in a draft tree: "lookup" after a match of 2 tokens or more, "lookup1" after a 1-token match
    (the drafting policy learns how often each is right)."""
    return "lookup" if matched >= 2 else "lookup1"
