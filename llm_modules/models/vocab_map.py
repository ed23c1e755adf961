"""The small model's own token embeddings for the LARGE tokenizer's ids (`small_inputs="mapped"`).

Each large-tokenizer token's text is re-tokenized by the small tokenizer; the large token's
embedding is the mean of the small model's embeddings of those pieces. The map is computed once
at compose time and stored compactly, as CSR index buffers (offsets into a flat list of small
ids), never as a dense |V_large| x d_small matrix (151,936 x 576 floats would be 350 MB). It
indexes the small model's own embedding matrix at call time, so training that matrix (a flag)
moves the mapped embeddings with it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm_modules.errors import LLMModulesError


def _fallback_id(small_tokenizer: Any) -> int:
    for name in ("unk_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(small_tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


class VocabMap(nn.Module):
    """Large id -> mean of the small embeddings of its text's small-tokenizer pieces.

    Buffers: `offsets` (V_large + 1,) and `small_ids` (N,): the pieces of large id i are
    small_ids[offsets[i]:offsets[i + 1]], never empty. A large token whose text the small tokenizer
    turns into nothing (or that the large tokenizer does not have: the embedding matrix is often
    padded past it) maps to the small tokenizer's unk token, else its eos, else id 0.
    """

    def __init__(self, offsets: torch.Tensor, small_ids: torch.Tensor):
        super().__init__()
        if offsets.dim() != 1 or small_ids.dim() != 1 or int(offsets[-1]) != small_ids.numel():
            raise LLMModulesError("vocabulary map: offsets and small_ids do not describe one another")
        if bool((offsets[1:] <= offsets[:-1]).any()):
            raise LLMModulesError("vocabulary map: every large token needs at least one small piece")
        self.register_buffer("offsets", offsets.long())
        self.register_buffer("small_ids", small_ids.long())

    @property
    def large_vocab_size(self) -> int:
        return self.offsets.numel() - 1

    @classmethod
    def from_models(cls, large: Any, small: Any) -> "VocabMap":
        """From two `specs.LoadedModel`s, each with its tokenizer (else a clear error)."""
        missing = [f"{side} model {loaded.spec!r}" for side, loaded in (("large", large), ("small", small))
                   if loaded.tokenizer is None]
        if missing:
            raise LLMModulesError(f"small_inputs='mapped' re-tokenizes the large vocabulary with the small tokenizer, "
                                  f"so it needs both tokenizers; none found for the {' and the '.join(missing)}")
        return cls.from_tokenizers(large.tokenizer, small.tokenizer, large.model.get_output_embeddings().weight.shape[0],
                                   small.model.get_input_embeddings().weight.shape[0])

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str, source: Any) -> "VocabMap":
        """From saved weights (keys `prefix + "offsets"`, `prefix + "small_ids"`)."""
        if prefix + "offsets" not in state or prefix + "small_ids" not in state:
            raise LLMModulesError(f"{source} has no vocabulary map, which small_inputs='mapped' needs")
        return cls(state[prefix + "offsets"], state[prefix + "small_ids"])

    @classmethod
    def from_tokenizers(cls, large_tokenizer: Any, small_tokenizer: Any, large_vocab_size: int,
                        small_vocab_size: int) -> "VocabMap":
        """Re-tokenize every large token's text with the small tokenizer (both batched, once)."""
        known = min(len(large_tokenizer), large_vocab_size)
        texts = large_tokenizer.batch_decode([[i] for i in range(known)], clean_up_tokenization_spaces=False)
        pieces = small_tokenizer(texts, add_special_tokens=False)["input_ids"]
        fallback = _fallback_id(small_tokenizer)
        lists = [[i for i in p if 0 <= i < small_vocab_size] or [fallback] for p in pieces]
        lists += [[fallback]] * (large_vocab_size - known)
        counts = torch.tensor([len(p) for p in lists])  # (V_large,)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # (V_large + 1,)
        small_ids = torch.tensor([i for p in lists for i in p], dtype=torch.long)  # (N,)
        return cls(offsets, small_ids)

    def forward(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """ids (B, T) large-tokenizer ids, weight (V_small, dS) -> embeddings (B, T, dS)."""
        flat = ids.reshape(-1).to(self.offsets.device)  # (B*T,)
        starts = self.offsets[flat]
        counts = self.offsets[flat + 1] - starts  # (B*T,) pieces per token
        bag_starts = counts.cumsum(0) - counts  # where each token's pieces start in the gathered list
        total = int(counts.sum())
        within = torch.arange(total, device=flat.device) - torch.repeat_interleave(bag_starts, counts, output_size=total)
        pieces = self.small_ids[torch.repeat_interleave(starts, counts, output_size=total) + within]  # (N_batch,)
        out = F.embedding_bag(pieces, weight, bag_starts, mode="mean")  # (B*T, dS)
        return out.view(*ids.shape, weight.shape[1])

    def extra_repr(self) -> str:
        return f"large_vocab={self.large_vocab_size}, small_pieces={self.small_ids.numel()}"

