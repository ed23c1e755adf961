"""Gated cross-attention inside the small model: every k-th small layer reads the tapped large layers.

After Flamingo's gated cross-attention dense blocks and CALM's every-4th-layer cross-attention.
After each chosen small layer, a block lets every position attend, causally, to the large
model's tapped states of all positions up to its own, across all taps (S x K keys), and adds the
result through tanh(alpha / T), alpha = 0: the small side starts exactly as the pretrained small
model (T, `gate_temperature`, as the ladder's: smaller opens faster).
Keys/values depend only on the large states, so decoding caches and appends them like the
paper's bridge does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_modules.bridges.base import (
    BridgeCache,
    BridgeShape,
    CrossAttention,
    LargeView,
    SideBridge,
    add_after_layer,
    check_int,
    cross_attention_mask,
    decoder_layers,
)
from llm_modules.bridges.ladder import LadderOptions


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


class GatedCrossAttention(CrossAttention):
    """h <- h + tanh(alpha / T) * Attn(LN(h), LN(large taps)); alpha starts at 0."""

    def __init__(self, large_dim: int, small_dim: int, num_heads: int, temperature: float):
        super().__init__(large_dim, small_dim, num_heads)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.temperature = temperature

    def forward(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                seen: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, T, dS); k, v (B, nh, S*K, hs), position-major (s0k0, s0k1, ...); mask (B, 1, T, S*K);
        seen (B, T, 1): 0 where a position reads no large state (its attention output is dropped)."""
        a = self.attend(h, k, v, mask)  # (B, T, dS)
        return h + torch.tanh(self.alpha / self.temperature) * (a if seen is None else a * seen)


class XattnBridge(SideBridge):
    """Gated cross-attention blocks after small layers small_stride, 2*small_stride, ... (1-based)."""

    def __init__(self, options: XattnOptions, shape: BridgeShape):
        super().__init__(options, shape)
        stride = options.small_stride
        self.small_layers = list(range(stride - 1, shape.small_layers, stride)) or [shape.small_layers - 1]
        self.blocks = nn.ModuleList(
            GatedCrossAttention(shape.large_dim, shape.small_dim, options.num_heads, options.gate_temperature)
            for _ in self.small_layers
        )
        self._context: tuple[torch.Tensor, torch.Tensor, BridgeCache | None, torch.Tensor | None] | None = None

    def attach(self, small_decoder: nn.Module) -> None:
        layers = decoder_layers(small_decoder)
        for i, j in enumerate(self.small_layers):
            add_after_layer(layers[j], lambda h, i=i: self._attend(i, h))

    def _attend(self, i: int, h: torch.Tensor) -> torch.Tensor:
        states, mask, cache, seen = self._context
        k, v = self.blocks[i].keys_values(states.to(h.dtype).flatten(1, 2))  # (B, nh, T*K, hs)
        if cache is not None:
            k, v = cache.append(i, k, v)  # (B, nh, S*K, hs)
        return self.blocks[i](h, k, v, mask, None if seen is None else seen.to(h.dtype))  # (B, T, dS)

    def remember(self, states: torch.Tensor, key_mask: torch.Tensor, causal: bool, cache: BridgeCache | None,
                 view: LargeView | None = None) -> None:
        taps = states.shape[2]
        mask = cross_attention_mask(key_mask, states.shape[1], causal, None if view is None else view.source)  # (B, 1, T, S)
        self._context = (states, mask.repeat_interleave(taps, dim=-1), cache,  # mask (B, 1, T, S*K)
                         None if view is None else view.seen)

    def extra_repr(self) -> str:
        return f"large_layers={self.large_layers}, after small layers={[j + 1 for j in self.small_layers]}"
