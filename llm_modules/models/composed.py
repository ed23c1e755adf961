"""The composed model: frozen large LM -> bridge -> small LM -> head.

Data flows one way. Both sides read the LARGE model's token ids. The small model reads, as its
input embeddings, the bridge's output (the paper), or its own token embeddings through a
vocabulary map (plus the bridge's output when the bridge gives one); bridges such as `ladder`
and `xattn` also add into its layers. The head predicts over the large vocabulary. With the head
"own" the small side is in its OWN tokens instead (its ids, embeddings, language head, tokenizer), and
the large model reads the prompt's text in its own tokens.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_modules.bridges import (
    BridgeCache,
    BridgeShape,
    LargeRead,
    LargeView,
    bridge_classes,
)
from llm_modules.decoding.steppers import Decoder
from llm_modules.errors import LLMModulesError
from llm_modules.losses import answer_logit_targets, next_token_loss
from llm_modules.models import own_prompt
from llm_modules.models.compose_config import ComposeConfig
from llm_modules.models.composed_stepper import (
    ComposedCache,
    ComposedStepper,
    OwnHeadStepper,
    PromptReadStepper,
)
from llm_modules.models.heads import ComposedHead
from llm_modules.models.large import Released, is_placed, num_layers, tapped_states
from llm_modules.models.saved import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    cpu_copies,
    load_weights,
    plain_name,
    resolve_model_folder,
    save_weights,
)
from llm_modules.models.vocab_map import VocabMap
from llm_modules.tensors import answer_start as first_label
from llm_modules.tensors import last_positions, positions_from_mask, prompt_source

logger = logging.getLogger(__name__)

LEAK_WARNING = (
    "causal=False reproduces the paper's leak: every position's cross-attention reads the large "
    "model's states of LATER positions, which encode the very tokens it must predict. Training "
    "loss is then not a next-token loss and does not match generation. Use only to reproduce the paper."
)


@dataclass
class ComposedOutput:
    logits: torch.Tensor | None  # (B, T, |V_large|) (|V_small| with the own head), or the last `logits_to_keep`
    loss: torch.Tensor | None = None
    cache: ComposedCache | None = None
    hidden: torch.Tensor | None = None  # (B, T, dS) the small model's output, with forward_read(hidden=True)


def keep_first_layers(model: nn.Module, n: int, spec: str) -> None:
    """Cut a Hugging Face causal LM down to its first `n` decoder layers, in place (config included)."""
    from llm_modules.bridges.base import decoder_layers

    layers = decoder_layers(model.base_model)
    if n > len(layers):
        raise LLMModulesError(f"small_layers={n}, but the small model {spec!r} has only {len(layers)} layers")
    parent = model.base_model
    name = next(k for k, v in parent.named_children() if v is layers)
    setattr(parent, name, nn.ModuleList(list(layers)[:n]))
    config = model.config.get_text_config()
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:n]


class LLMModulesModel(nn.Module):
    """A frozen large causal LM feeding a small trainable causal LM through a bridge.

    Build with `LLMModulesModel.compose(large=SPEC, small=SPEC, bridge=NAME, small_inputs=KIND)`;
    reload a trained one with `LLMModulesModel.from_pretrained(dir)`. Only the bridge, the small
    decoder and the head train. `vocab_map` is required for `small_inputs="mapped"` (`compose`
    builds it from both tokenizers, `from_pretrained` reads it from the saved weights). With head "own"
    `tokenizer` is the SMALL model's (`small_tokenizer`; the large one is `large_tokenizer`), the vocabulary the
    head predicts over.
    """

    def __init__(self, config: ComposeConfig, large: nn.Module, small: nn.Module, tokenizer: Any = None,
                 vocab_map: VocabMap | None = None, small_tokenizer: Any = None):
        super().__init__()
        self.config = config
        self.own_head = config.head == "own"
        self.large_tokenizer, self.small_tokenizer = tokenizer, small_tokenizer
        if self.own_head and (tokenizer is None or small_tokenizer is None):
            raise LLMModulesError("head 'own' re-tokenizes the prompt's text from the small tokenizer to the large "
                                  "one, so it needs both models' tokenizers")
        # the tokenizer of the vocabulary predicted: the LARGE model's (None for folders without one), or with the
        # own head the small model's
        self.tokenizer = small_tokenizer if self.own_head else tokenizer
        if not config.causal:
            warnings.warn(LEAK_WARNING, stacklevel=3)

        # Frozen for real: every weight, eval mode, called under no_grad.
        self.large = large
        self.large.requires_grad_(False)
        self.large.eval()
        self._large_decoder = Decoder(large.base_model)
        self._large_placement: dict[str, Any] = {}  # how it was placed while loading; restore_large repeats it
        self.num_large_layers = num_layers(large)
        large_head = large.get_output_embeddings()
        if large_head is None:
            raise LLMModulesError(f"large model {config.large!r} has no output embedding (is it a causal LM?)")
        # Looked up by name: transformers' get_output_embeddings() goes through the body, which
        # release_large() may free.
        self._large_head_name = next(n for n, m in large.named_modules() if m is large_head)
        vocab_size, large_dim = large_head.weight.shape

        # The small model keeps only its decoder: its old LM head is dropped. With small_inputs
        # "bridge" its token embeddings (unused: it reads the bridge through inputs_embeds) become a
        # frozen 1-row stub; with "mapped" they stay, frozen unless config.train_embeddings.
        if config.small_layers is not None:
            keep_first_layers(small, config.small_layers, config.small)
        small_head = small.get_output_embeddings() if self.own_head else None  # its own language head
        if self.own_head and small_head is None:
            raise LLMModulesError(f"head 'own': the small model {config.small!r} has no output embedding (is it a "
                                  f"causal LM?)")
        self._small_generation_config = getattr(small, "generation_config", None)
        self.small = small.base_model
        self.small.requires_grad_(config.train_small)
        small_dim = self.small.get_input_embeddings().weight.shape[1]
        self.vocab_map = vocab_map if config.small_inputs == "mapped" else None
        if config.small_inputs == "mapped":
            if vocab_map is None or vocab_map.large_vocab_size != vocab_size:
                raise LLMModulesError("small_inputs='mapped' needs a vocabulary map over the large vocabulary "
                                      "(compose builds one from both models' tokenizers)")
            self.small.get_input_embeddings().weight.requires_grad_(config.train_embeddings)
        elif config.small_inputs == "own":  # its own embeddings, part of the small model (train_small)
            small_head.requires_grad_(config.train_small)
        else:
            # in the small model's dtype: `self.small.dtype` (read below) is its first parameter's, the stub's
            stub = nn.Embedding(1, small_dim, dtype=self.small.get_input_embeddings().weight.dtype)
            stub.weight.requires_grad_(False)
            self.small.set_input_embeddings(stub)
        self._small_decoder = Decoder(self.small)
        self.small_max_positions = getattr(self.small.config, "max_position_embeddings", None)
        self.large_max_positions = getattr(large.config, "max_position_embeddings", None)

        bridge_class = bridge_classes(config.bridge)[1]
        shape = BridgeShape(large_dim, small_dim, self.num_large_layers, num_layers(small),
                            provide_inputs=config.small_inputs == "bridge")
        self.bridge = bridge_class(config.options(), shape)
        self.bridge.attach(self.small)
        # The large hidden states the model reads: the bridge's taps, and the final one for the residual head.
        final = {self.num_large_layers} if config.head == "residual" else set()
        self.large_taps = sorted(set(self.bridge.large_layers) | final)
        self.bridge_taps = [self.large_taps.index(t) for t in self.bridge.large_layers]  # indices into large_taps
        self._head_tap = self.large_taps.index(self.num_large_layers) if final else None
        self.head = ComposedHead(config.head, small_dim, large_dim, vocab_size, own=small_head)
        self.bridge.to(self.small.dtype)
        self.head.to(self.small.dtype)
        self.vocab_size = small_head.weight.shape[0] if self.own_head else vocab_size  # what the head predicts over
        # Positions per chunk when the training loss runs the head only where labels are (see
        # _chunked_head_loss): 256 x 151,936 float32 logits are 148 MiB.
        self.loss_chunk_tokens = 256
        self.log_parameter_counts()

    # ------------------------------------------------------------------ construction
    @classmethod
    def compose(
        cls,
        large: str,
        small: str,
        causal: bool = True,
        dtype: torch.dtype = torch.float32,
        large_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        large_placement: dict[str, Any] | None = None,
        shared_large: Any = None,
        **bridge_options: Any,
    ) -> LLMModulesModel:
        """Load both models from their specs and join them with a freshly initialised bridge and head.

        options: the composition's (head, bridge="eca"|"ladder"|"xattn", small_inputs="bridge"|"mapped",
        train_embeddings, train_small) and the bridge's own (see `llm_modules.bridges`; eca: num_layers, num_heads,
        adapter_dim, dropout, large_layer; ladder: large_layers; xattn: large_layers, small_stride,
        num_heads). `large_dtype` (default: `dtype`) lets the frozen large model run in bf16/fp16;
        `large_placement` (`large.load_options`) spreads it over GPUs or quantizes it while loading.
        `shared_large`: the large model already loaded from the spec `large` (a `specs.LoadedModel`), shared,
        not loaded again (several compositions over one large model).
        """
        config = ComposeConfig.from_options(large=large, small=small, causal=causal, **bridge_options)
        return cls._build(config, dtype, large_dtype, device, large_placement=large_placement, large=shared_large)

    @classmethod
    def _build(cls, config: ComposeConfig, dtype: torch.dtype, large_dtype: torch.dtype | None, device: Any,
               saved_in: Path | None = None, allow_large_mismatch: bool = False, vocab_map: VocabMap | None = None,
               large_placement: dict[str, Any] | None = None, large: Any = None):
        from llm_modules.models import large_identity
        from llm_modules.models.specs import resolve_model

        if large is None:
            large = resolve_model(config.large, dtype=large_dtype or dtype, with_tokenizer=True, placement=large_placement)
        if saved_in is None:  # composed now: pin this large model in the config that gets saved
            config.large_identity = large_identity.record(large.model)
        else:
            large_identity.check(config.large_identity, large.model, large.spec, str(saved_in), allow_large_mismatch,
                                 trained_on=config.large)  # the spec as given (a shared large: the user's)
        build_map = config.small_inputs == "mapped" and vocab_map is None
        own = config.head == "own"
        small = resolve_model(config.small, dtype=dtype, with_tokenizer=build_map or own)
        if build_map:
            vocab_map = VocabMap.from_models(large, small)
        if own:
            missing = [f"{side} model {loaded.spec!r}" for side, loaded in (("large", large), ("small", small))
                       if loaded.tokenizer is None]
            if missing:
                raise LLMModulesError(f"head 'own' decodes in the small tokenizer and re-tokenizes prompts for the "
                                      f"large one, so it needs both tokenizers; none found for the "
                                      f"{' and the '.join(missing)}")
        model = cls(config, large.model, small.model, tokenizer=large.tokenizer, vocab_map=vocab_map,
                    small_tokenizer=small.tokenizer if own else None)
        model._large_placement = large_placement or {}
        return model.place(device) if device is not None else model

    # ------------------------------------------------------------------ bookkeeping
    def train(self, mode: bool = True) -> LLMModulesModel:
        super().train(mode)
        self.large.eval()  # the frozen model never runs dropout
        return self

    @property
    def device(self) -> torch.device:
        return next(self.small.parameters()).device

    def place(self, device: str | torch.device) -> LLMModulesModel:
        """Move the model to `device`, except a large model that was placed while loading (a device
        map or quantization: `large.load_options`), which stays where it was put."""
        if not is_placed(self.large):
            return self.to(device)
        for name, child in self.named_children():
            if name != "large":
                child.to(device)
        return self

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """{part: {"trainable": n, "frozen": n}} for large, bridge, small, head and total."""
        counts: dict[str, dict[str, int]] = {}
        seen: set[int] = set()  # across parts: the own head's output layer may be the small model's embeddings
        for part in ("large", "bridge", "small", "head"):
            entry = {"trainable": 0, "frozen": 0}
            for p in getattr(self, part).parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                entry["trainable" if p.requires_grad else "frozen"] += p.numel()
            counts[part] = entry
        counts["total"] = {k: sum(c[k] for c in counts.values()) for k in ("trainable", "frozen")}
        return counts

    def log_parameter_counts(self) -> dict[str, dict[str, int]]:
        counts = self.parameter_counts()
        assert counts["large"]["trainable"] == 0, "the large model must be frozen"
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        assert trainable == counts["total"]["trainable"], "a trainable parameter lives outside the known parts"
        logger.info(
            "parameters: trainable %s (bridge %s, small %s, head %s), frozen %s (large %s)",
            f"{trainable:,}", f"{counts['bridge']['trainable']:,}", f"{counts['small']['trainable']:,}",
            f"{counts['head']['trainable']:,}", f"{counts['total']['frozen']:,}", f"{counts['large']['frozen']:,}",
        )
        return counts

    @property
    def large_head(self) -> nn.Module:
        """The large model's output embedding (frozen): the large logits are large_head(final hidden state)."""
        return self.large.get_submodule(self._large_head_name)

    @property
    def max_positions(self) -> int | None:
        """The positions the composed model can place: the smaller of the large and small models' limits
        (None when neither states one). Every reader of the context limit (decoding, the server, training
        data, lm-eval) asks here."""
        limits = [n for n in (self.large_max_positions, self.small_max_positions) if n]
        return min(limits) if limits else None

    # ------------------------------------------------------------------ freeing the large model
    @property
    def large_released(self) -> bool:
        return isinstance(self._large_decoder.module, Released)

    def release_large(self, keep_head: bool = False) -> bool:
        """Free the large model's weights that training from cached states never reads.

        Its body (embeddings, layers, final norm) goes, and its output embedding too when the head
        is `new` or `own` (the other heads read it) unless `keep_head` (a drafter's targets are the large
        model's logits: its head over the cached final states). What remains are the head's frozen
        weights. Calling the large model afterwards is an error until `restore_large()` reloads it
        from its spec. A `config:` large model (random weights) cannot be reloaded as it was, so it is
        kept; the return value says whether anything was freed.
        """
        if self.large_released:
            return True
        if self.config.large.startswith("config:"):
            return False
        body = self.large.base_model
        first = next(body.parameters())
        self._large_place = (first.dtype, first.device)
        setattr(self.large, self.large.base_model_prefix, Released())
        if self.config.head in ("new", "own") and not keep_head:
            parent, _, name = self._large_head_name.rpartition(".")
            setattr(self.large.get_submodule(parent), name, Released())
        else:  # the head stays, in a copy of its own: loaded weights may all live in one memory map of
            # the checkpoint file, which any surviving tensor keeps mapped (and its pages resident)
            head = self.large.get_submodule(self._large_head_name)
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        self._large_decoder = Decoder(self.large.base_model)
        return True

    def restore_large(self) -> None:
        """Reload the large model from its spec after `release_large()` (same weights, dtype, device)."""
        if not self.large_released:
            return
        from llm_modules.models.specs import resolve_model

        dtype, device = self._large_place
        large = resolve_model(self.config.large, dtype=dtype, with_tokenizer=False,
                              placement=self._large_placement).model
        large = large if is_placed(large) else large.to(device)
        large.requires_grad_(False)
        self.large = large.eval()
        self._large_decoder = Decoder(large.base_model)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def encode_large(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any = None,
        use_cache: bool = False,
        taps: list[int] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Frozen large model -> its hidden states (B, T, K, dL) at `taps` (default `self.large_taps`), and
        its KV cache."""
        return tapped_states(
            self._large_decoder, self.large_taps if taps is None else taps, self.num_large_layers,
            cache=cache, use_cache=use_cache, input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        large_states: torch.Tensor | None = None,
        cache: ComposedCache | None = None,
        logits_to_keep: int = 0,
        loss: str | None = None,
    ) -> ComposedOutput:
        """Logits over the large vocabulary for every new position, each reading the large states up to its own.

        input_ids (B, T) in the large tokenizer's ids; attention_mask (B, S) covers cached AND new
        positions (S = cached + T), left or right padding. `large_states` (B, T, K, dL), the large
        model's states at `self.large_taps` (or (B, T, dL) when K = 1), replaces the large model's
        forward (training from cached states); input_ids are still needed with small_inputs "mapped".
        `cache`: a `ComposedCache` the call reads and extends (`new_cache()` for an empty one); None: no
        cache. `logits_to_keep=n` keeps the last n positions' logits. `loss`: None gives logits and, with
        labels, their mean next-token loss; "mean" or "sum" (with labels) gives that loss only: the head
        runs only where a label is predicted (the vocabulary projection is the costliest step of training)
        and `logits` is None. A model that reads the prompt only (config.large_reads "prompt") reads the
        prompt that `labels` leave unlabelled; other reads (a drafter's lagged ones, a prompt-only model's
        decode) go through `forward_read`. Decoding with a cache goes through `decode_stepper()`.
        With head "own", input_ids and labels are the SMALL tokenizer's and the logits over its vocabulary; the
        large model reads the prompt (the tokens before the first label) re-tokenized (`large_prompt`), or
        `large_states` (B, P, K, dL) of those large prompts, right-padded with zeros (training from cached states).
        """
        if loss not in (None, "mean", "sum"):
            raise ValueError(f"loss must be None, 'mean' or 'sum', got {loss!r}")
        return self._forward(input_ids, attention_mask, labels, large_states, cache, logits_to_keep, loss, LargeRead())

    def forward_read(
        self,
        read: LargeRead,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        large_states: torch.Tensor | None = None,
        cache: ComposedCache | None = None,
        logits_to_keep: int = 0,
        vocab_rows: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> ComposedOutput:
        """`forward` reading what `read` says (`LargeRead`: lagged sources, a view after a cache, where a
        prompt-only row's answer starts, which key states are real) instead of each position's own: the
        draft network's entry point (as EAGLE's draft net has its own), also a prompt-only model's decode
        and scoring. `vocab_rows` (n,): logits over those vocabulary ids only (B, T, n) (a drafter's smaller
        vocabulary). `hidden=True` stops before the head: `hidden` is the small model's output (B, T, dS)
        and `logits` None (a loss that applies the head itself, chunked: the drafter's)."""
        return self._forward(input_ids, attention_mask, None, large_states, cache, logits_to_keep, None, read,
                             vocab_rows, hidden)

    def new_cache(self) -> ComposedCache:
        """An empty cache for `forward(cache=...)`: the call fills it."""
        return ComposedCache()

    def _forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 labels: torch.Tensor | None, large_states: torch.Tensor | None, cache: ComposedCache | None,
                 logits_to_keep: int, loss: str | None, read: LargeRead, vocab_rows: torch.Tensor | None = None,
                 return_hidden: bool = False) -> ComposedOutput:
        use_cache = cache is not None
        large_source, large_view, large_mask, answer_start = read.source, read.view, read.mask, read.answer_start
        if input_ids is None and large_states is None:
            raise ValueError("give input_ids or large_states")
        batch, length = (input_ids if input_ids is not None else large_states).shape[:2]
        if attention_mask is None:
            past = cache.length if cache is not None else 0
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=self.device)
        position_ids = positions_from_mask(attention_mask)[:, -length:]  # (B, T)
        top = int(position_ids.max()) + 1
        if self.max_positions is not None and top > self.max_positions:
            raise LLMModulesError(
                f"a sequence of {top} tokens is longer than the model can position ({self.max_positions}: large "
                f"model {self.large_max_positions}, small model {self.small_max_positions}); shorten the input"
            )
        if self.own_head:
            bridge_states, key_mask, view = own_prompt.read(self, read, input_ids, attention_mask, labels,
                                                              large_states, length)
            bridge_cache = None
            if cache is not None:
                cache.bridge = bridge_cache = cache.bridge or BridgeCache()
            embeds = self.bridge(bridge_states, key_mask, self.config.causal, bridge_cache, view)  # None: gated, inside
            own = self.small.get_input_embeddings()(input_ids.to(self.device))  # (B, T, dS)
            embeds = own if embeds is None else embeds + own
            return self._small_and_head(embeds, attention_mask, position_ids, cache, labels, None, logits_to_keep,
                                        loss, vocab_rows, return_hidden)
        prompt_only = self.config.large_reads == "prompt"
        if prompt_only and large_view is None and large_source is None:
            if answer_start is None and labels is None:
                raise LLMModulesError("this model reads the large model's states of the prompt only (large_reads="
                                      "'prompt'): pass labels, or forward_read(LargeRead(answer_start=...)) with where "
                                      "each row's answer starts")
            start = answer_start if answer_start is not None else first_label(labels)
            large_source = prompt_source(torch.as_tensor(start, device=self.device), batch, length, self.device)

        if large_states is None:
            if prompt_only and cache is not None and cache.length:
                raise LLMModulesError("large_reads='prompt' decodes without the large model: step it with "
                                      "decode_stepper(), or pass large_states and a LargeRead view")
            keep_large_cache = use_cache and not prompt_only  # reading the prompt only, no decode step needs it
            # the large model runs as far as some position reads (all of them unless a source says less)
            reach = length if large_source is None or keep_large_cache else \
                max(1, min(length, int(large_source.max()) + 1))
            past = attention_mask.shape[1] - length
            large_states, large_cache = self.encode_large(
                input_ids[:, :reach], attention_mask[:, :past + reach], position_ids[:, :reach],
                cache.large if cache else None, keep_large_cache,
            )  # (B, reach, K, dL)
            if reach < length:  # states no position reads: zeros
                large_states = torch.cat([large_states, large_states.new_zeros(
                    batch, length - reach, *large_states.shape[2:])], dim=1)  # (B, T, K, dL)
            if cache is not None:
                cache.large = large_cache
        elif large_states.dim() == 3:  # one tap
            large_states = large_states[:, :, None]  # (B, T, 1, dL)
        if large_states.shape[2] != len(self.large_taps):
            raise LLMModulesError(f"large_states hold {large_states.shape[2]} layers; this model reads "
                                  f"{len(self.large_taps)} (hidden states {self.large_taps})")
        bridge_cache = None
        if cache is not None:
            cache.bridge = bridge_cache = cache.bridge or BridgeCache()
        # the large model may live on other devices (a device map) and in another precision
        bridge_states = large_states[:, :, self.bridge_taps].to(self.device, self.small.dtype)  # (B, T, Kb, dL)
        view = large_view
        if large_source is not None:
            view = self._view(bridge_states, attention_mask, large_source, cache)
        elif view is not None:
            self._check_view(view)
            view = LargeView(view.source.to(self.device), view.states.to(self.device, self.small.dtype))
        key_mask = attention_mask if large_mask is None else large_mask.to(attention_mask.device)
        # The bridge also readies any hooks it has inside the small decoder for the call below.
        embeds = self.bridge(bridge_states, key_mask, self.config.causal, bridge_cache, view)  # (B, T, dS) or None
        if self.vocab_map is not None:
            if input_ids is None:
                raise LLMModulesError("small_inputs='mapped' embeds the token ids: pass input_ids with large_states")
            mapped = self.vocab_map(input_ids, self.small.get_input_embeddings().weight)  # (B, T, dS)
            embeds = mapped if embeds is None else embeds + mapped
        # The residual head adds to the large model's final states; the other heads do not read them.
        final = large_states[:, :, self._head_tap] if self._head_tap is not None else None  # (B, T, dL)
        return self._small_and_head(embeds, attention_mask, position_ids, cache, labels, final, logits_to_keep, loss,
                                    vocab_rows, return_hidden)

    def _small_and_head(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        cache: ComposedCache | None, labels: torch.Tensor | None, final: torch.Tensor | None,
                        logits_to_keep: int, loss: str | None, vocab_rows: torch.Tensor | None,
                        return_hidden: bool) -> ComposedOutput:
        """The small decoder over its input embeddings (B, T, dS), then the head (or its loss); `final` (B, T, dL):
        the large model's final states, which the residual head adds to."""
        use_cache = cache is not None
        small_out, small_cache = self._small_decoder(
            cache=cache.small if cache else None, use_cache=use_cache, inputs_embeds=embeds,
            attention_mask=attention_mask, position_ids=position_ids,
        )
        if cache is not None:
            cache.small, cache.length = small_cache, cache.length + embeds.shape[1]
        s = small_out.last_hidden_state  # (B, T, dS)
        if return_hidden:
            return ComposedOutput(logits=None, cache=cache, hidden=s)
        final = final.to(s.device) if final is not None else None
        large_head = self.large.get_submodule(self._large_head_name)
        if labels is not None and loss is not None:
            picked, targets = answer_logit_targets(s, labels)  # (N, dS), (N,): the positions that predict a label
            picked_final = answer_logit_targets(final, labels)[0] if final is not None else None  # (N, dL)
            total = self._chunked_head_loss(picked, picked_final, large_head, targets)
            return ComposedOutput(logits=None, loss=total / targets.numel() if loss == "mean" else total, cache=cache)
        if logits_to_keep:  # dense copies: a strided view into the heads' linears was 80-500x slower (CPU, bfloat16)
            s = last_positions(s, logits_to_keep)
            final = last_positions(final, logits_to_keep) if final is not None else None
        logits = self.head(s, final, large_head, vocab_rows)  # (B, T, V), or (B, T, n) over vocab_rows
        mean = next_token_loss(logits, labels, "mean") if labels is not None else None
        return ComposedOutput(logits=logits, loss=mean, cache=cache)

    def large_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     answer_start: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head "own": each row's prompt (its real tokens before `answer_start`, in the small tokenizer's ids
        (B, T), mask (B, T)) in the large tokenizer's ids, right-padded: (B, P) ids and 0/1 mask."""
        return own_prompt.large_prompt(self, input_ids, attention_mask, answer_start)

    def large_prompt_ids(self, prompt: list[int]) -> list[int]:
        """Head "own": one prompt in the small tokenizer's ids -> in the large tokenizer's (the same text), as the
        large model reads it in training (its state cache) and in decoding (`own_prompt.retokenize`)."""
        return own_prompt.large_prompt_ids(self, prompt)

    def _view(self, states: torch.Tensor, attention_mask: torch.Tensor, source: torch.Tensor,
              cache: ComposedCache | None) -> LargeView:
        """The LargeView of `source` (B, T) over this call's bridge states (B, T, Kb, dL)."""
        if cache is not None and cache.length:
            raise LLMModulesError("large_source indexes the positions of one call; it cannot follow a cache "
                                  "(pass a LargeRead view)")
        self._check_view(None)
        if source.shape != states.shape[:2]:
            raise LLMModulesError(f"large_source has shape {tuple(source.shape)}; expected (B, T) = {tuple(states.shape[:2])}")
        source = source.to(states.device).long()
        real = attention_mask[:, -states.shape[1]:].to(states.device).bool()  # (B, T): padding is never a source
        source = torch.where((source >= 0) & real.gather(1, source.clamp(min=0)), source, -1)
        picked = states.gather(1, source.clamp(min=0)[:, :, None, None].expand_as(states))  # (B, T, Kb, dL)
        return LargeView(source, picked * (source >= 0)[:, :, None, None].to(states.dtype))

    def _check_view(self, view: LargeView | None) -> None:
        if self._head_tap is not None:
            raise LLMModulesError(
                "the residual head adds the large model's logits at the very position it predicts from, which a "
                "lagged or prompt-only read does not have: use --head projected or new")

    def _chunked_head_loss(self, s: torch.Tensor, h: torch.Tensor | None, large_head: nn.Module,
                           targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the head over N picked positions, `loss_chunk_tokens` at a time.

        s (N, dS), h (N, dL) or None (heads that do not read it), targets (N,). With gradients on, each chunk's logits (chunk, |V|) are
        recomputed in the backward pass instead of kept, so memory holds one chunk's logits, not
        N x |V| (the largest tensor of training on long answers) at the price of one more head pass.
        """
        def chunk_loss(s_i: torch.Tensor, h_i: torch.Tensor | None, t_i: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.head(s_i, h_i, large_head).float(), t_i, reduction="sum")

        n, size = s.shape[0], self.loss_chunk_tokens
        if n <= size:
            return chunk_loss(s, h, targets)
        run = partial(checkpoint, chunk_loss, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss
        return sum(run(s[i : i + size], None if h is None else h[i : i + size], targets[i : i + size])
                   for i in range(0, n, size))

    def decode_stepper(self):
        """What the decoding engine steps: this model's three KV caches, or, reading the prompt only, the
        bridge's and the small model's (`llm_modules.models.composed_stepper`)."""
        if self.own_head:
            return OwnHeadStepper(self)
        return PromptReadStepper(self) if self.config.large_reads == "prompt" else ComposedStepper(self)

    @property
    def generation_config(self) -> Any:
        """The generation config of the model whose vocabulary is predicted (its end-of-sequence ids): the large
        model's, or with head "own" the small model's."""
        return self._small_generation_config if self.own_head else getattr(self.large, "generation_config", None)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, options: Any = None,
                 **keywords: Any) -> torch.Tensor:
        """Decode new tokens; returns ids including the prompt. How: a `SamplingOptions` or its fields as
        keywords (`max_new_tokens=64, do_sample=True, top_p=0.9`); see `llm_modules.decoding.generation.generate`."""
        from llm_modules.decoding.generation import generate

        return generate(self, input_ids, attention_mask, options, **keywords)

    # ------------------------------------------------------------------ save / load
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen large model and the small model's frozen weights (its token
        embeddings: the unused stub, or the pretrained ones that small_inputs "mapped" reads
        untrained; all of them with train_small=False), which come back from the small model's
        spec. The vocabulary map's index buffers are included. The own head's output layer is left out when
        frozen (it comes back from the small model's spec too) or when it is the small model's own (tied)
        embeddings, saved once, under the small model's name."""
        skip = {"small." + plain_name(name) for name, p in self.small.named_parameters() if not p.requires_grad}
        small = {id(p) for p in self.small.parameters()}
        skip |= {"head." + plain_name(name) for name, p in self.head.named_parameters()
                 if not p.requires_grad or id(p) in small}
        return {
            name: tensor for name, tensor in self.state_dict().items()
            if not name.startswith("large.") and name not in skip
        }

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the JSON config and safetensors of the trained parts only (never the large model).

        `state`: the trained tensors to write, by the same names, when they do not live in this
        module whole (gathered from FSDP shards); names it has beyond the trained ones are left out.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = cpu_copies(self.trained_state_dict(), state)
        save_weights(directory, tensors, {"format": "pt", "llm_modules": self.config.library_version})
        self.config.save(directory)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        dtype: torch.dtype = torch.float32,
        large_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        allow_large_mismatch: bool = False,
        large_placement: dict[str, Any] | None = None,
        large: Any = None,
    ) -> "LLMModulesModel":
        """Rebuild from a folder written by `save_pretrained` (or a training run folder: its best/, else
        last/): specs from the JSON, weights from safetensors.

        The large model must be the one the folder was saved with (same weights digest, see
        `llm_modules.models.large_identity`); `allow_large_mismatch=True` loads another one with a warning.
        """
        directory = resolve_model_folder(directory)
        config = ComposeConfig.load(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise LLMModulesError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
        state = load_weights(weights)
        # the vocabulary map is stored with the weights: the small tokenizer is not needed again
        vocab_map = VocabMap.from_state(state, "vocab_map.", weights) if config.small_inputs == "mapped" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the leak warning was given when the model was composed
            model = cls._build(config, dtype, large_dtype, None, directory, allow_large_mismatch, vocab_map=vocab_map,
                               large_placement=large_placement, large=large)
        if not config.causal:
            warnings.warn(LEAK_WARNING, stacklevel=2)
        model.load_trained_state_dict(state)
        return model.place(device) if device is not None else model

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trained_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise LLMModulesError(
                f"saved weights do not match this composition: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.load_state_dict(state, strict=False)
