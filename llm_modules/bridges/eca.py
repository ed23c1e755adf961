"""The paper's Enhanced Cross-Attention bridge: one large-model layer in, small-model input embeddings out.

Shapes: B batch, T new positions, S all key positions (cached + new), dL large width, dS small width,
nh heads, hs = dS // nh. Parameter names (`pre_proj`, `proj`, `intermediate`, `layers`) are those of
the saved models of earlier versions, so their weights still load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_modules.bridges.base import (
    Bridge,
    BridgeCache,
    BridgeShape,
    CrossAttention,
    LargeView,
    check_int,
    cross_attention_mask,
)
from llm_modules.errors import LLMModulesError


@dataclass
class EcaOptions:
    """The paper's defaults: 2 Enhanced Cross-Attention layers, 8 heads, adapter width 256, dropout 0.1.

    `large_layer` is the large hidden state read (as in `output_hidden_states`; -1: the last, normed).
    """

    num_layers: int = 2
    num_heads: int = 8
    adapter_dim: int = 256
    dropout: float = 0.1
    large_layer: int = -1

    def __post_init__(self) -> None:
        for name, low in (("num_layers", 0), ("num_heads", 1), ("adapter_dim", 1), ("large_layer", None)):
            check_int(self, name, low)
        if not 0.0 <= self.dropout < 1.0:
            raise LLMModulesError(f"bridge option dropout must be in [0, 1), got {self.dropout!r}")


class EnhancedCrossAttention(CrossAttention):
    """One Enhanced Cross-Attention layer: cross-attention, a bottleneck adapter, a sigmoid gate.

    Queries come from the small stream G, keys/values from the large stream P. Returns
    g * A + (1 - g) * G, where A is the adapted attention output and g = sigmoid(W[G; A]).
    """

    def __init__(self, large_dim: int, small_dim: int, num_heads: int, adapter_dim: int, dropout: float):
        super().__init__(large_dim, small_dim, num_heads, dropout)
        self.adapter_down = nn.Linear(small_dim, adapter_dim)
        self.adapter_up = nn.Linear(adapter_dim, small_dim)
        self.adapter_norm = nn.LayerNorm(small_dim)
        self.gate = nn.Linear(2 * small_dim, small_dim)

    def forward(self, g: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attend(g, k, v, mask)  # (B, T, dS)
        a = self.adapter_norm(self.adapter_up(F.gelu(self.adapter_down(a)))) + a
        gate = torch.sigmoid(self.gate(torch.cat([g, a], dim=-1)))  # (B, T, dS)
        return gate * a + (1 - gate) * g


class EcaBridge(Bridge):
    """pre_proj -> (projected residual stream, intermediate FFN -> N x Enhanced Cross-Attention).

    Output = G + proj(P), the small model's input embeddings (added to the mapped token
    embeddings when the small model keeps its own inputs).
    """

    def __init__(self, options: EcaOptions, shape: BridgeShape):
        super().__init__(options, shape)
        large_dim, small_dim = shape.large_dim, shape.small_dim
        layer = options.large_layer + shape.large_layers + 1 if options.large_layer < 0 else options.large_layer
        if not 0 <= layer <= shape.large_layers:
            raise LLMModulesError(f"large_layer={options.large_layer} is not a hidden state of the large model "
                                  f"(0..{shape.large_layers}, or negative from the end)")
        self.large_layers = [layer]
        middle = (large_dim + small_dim) // 2
        self.pre_proj = nn.Linear(large_dim, large_dim)
        self.proj = nn.Linear(large_dim, small_dim)
        self.intermediate = nn.Sequential(
            nn.Linear(large_dim, middle),
            nn.LayerNorm(middle),
            nn.GELU(),
            nn.Linear(middle, small_dim),
            nn.LayerNorm(small_dim),
        )
        self.layers = nn.ModuleList(
            EnhancedCrossAttention(large_dim, small_dim, options.num_heads, options.adapter_dim, options.dropout)
            for _ in range(options.num_layers)
        )

    def forward(
        self, states: torch.Tensor, key_mask: torch.Tensor, causal: bool = True, cache: BridgeCache | None = None,
        view: LargeView | None = None,
    ) -> torch.Tensor:
        """states (B, T, 1, dL): the tapped layer at the T new positions; key_mask (B, S): all positions.

        Position t's output depends on the large states up to t only, so under a `view` it is the
        output at its source: the query stream starts from the source's state and reads keys up to it.
        """
        p_keys = self.pre_proj(states[:, :, 0])  # (B, T, dL)
        p = p_keys if view is None else self.pre_proj(view.states[:, :, 0])  # (B, T, dL)
        g = self.intermediate(p)  # (B, T, dS)
        mask = cross_attention_mask(key_mask, p.shape[1], causal, None if view is None else view.source)  # (B, 1, T, S)
        for i, layer in enumerate(self.layers):
            k, v = layer.keys_values(p_keys)  # (B, nh, T, hs)
            if cache is not None:
                k, v = cache.append(i, k, v)  # (B, nh, S, hs)
            g = g + layer(g, k, v, mask)
        out = g + self.proj(p)  # (B, T, dS)
        return out if view is None else out * view.seen
