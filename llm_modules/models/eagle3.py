"""The EAGLE-3 draft network (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large Language Models
via Training-Time Test"), in the layout vLLM, SGLang and the `speculators` package load.

What it computes, as vLLM 0.32.0's `model_executor/models/llama_eagle3.py` does (`LlamaModel.forward`,
`LlamaDecoderLayer.forward`, `Eagle3LlamaForCausalLM.combine_hidden_states / compute_logits`):
- `fuse`: the target's residual stream entering a few of its layers (taps, ascending; tap i is Hugging Face's
  `hidden_states[i]`, tap L the pre-final-norm state), concatenated, optionally normed (`norm_before_fc` one norm,
  `fc_norm` one per tap), then one linear `fc` (n_taps x T -> H);
- one Llama decoder layer whose attention reads cat(input_layernorm(embed(token)), hidden_norm(fused)) (2H wide
  q/k/v inputs), its residual the fused state (`norm_before_residual`: the normed one);
- the final norm over (layer output + residual), a head over the draft vocabulary, and `d2t` mapping draft id i
  to target id i + d2t[i].
Position p holds the token at p + 1 and the target's taps at p, at rope position p, and predicts the token at
p + 2. A later draft step feeds back the layer's own pre-norm output (`norm_output`: the normed one) instead
of `fc` over the taps, one position further on.

`Eagle3Config` is this network's description, saved as JSON beside safetensors named as `speculators` names
them (`eagle3_folder` reads theirs and EAGLE's plain `LlamaForCausalLMEagle3` folders; `export_eagle3` writes
theirs).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm_modules.errors import LLMModulesError

EAGLE3_FILE = "llm_modules_eagle3.json"  # our description of an EAGLE-3 drafter, beside WEIGHTS_FILE


@dataclass
class Eagle3Config:
    """One EAGLE-3 draft layer. `vocab_size` is the target's vocabulary, `draft_vocab_size` the head's rows;
    `target_hidden_size` the width of each tap; `taps` the target's layer ids it reads (sorted on construction,
    as vLLM sorts them). `target`: the target model it drafts for (a spec or path), for the record."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    taps: list[int]
    rms_norm_eps: float = 1e-6
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    attention_bias: bool = False
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    target: str = ""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "vocab_size", "draft_vocab_size", "target_hidden_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LLMModulesError(f"EAGLE-3 config: {name} must be an integer >= 1, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LLMModulesError(f"EAGLE-3 config: {self.num_attention_heads} attention heads do not share "
                                  f"{self.num_key_value_heads} key/value heads evenly")
        if self.draft_vocab_size > self.vocab_size:
            raise LLMModulesError(f"EAGLE-3 config: draft_vocab_size {self.draft_vocab_size} is larger than the "
                                  f"target's vocabulary ({self.vocab_size})")
        taps = sorted(set(int(t) for t in self.taps))
        if not taps or taps[0] < 0:
            raise LLMModulesError(f"EAGLE-3 config: taps must be distinct layer ids >= 0, got {self.taps!r}")
        self.taps = taps
        if self.hidden_act not in ACTIVATIONS:
            raise LLMModulesError(f"EAGLE-3 config: hidden_act {self.hidden_act!r} is not one of "
                                  f"{', '.join(ACTIVATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / EAGLE3_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Eagle3Config:
        path = Path(directory) / EAGLE3_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise LLMModulesError(f"{path} is not a valid EAGLE-3 description: {err}") from None

    @classmethod
    def for_target(cls, target_config: Any, taps: list[int] | None = None, draft_vocab_size: int | None = None,
                   target: str = "", **overrides: Any) -> Eagle3Config:
        """A draft layer shaped as one of the target's layers (its width, heads, MLP, rope), reading `taps`
        (default vLLM's and speculators': 2, L // 2, L - 3)."""
        c = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        layers = c.num_hidden_layers
        heads = c.num_attention_heads
        rope = dict(getattr(c, "rope_parameters", None) or {})
        if not rope:
            rope = {"rope_type": "default", "rope_theta": float(getattr(c, "rope_theta", 10000.0))}
        values = dict(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_attention_heads=heads,
            num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab_size=c.vocab_size,
            draft_vocab_size=draft_vocab_size or c.vocab_size, target_hidden_size=c.hidden_size,
            taps=list(taps) if taps else default_taps(layers), rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)),
            rope_parameters=rope, max_position_embeddings=c.max_position_embeddings,
            hidden_act=getattr(c, "hidden_act", "silu"), target=target)
        values.update(overrides)
        return cls(**values)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def default_taps(layers: int) -> list[int]:
    """vLLM's and speculators' default taps for a target of `layers` layers: low, middle, high."""
    return sorted({2, layers // 2, layers - 3}) if layers >= 6 else sorted({0, layers // 2, layers - 1})


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (as vLLM's and Llama's)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """q/k/v over the 2H-wide input, rope, grouped key/value heads, o back to H."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        inner = 2 * c.hidden_size
        self.q_proj = nn.Linear(inner, self.heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(inner, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(inner, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, 2H), cos/sin (B, T, hd) -> q (B, nh, T, hd), k, v (B, kvh, T, hd), rope applied."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q (B, nh, T, hd), k/v (B, kvh, S, hd), allowed (B, T, S) bool -> (B, T, H) after o_proj. A query that
        may see nothing (padding) gets a uniform, finite mix, never NaN."""
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, nh, T, S)
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        out = torch.softmax(scores.float(), -1).to(v.dtype) @ v  # (B, nh, T, hd)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


class MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Eagle3Layer(nn.Module):
    """The one decoder layer: attention over cat(norm(embedding), norm(state)), then the MLP."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.norm_before_residual = c.norm_before_residual

    def inputs(self, embeds: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds, state (B, T, H) -> the attention's input (B, T, 2H) and the residual (B, T, H)."""
        h = self.hidden_norm(state)
        residual = h if self.norm_before_residual else state
        return torch.cat([self.input_layernorm(embeds), h], -1), residual

    def finish(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The attention's output and the residual -> the layer's pre-norm output (B, T, H)."""
        residual = attended + residual
        return self.mlp(self.post_attention_layernorm(residual)) + residual


@dataclass
class Eagle3Cache:
    """The draft layer's keys and values (B, kvh, S, hd), rope applied, right-aligned with its mask."""

    keys: torch.Tensor
    values: torch.Tensor


class Eagle3Drafter(nn.Module):
    """The EAGLE-3 draft network (module docstring). Parameter names are those `speculators` saves, so the
    state dict IS the exported safetensors (with `d2t`, `t2d`)."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        n = len(c.taps)
        self.input_norm = RMSNorm(n * c.target_hidden_size, c.rms_norm_eps) if c.norm_before_fc else None
        self.fc_norm = (nn.ModuleList([RMSNorm(c.target_hidden_size, c.rms_norm_eps) for _ in range(n)])
                        if c.fc_norm else None)
        self.fc = nn.Linear(n * c.target_hidden_size, c.hidden_size, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(c)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        # draft id i is target id i + d2t[i]; t2d marks the target ids the draft vocabulary holds
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(c.vocab_size, dtype=torch.bool))
        self._rope = _rope(c)
        self.shares_embeddings = False  # embed_tokens is the target's input embedding (frozen, saved by it)

    # ------------------------------------------------------------------ vocabulary
    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """ids (Vd,) the target ids the head's rows stand for, ascending."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.d2t.device)
        if ids.numel() != self.config.draft_vocab_size:
            raise LLMModulesError(f"a draft vocabulary of {ids.numel()} ids for a head of "
                                  f"{self.config.draft_vocab_size} rows")
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_ids(self) -> torch.Tensor:
        """(Vd,) the target id of each draft id."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    # ------------------------------------------------------------------ pieces
    @property
    def layer(self) -> Eagle3Layer:
        return self.layers[0]

    def fuse(self, taps: torch.Tensor) -> torch.Tensor:
        """taps (..., n, T): the target's states at the taps, ascending -> the fused state (..., H)."""
        x = taps.flatten(-2)  # (..., n T)
        if self.input_norm is not None:
            x = self.input_norm(x)
        if self.fc_norm is not None:
            x = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, x.chunk(len(self.fc_norm), -1))], -1)
        return self.fc(x)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, T, hd)."""
        inv_freq, scale = self._rope
        freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # (B, T, hd / 2)
        emb = torch.cat([freqs, freqs], -1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def head(self, out: torch.Tensor) -> torch.Tensor:
        """The layer's pre-norm output (..., H) -> draft-vocabulary logits (..., Vd)."""
        return self.lm_head(self.norm(out))

    def feedback(self, out: torch.Tensor) -> torch.Tensor:
        """What the next draft step reads as its state: the pre-norm output (the normed one with norm_output)."""
        return self.norm(out) if self.config.norm_output else out

    def target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """(..., Vd) -> (..., Vt), -inf outside the draft vocabulary (vLLM's compute_logits)."""
        if self.config.draft_vocab_size == self.config.vocab_size and not bool(self.d2t.any()):
            return draft_logits
        full = draft_logits.new_full(draft_logits.shape[:-1] + (self.config.vocab_size,), float("-inf"))
        full[..., self.draft_ids] = draft_logits
        return full

    # ------------------------------------------------------------------ one pass with a cache
    def new_cache(self, batch: int) -> Eagle3Cache:
        """An empty cache for `batch` rows (no columns yet)."""
        c, first = self.config, self.fc.weight
        zeros = first.new_zeros(batch, c.num_key_value_heads, 0, c.head_dim)
        return Eagle3Cache(zeros, zeros.clone())

    def forward(self, input_ids: torch.Tensor, state: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: Eagle3Cache | None = None) -> tuple[torch.Tensor, Eagle3Cache]:
        """input_ids (B, T), state (B, T, H) (fused taps, or fed-back outputs), positions (B, T), mask (B, S)
        over the cache's S - T columns and the T new ones -> the layer's pre-norm output (B, T, H) and the cache.
        Each new position sees the cached columns and the new ones up to itself, where the mask is 1."""
        layer = self.layer
        x, residual = layer.inputs(self.embed_tokens(input_ids), state)
        cos, sin = self.rope(positions, x.dtype)
        q, k, v = layer.self_attn.qkv(x, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache.keys, k], 2), torch.cat([cache.values, v], 2)
        t, s = input_ids.shape[1], k.shape[2]
        causal = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)  # (T, S)
        allowed = causal[None] & mask[:, None, -s:].bool()
        out = layer.finish(layer.self_attn.attend(q, k, v, allowed), residual)
        return out, Eagle3Cache(k, v)

    # ------------------------------------------------------------------ training-time test
    def unroll(self, input_ids: torch.Tensor, fused: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               steps: int) -> list[torch.Tensor]:
        """EAGLE-3's training-time test over whole sequences: every position p is a frontier at once.
        input_ids (B, T) the tokens (the token at p + 1 sits at p), fused (B, T, H), positions (B, T), mask
        (B, T) -> `steps` pre-norm outputs (B, T, H); step j's at p is what decoding computes j - 1 steps after
        the frontier p: it reads the token at p + j, the step j - 1 output at p, at rope position p + j - 1,
        and sees the target-state keys up to p plus its own steps' keys at p (as vLLM's draft KV cache holds)."""
        layer, attn = self.layer, self.layer.self_attn
        b, t = input_ids.shape
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        allowed = causal[None] & mask[:, None, :].bool()  # (B, T, T)
        embeds = self.embed_tokens(input_ids)  # (B, T, H)
        state, keys, values, outs = fused, [], [], []
        groups = attn.heads // attn.kv_heads
        for j in range(steps):
            shifted = torch.cat([embeds[:, j:], embeds.new_zeros(b, j, embeds.shape[-1])], 1)  # token at p + j + 1
            x, residual = layer.inputs(shifted, state)
            cos, sin = self.rope(positions + j, x.dtype)
            q, k, v = attn.qkv(x, cos, sin)
            if j == 0:
                base_k, base_v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
                scale = 1 / math.sqrt(attn.head_dim)
            else:
                keys.append(k.repeat_interleave(groups, 1))
                values.append(v.repeat_interleave(groups, 1))
            scores = (q @ base_k.transpose(-1, -2)) * scale  # (B, nh, T, T)
            scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
            diag = [(q * kk).sum(-1, keepdim=True) * scale for kk in keys]  # each (B, nh, T, 1)
            probs = torch.softmax(torch.cat([scores] + diag, -1).float(), -1).to(v.dtype)
            mixed = probs[..., :t] @ base_v
            for i, vv in enumerate(values):
                mixed = mixed + probs[..., t + i: t + i + 1] * vv
            mixed = mixed.transpose(1, 2).reshape(b, t, attn.heads * attn.head_dim)
            out = layer.finish(attn.o_proj(mixed), residual)
            outs.append(out)
            state = self.feedback(out)
        return outs


def _rope(c: Eagle3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling of the draft layer's rope, as transformers computes them for a
    Llama layer with these parameters (its ROPE_INIT_FUNCTIONS: default, linear, llama3, yarn...)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(c.rope_parameters)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        theta = float(rope.get("rope_theta", 10000.0))
        inv = 1.0 / (theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
        return inv, 1.0
    if kind not in ROPE_INIT_FUNCTIONS:
        raise LLMModulesError(f"EAGLE-3 config: rope type {kind!r} is not one transformers knows")
    llama = LlamaConfig(hidden_size=c.num_attention_heads * c.head_dim, num_attention_heads=c.num_attention_heads,
                        head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                        rope_parameters={**rope, "rope_type": kind})
    inv, scale = ROPE_INIT_FUNCTIONS[kind](llama, None)
    return inv.float(), float(scale)
