"""The Enhanced Cross-Attention bridge: large-model states in, small-model input embeddings out.

Shapes: B batch, T new positions, S all key positions (cached + new), dL large width, dS small width,
nh heads, hs = dS // nh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BridgeCache:
    """Cross-attention keys/values of every position seen so far, one (k, v) pair per layer.

    Because attention is causal, a position's keys/values never change once computed, so
    decoding appends one position per new token and stays exact.
    """

    keys: list[torch.Tensor] = field(default_factory=list)  # each (B, nh, S, hs)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (used when finished rows are dropped)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


def cross_attention_mask(key_mask: torch.Tensor, num_new: int, causal: bool) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask, True where new position t may read key position s.

    key_mask (B, S) marks real (non-padding) keys; the T new positions are the last T of S.
    A position always reads its own key, so no row is empty (padding queries get a finite,
    ignored output instead of NaN).
    """
    total = key_mask.shape[1]
    query_index = torch.arange(total - num_new, total, device=key_mask.device)[:, None]  # (T, 1)
    key_index = torch.arange(total, device=key_mask.device)[None, :]  # (1, S)
    allowed = key_mask[:, None, :].bool()  # (B, 1, S)
    if causal:
        allowed = allowed & (key_index <= query_index)  # (B, T, S)
    allowed = allowed | (key_index == query_index)
    return allowed[:, None]  # (B, 1, T, S)


class EnhancedCrossAttention(nn.Module):
    """One Enhanced Cross-Attention layer: cross-attention, a bottleneck adapter, a sigmoid gate.

    Queries come from the small stream G, keys/values from the large stream P. Returns
    g * A + (1 - g) * G, where A is the adapted attention output and g = sigmoid(W[G; A]).
    """

    def __init__(self, large_dim: int, small_dim: int, num_heads: int, adapter_dim: int, dropout: float):
        super().__init__()
        if small_dim % num_heads:
            raise ValueError(f"small width {small_dim} is not divisible by {num_heads} bridge heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm_large = nn.LayerNorm(large_dim)
        self.norm_small = nn.LayerNorm(small_dim)
        self.query = nn.Linear(small_dim, small_dim)
        self.key = nn.Linear(large_dim, small_dim)
        self.value = nn.Linear(large_dim, small_dim)
        self.out = nn.Linear(small_dim, small_dim)
        self.adapter_down = nn.Linear(small_dim, adapter_dim)
        self.adapter_up = nn.Linear(adapter_dim, small_dim)
        self.adapter_norm = nn.LayerNorm(small_dim)
        self.gate = nn.Linear(2 * small_dim, small_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)

    def keys_values(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p (B, T, dL) -> keys, values, each (B, nh, T, hs)."""
        p = self.norm_large(p)
        return self._split_heads(self.key(p)), self._split_heads(self.value(p))

    def forward(self, g: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = g.shape  # g (B, T, dS)
        q = self._split_heads(self.query(self.norm_small(g)))  # (B, nh, T, hs)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        a = self.out(a.transpose(1, 2).reshape(b, t, d))  # (B, T, dS)
        a = self.adapter_norm(self.adapter_up(F.gelu(self.adapter_down(a)))) + a
        gate = torch.sigmoid(self.gate(torch.cat([g, a], dim=-1)))  # (B, T, dS)
        return gate * a + (1 - gate) * g


class Bridge(nn.Module):
    """pre_proj -> (projected residual stream, intermediate FFN -> N x Enhanced Cross-Attention).

    Output = G + proj(P), fed to the small model as `inputs_embeds`.
    """

    def __init__(
        self,
        large_dim: int,
        small_dim: int,
        num_layers: int = 2,
        num_heads: int = 8,
        adapter_dim: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
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
            EnhancedCrossAttention(large_dim, small_dim, num_heads, adapter_dim, dropout) for _ in range(num_layers)
        )

    def forward(
        self,
        h: torch.Tensor,
        key_mask: torch.Tensor,
        causal: bool = True,
        cache: BridgeCache | None = None,
    ) -> torch.Tensor:
        """h (B, T, dL): large states of the T new positions; key_mask (B, S): all positions, cached first."""
        p = self.pre_proj(h)  # (B, T, dL)
        g = self.intermediate(p)  # (B, T, dS)
        mask = cross_attention_mask(key_mask, h.shape[1], causal)  # (B, 1, T, S)
        for i, layer in enumerate(self.layers):
            k, v = layer.keys_values(p)  # (B, nh, T, hs)
            if cache is not None:
                k, v = cache.append(i, k, v)  # (B, nh, S, hs)
            g = g + layer(g, k, v, mask)
        return g + self.proj(p)  # (B, T, dS)
