"""Ladder bridge: several large-model layers added, gated, into the small model's residual stream.

After Ladder Side-Tuning (Sung et al. 2022): each tapped large hidden state is normed, projected
down to the small width and added to the small model's hidden states after the small layer at
the same relative depth. No attention is involved, so it is causal by construction and needs no
decoding cache: position t only ever receives the large model's state at position t.

Depth map: the tap of large hidden state l (of L) joins after small layer
c = max(1, round(l * n_small / L)) (1-based), i.e. the layer that ends the same fraction of the
stack; taps that land on one layer are summed.

Gate: tanh(alpha / T) with alpha = 0 (Flamingo's start), one scalar per tap. At initialisation
every ladder adds exactly zero, so the composed small side starts as the pretrained small model;
the projection is randomly initialised, so alpha still gets a gradient from the first step. LST's
sigmoid(alpha / T) would start at 0.5, mixing half of a random projection into every layer.
The temperature T (`gate_temperature`, LST's 0.1) sets how fast a gate can open: Adam moves alpha
by about the learning rate per step whatever its gradient, so the gate opens by about lr / T per
step. With T = 1 and the bridge's usual rates (1e-4..1e-3) a gate stays below 0.003 after 20 steps
and below 0.1 after hundreds: the taps are barely heard while everything around them trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_modules.bridges.base import (
    BridgeCache,
    BridgeShape,
    LargeView,
    SideBridge,
    TapInput,
    add_after_layer,
    decoder_layers,
)
from llm_modules.errors import LLMModulesError


@dataclass
class LadderOptions:
    """`large_layers`: large hidden states to tap (1..L, -1 the last); None: every 4th, ending at the last.
    `gate_temperature`: T of the tanh(alpha / T) gates (smaller opens faster)."""

    large_layers: list[int] | None = None
    gate_temperature: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.gate_temperature, bool) or not isinstance(self.gate_temperature, (int, float)) \
                or not self.gate_temperature > 0:
            raise LLMModulesError(f"bridge option gate_temperature must be a number > 0, got {self.gate_temperature!r}")
        self.gate_temperature = float(self.gate_temperature)
        if self.large_layers is not None:
            if not isinstance(self.large_layers, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in self.large_layers):
                raise LLMModulesError(f"bridge option large_layers must be a list of integers, got {self.large_layers!r}")
            self.large_layers = list(self.large_layers)


class LadderBridge(SideBridge):
    """Per tap: LayerNorm -> Linear(dL, dS) -> x tanh(alpha / T), added after the matching small layer."""

    def __init__(self, options: LadderOptions, shape: BridgeShape):
        super().__init__(options, shape)
        self.small_layer_of_tap = [
            max(1, round(tap * shape.small_layers / shape.large_layers)) - 1 for tap in self.large_layers
        ]  # 0-based small layer after which each tap is added
        self.taps = nn.ModuleList(TapInput(shape.large_dim, shape.small_dim) for _ in self.large_layers)
        self.alphas = nn.Parameter(torch.zeros(len(self.large_layers)))  # tanh(0) = 0: starts closed
        self.temperature = options.gate_temperature
        self._states: torch.Tensor | None = None  # (B, T, K, dL) of the current call, read by the hooks
        self._seen: torch.Tensor | None = None  # (B, T, 1) under a LargeView: 0 where a position reads nothing

    def attach(self, small_decoder: nn.Module) -> None:
        layers = decoder_layers(small_decoder)
        for j in sorted(set(self.small_layer_of_tap)):
            add_after_layer(layers[j], lambda h, j=j: self._add_taps(j, h))

    def _add_taps(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, dS) after small layer `layer` plus every tap that joins there."""
        for k, target in enumerate(self.small_layer_of_tap):
            if target == layer:
                add = torch.tanh(self.alphas[k] / self.temperature) * self.taps[k](self._states[:, :, k].to(h.dtype))
                h = h + (add if self._seen is None else add * self._seen.to(h.dtype))  # (B, T, dS)
        return h

    def remember(self, states: torch.Tensor, key_mask: torch.Tensor, causal: bool, cache: BridgeCache | None,
                 view: LargeView | None = None) -> None:
        # per-position additions: no mask, no cache needed. Under a view (a lagged or prompt-only read)
        # position t takes the taps of its source position instead of its own: the rule for a tap that is
        # aligned with positions, which keeps "position t reads nothing after its source" true.
        self._states = states if view is None else view.states
        self._seen = None if view is None else view.seen

    def extra_repr(self) -> str:
        return (f"large_layers={self.large_layers}, after small layers={[j + 1 for j in self.small_layer_of_tap]}, "
                f"gate_temperature={self.temperature}")
