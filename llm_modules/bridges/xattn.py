"""Gated cross-attention inside the small model: every k-th small layer reads the tapped large layers.

After Flamingo's gated cross-attention dense blocks and CALM's every-4th-layer cross-attention.
After each chosen small layer, a block lets every position attend, causally, to the large
model's tapped states of all positions up to its own, across all taps (S x K keys), and adds the
result through tanh(alpha), alpha = 0: the small side starts exactly as the pretrained small model.
Keys/values depend only on the large states, so decoding caches and appends them like the
paper's bridge does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LLMModulesError
from .base import (
    Bridge, BridgeCache, BridgeShape, TapInput, add_after_layer, check_int, cross_attention_mask, decoder_layers,
    resolve_taps, split_heads,
)
from .ladder import LadderOptions


@dataclass
class XattnOptions(LadderOptions):
    """`large_layers` as the ladder's; a block after every `small_stride`-th small layer (the last
    layer alone when the small model has fewer); `num_heads` attention heads per block."""

    small_stride: int = 4
    num_heads: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "small_stride", 1)
        check_int(self, "num_heads", 1)


class GatedCrossAttention(nn.Module):
    """h <- h + tanh(alpha) * Attn(LN(h), LN(large taps)); alpha starts at 0."""

    def __init__(self, large_dim: int, small_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm_small = nn.LayerNorm(small_dim)
        self.norm_large = nn.LayerNorm(large_dim)
        self.query = nn.Linear(small_dim, small_dim)
        self.key = nn.Linear(large_dim, small_dim)
        self.value = nn.Linear(large_dim, small_dim)
        self.out = nn.Linear(small_dim, small_dim)
        self.alpha = nn.Parameter(torch.zeros(()))

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (B, T, K, dL) -> keys, values (B, nh, T*K, hs), position-major (t0k0, t0k1, ...)."""
        p = self.norm_large(states.flatten(1, 2))  # (B, T*K, dL)
        return split_heads(self.key(p), self.num_heads), split_heads(self.value(p), self.num_heads)

    def forward(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape  # h (B, T, dS); mask (B, 1, T, S*K)
        q = split_heads(self.query(self.norm_small(h)), self.num_heads)  # (B, nh, T, hs)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        a = self.out(a.transpose(1, 2).reshape(b, t, d))  # (B, T, dS)
        return h + torch.tanh(self.alpha) * a


class XattnBridge(Bridge):
    """Gated cross-attention blocks after small layers small_stride, 2*small_stride, ... (1-based).

    With `provide_inputs` (small_inputs "bridge"), the small model's input embeddings are the
    first tap brought to the small width by a TapInput of their own.
    """

    options_class = XattnOptions

    def __init__(self, options: XattnOptions, shape: BridgeShape):
        super().__init__(options, shape)
        if shape.small_dim % options.num_heads:
            raise LLMModulesError(f"the small model's width {shape.small_dim} is not divisible by "
                                  f"num_heads={options.num_heads}; pick a head count that divides it")
        self.large_layers = resolve_taps(options.large_layers, shape.large_layers)
        stride = options.small_stride
        self.small_layers = list(range(stride - 1, shape.small_layers, stride)) or [shape.small_layers - 1]
        self.blocks = nn.ModuleList(
            GatedCrossAttention(shape.large_dim, shape.small_dim, options.num_heads) for _ in self.small_layers
        )
        self.inputs = TapInput(shape.large_dim, shape.small_dim) if shape.provide_inputs else None
        self._context: tuple[torch.Tensor, torch.Tensor, BridgeCache | None] | None = None

    def attach(self, small_decoder: nn.Module) -> None:
        layers = decoder_layers(small_decoder)
        for i, j in enumerate(self.small_layers):
            add_after_layer(layers[j], lambda h, i=i: self._attend(i, h))

    def _attend(self, i: int, h: torch.Tensor) -> torch.Tensor:
        states, mask, cache = self._context
        k, v = self.blocks[i].keys_values(states.to(h.dtype))  # (B, nh, T*K, hs)
        if cache is not None:
            k, v = cache.append(i, k, v)  # (B, nh, S*K, hs)
        return self.blocks[i](h, k, v, mask)  # (B, T, dS)

    def forward(
        self, states: torch.Tensor, key_mask: torch.Tensor, causal: bool = True, cache: BridgeCache | None = None
    ) -> torch.Tensor | None:
        """states (B, T, K, dL), key_mask (B, S) -> input embeddings (B, T, dS) or None; readies the hooks."""
        taps = states.shape[2]
        mask = cross_attention_mask(key_mask, states.shape[1], causal)  # (B, 1, T, S)
        self._context = (states, mask.repeat_interleave(taps, dim=-1), cache)  # mask (B, 1, T, S*K)
        return self.inputs(states[:, :, 0]) if self.inputs is not None else None  # (B, T, dS)

    def extra_repr(self) -> str:
        return f"large_layers={self.large_layers}, after small layers={[j + 1 for j in self.small_layers]}"
