"""What every bridge shares: the interface the composed model calls, the cross-attention cache and
mask, the choice of large-model taps, and the hook into the small model's decoder layers.

Shapes: B batch, T new positions, S all key positions (cached + new), K taps, dL large width,
dS small width, nh heads, hs = dS // nh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from llm_modules.errors import LLMModulesError

# Where each supported family keeps its decoder layers (checked by the tests on tiny models).
# Each layer returns its hidden states (B, T, dS), alone or first in a tuple (GPT-Neo).
DECODER_LAYERS = {"llama": "layers", "qwen2": "layers", "gpt_neo": "h", "gpt2": "h"}


@dataclass(frozen=True)
class BridgeShape:
    """The sizes a bridge is built for, read off the two models."""

    large_dim: int
    small_dim: int
    large_layers: int  # decoder layers of the large model; hidden-state indices run 0..large_layers
    small_layers: int
    provide_inputs: bool  # the small model reads the bridge's output as its input embeddings


@dataclass
class BridgeCache:
    """Cross-attention keys/values of every position seen so far, one (k, v) pair per attention layer.

    Because attention is causal, a position's keys/values never change once computed, so
    decoding appends one position per new token and stays exact.
    """

    keys: list[torch.Tensor] = field(default_factory=list)  # each (B, nh, S, hs)
    values: list[torch.Tensor] = field(default_factory=list)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


@dataclass
class LargeView:
    """What each new position reads of the large model when that is not simply its own state and all
    before it (a drafter reads states that lag behind the tokens; a decoder may read the prompt only).

    source (B, T): the index, among all S key positions (cached + new), of the last large state new
    position t may read; -1: none (the bridge then adds nothing at t). states (B, T, K, dL): the large
    states AT those sources, which stand in for position t's own wherever a bridge reads one (zeros
    where source is -1). Keys are still the large states of the key positions, masked by source.
    """

    source: torch.Tensor
    states: torch.Tensor

    @property
    def seen(self) -> torch.Tensor:
        """(B, T, 1) 1.0 where the position reads something, 0.0 where its source is -1."""
        return (self.source >= 0)[..., None].to(self.states.dtype)


@dataclass
class LargeRead:
    """What the bridge reads of the large states when a position does not read its own and every one before it
    (the composed model's `forward_read`); give at most one of `source`, `view`, `answer_start`.

    source (B, T): for each new position, the index within the call (no cache) of the last large state it
    may read, -1 for none: a drafter trains on lagged reads (`tensors.draft_source`), as the target's states
    exist only up to the last verified token while it drafts. view: the `LargeView` outright, for calls
    that follow a cache (a drafter decoding; a model that reads the prompt only, decoding). answer_start
    (B,): a model that reads the prompt only (config large_reads "prompt"): where each row's answer starts
    within the call; position t reads the large states up to min(t, answer_start - 1). mask (B, S): the key
    positions whose large states are real (default: the attention mask); positions without one (tokens the
    large model has not read yet) pass zeros in `large_states` and 0 here.
    """

    source: torch.Tensor | None = None
    view: LargeView | None = None
    answer_start: torch.Tensor | int | None = None
    mask: torch.Tensor | None = None


def cross_attention_mask(key_mask: torch.Tensor, num_new: int, causal: bool,
                         source: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask, True where new position t may read key position s.

    key_mask (B, S) marks real (non-padding) keys; the T new positions are the last T of S. With
    `source` (B, T) (see LargeView) position t reads keys up to source[t] instead of up to itself.
    A position always reads its own key (its source's), so no row is empty (padding queries get a
    finite, ignored output instead of NaN; a source of -1 reads key 0 and the bridge zeroes the result).
    """
    total = key_mask.shape[1]
    key_index = torch.arange(total, device=key_mask.device)[None, None, :]  # (1, 1, S)
    if source is None:
        query_index = torch.arange(total - num_new, total, device=key_mask.device)[None, :, None]  # (1, T, 1)
    else:
        if not causal:
            raise LLMModulesError("a lagged or prompt-only view of the large model needs causal=True")
        query_index = source.to(key_mask.device)[:, :, None]  # (B, T, 1)
    allowed = key_mask[:, None, :].bool()  # (B, 1, S)
    if causal:
        allowed = allowed & (key_index <= query_index)  # (B, T, S)
    allowed = allowed | (key_index == query_index.clamp(min=0))
    return allowed[:, None]  # (B, 1, T, S)


def check_int(options: Any, name: str, low: int | None) -> None:
    """A bridge option that must be an integer (>= low when low is given): else a clear error."""
    value = getattr(options, name)
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise LLMModulesError(f"bridge option {name} must be an integer{bound}, got {value!r}")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, num_heads, d // num_heads).transpose(1, 2)  # (B, nh, T, hs)


def resolve_taps(large_layers: list[int] | None, num_large: int, stride: int = 4) -> list[int]:
    """Hidden-state indices to tap, each in 1..num_large (num_large: the final, normed state).

    None: every `stride`-th layer ending at the last one (num_large, num_large - stride, ...).
    Negative indices count from the end like Python's (-1: the last).
    """
    if large_layers is None:
        return sorted(range(num_large, 0, -stride))
    taps = [i + num_large + 1 if i < 0 else i for i in large_layers]
    bad = [given for given, i in zip(large_layers, taps) if not 1 <= i <= num_large]
    if bad or not taps:
        raise LLMModulesError(
            f"large_layers {list(large_layers)}: each tap must be a layer of the large model, 1..{num_large} "
            f"(or -1 for the last), and at least one is needed"
        )
    if len(set(taps)) != len(taps):
        raise LLMModulesError(f"large_layers {list(large_layers)} names a layer twice")
    return sorted(taps)


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The small decoder's layers, for the families in DECODER_LAYERS; any other is an error."""
    family = getattr(decoder.config, "model_type", type(decoder).__name__)
    if family not in DECODER_LAYERS:
        raise LLMModulesError(
            f"bridges that reach inside the small model do not support the {family!r} family yet "
            f"(supported: {', '.join(sorted(DECODER_LAYERS))}); use the 'eca' bridge, which only feeds its inputs"
        )
    return getattr(decoder, DECODER_LAYERS[family])


def add_after_layer(layer: nn.Module, add: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Forward hook on one decoder layer: its output hidden states h become add(h)."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (add(output[0]), *output[1:])
        return add(output)

    return layer.register_forward_hook(hook)


class Bridge(nn.Module):
    """The interface between the frozen large model and the small one.

    A bridge names the large hidden states it reads (`large_layers`, indices 0..L as in
    `output_hidden_states`, L being the final normed state). `forward` receives them as
    (B, T, K, dL), in that order, and returns the small model's input embeddings (B, T, dS), or
    None when the small model keeps its own inputs. A bridge that reaches inside the small model
    registers forward hooks on its decoder layers in `attach`; `forward` leaves the per-call
    context those hooks read (kept after the call, so gradient checkpointing can recompute).
    Each bridge has an options dataclass (paired with it in `bridges.BRIDGES`), saved in the
    composition config.
    """

    def __init__(self, options: Any, shape: BridgeShape):
        super().__init__()
        self.options, self.shape = options, shape
        self.large_layers: list[int] = []

    def attach(self, small_decoder: nn.Module) -> None:
        """Hook into the small decoder's layers; bridges that only feed its inputs do nothing."""

    def forward(
        self, states: torch.Tensor, key_mask: torch.Tensor, causal: bool, cache: BridgeCache | None,
        view: LargeView | None = None,
    ) -> torch.Tensor | None:
        """states (B, T, K, dL) of the T new positions (the keys they add), key_mask (B, S); `view`: what
        each new position reads when not its own state and all before it."""
        raise NotImplementedError


class TapInput(nn.Module):
    """LayerNorm then Linear(dL, dS): one large hidden state brought to the small width."""

    def __init__(self, large_dim: int, small_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(large_dim)
        self.proj = nn.Linear(large_dim, small_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(h))  # (..., dS)


class CrossAttention(nn.Module):
    """Queries from the small stream, keys/values from large states, LayerNorm on both, nh heads.

    `keys_values` is separate from `attend` so that decoding can cache keys/values.
    """

    def __init__(self, large_dim: int, small_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if small_dim % num_heads:
            raise LLMModulesError(f"the small model's width {small_dim} is not divisible by num_heads={num_heads}; "
                                  f"pick a bridge head count that divides it")
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm_large = nn.LayerNorm(large_dim)
        self.norm_small = nn.LayerNorm(small_dim)
        self.query = nn.Linear(small_dim, small_dim)
        self.key = nn.Linear(large_dim, small_dim)
        self.value = nn.Linear(large_dim, small_dim)
        self.out = nn.Linear(small_dim, small_dim)

    def keys_values(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p (B, N, dL) -> keys, values, each (B, nh, N, hs)."""
        p = self.norm_large(p)
        return split_heads(self.key(p), self.num_heads), split_heads(self.value(p), self.num_heads)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, dS) queries; k, v (B, nh, N, hs); mask (B, 1, T, N) -> (B, T, dS)."""
        b, t, d = x.shape
        q = split_heads(self.query(self.norm_small(x)), self.num_heads)  # (B, nh, T, hs)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        return self.out(a.transpose(1, 2).reshape(b, t, d))  # (B, T, dS)


class SideBridge(Bridge):
    """A bridge that works inside the small model: it taps `options.large_layers` (see
    `resolve_taps`) and its hooks add into the small model's layers. When the small model reads
    the bridge (small_inputs "bridge"), its input embeddings are the first tap brought to the
    small width by a TapInput of their own; otherwise it keeps its own (mapped) embeddings.
    Subclasses keep what their hooks need from each call in `remember`.
    """

    def __init__(self, options: Any, shape: BridgeShape):
        super().__init__(options, shape)
        self.large_layers = resolve_taps(options.large_layers, shape.large_layers)
        self.inputs = TapInput(shape.large_dim, shape.small_dim) if shape.provide_inputs else None

    def remember(self, states: torch.Tensor, key_mask: torch.Tensor, causal: bool, cache: BridgeCache | None,
                 view: LargeView | None) -> None:
        raise NotImplementedError

    def forward(
        self, states: torch.Tensor, key_mask: torch.Tensor, causal: bool = True, cache: BridgeCache | None = None,
        view: LargeView | None = None,
    ) -> torch.Tensor | None:
        """states (B, T, K, dL), key_mask (B, S) -> input embeddings (B, T, dS) or None; readies the hooks."""
        self.remember(states, key_mask, causal, cache, view)
        if self.inputs is None:
            return None
        if view is None:
            return self.inputs(states[:, :, 0])  # (B, T, dS)
        return self.inputs(view.states[:, :, 0]) * view.seen  # (B, T, dS)
