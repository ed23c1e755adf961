"""The composed method: the bridge, the small model and the head train; the large model's states are
read from the state cache (built here once per data split), its weights freed while training."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm_modules.errors import LLMModulesError
from llm_modules.tensors import IGNORE_INDEX
from llm_modules.training.objectives.base import Objective, large_loading


class TrainedParts(nn.Module):
    """What DDP or FSDP wraps for the composed method: the bridge, the small model, the head (and
    the vocabulary map), never the frozen large model, which is then neither broadcast, sharded,
    reduced nor saved by the wrapper. Calling it runs the whole composed model, whose forward uses
    these very modules. State-dict names are the composed model's ("bridge.", "small.", "head.")."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bridge, self.small, self.head = model.bridge, model.small, model.head
        if model.vocab_map is not None:
            self.vocab_map = model.vocab_map
        # FSDP's transformer auto-wrap reads the decoder layer classes from here
        self._no_split_modules = list(getattr(model.small, "_no_split_modules", None) or [])
        object.__setattr__(self, "composed", model)  # a plain reference: the large model stays outside

    def forward(self, **batch: Any) -> Any:
        return self.composed(**batch)


def prompt_examples(examples: list[Any], large_ids: Callable[[list[int]], list[int]] | None = None) -> list[Any]:
    """Each example cut to its prompt (the tokens before its first label): all a model that reads the prompt
    only needs of the large model, so its state cache stores no answer position. `large_ids`: how a prompt in
    the examples' tokens becomes the large model's (head "own": examples in the small tokenizer's ids)."""
    from llm_modules.data.prepare import TokenizedExample, prompt_length

    cut = [e.input_ids[:prompt_length(e)] for e in examples]
    cut = cut if large_ids is None else [large_ids(ids) for ids in cut]
    return [TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * len(ids), record=e.record)
            for e, ids in zip(examples, cut)]


class ComposedObjective(Objective):
    """Ours: the bridge, the small model and the head train; the large model's states are cached. With head
    "own" the examples are in the small tokenizer's ids (`tokenizer` is the small one) and the state cache
    holds each prompt re-tokenized for the large model (`LLMModulesModel.large_prompt_ids`)."""

    held_states: Any = None  # states another pass of the large model computed (`states.store.HeldStates`)

    method = "composed"
    keep_large_head = False  # release_large keeps the large output embedding even under the `new` head

    def __init__(self, config: Any, device: Any = "cpu", processes: int = 1):
        from llm_modules.models.composed import LLMModulesModel

        large = large_loading(config, device, processes)
        self.model = LLMModulesModel.compose(large=config.large, small=config.small, large_dtype=large["dtype"],
                                             large_placement=large["placement"], **config.compose.options())
        if self.model.tokenizer is None:
            raise LLMModulesError(f"the large model {config.large!r} has no tokenizer; training needs one")
        if config.hardware.gradient_checkpointing:
            self.model.small.gradient_checkpointing_enable()
        self.module, self.tokenizer = TrainedParts(self.model), self.model.tokenizer
        self.max_positions = self.model.max_positions
        self.states: dict[str, Any] = {"train": None, "val": None}
        self.counts = self.model.parameter_counts()  # before any release of the large model
        self.released = False
        self.cache_seconds = 0.0  # spent building the state cache in this run (0 when reused)
        self.cache_keys: list[str] = []  # the state caches' keys: a run that reused them can be charged their build

    def param_groups(self, config: Any) -> list[dict[str, Any]]:
        # each once: the own head's output layer may be the small model's (tied) input embeddings
        rest = list({id(p): p for m in (self.model.small, self.model.head) for p in m.parameters()
                     if p.requires_grad}.values())
        bridge = [p for p in self.model.bridge.parameters() if p.requires_grad]
        return [{"params": bridge, "lr": config.train.lr_bridge},
                {"params": rest, "lr": config.train.lr_small}]

    def attach_data(self, config: Any, data: Any, accelerator: Any) -> None:
        started = time.perf_counter()
        built = self._build_state_caches(config, data, accelerator)
        self.cache_seconds = round(time.perf_counter() - started, 2) if built else 0.0
        self.released = (self.states["train"] is not None and config.hardware.release_large
                         and self.model.release_large(keep_head=self.keep_large_head))
        if self.released and accelerator.is_main_process:
            print("large model released for training from cached states (reloaded to generate)")

    def _build_state_caches(self, config: Any, data: Any, accelerator: Any) -> bool:
        """Large-model states of train and validation examples, computed once, every process encoding
        its share (`StateCache.open_or_build`); returns whether anything was built (rather than reused)."""
        if not config.hardware.state_cache:
            return False
        from llm_modules.models.specs import cache_dir
        from llm_modules.states.admin import enforce_size_cap
        from llm_modules.states.store import (
            StateCache,
            examples_digest,
            model_state_key,
            state_cache_key,
        )

        hardware = config.hardware
        root = Path(hardware.state_cache_dir) if hardware.state_cache_dir else cache_dir() / "states"
        cached = self.cached_model()
        model_key = model_state_key(cached, hardware.state_cache_dtype)
        prompt_only = self.model.config.large_reads == "prompt"  # then the states of the prompts only
        for split in ("train", "val"):  # keyed by token ids: another split reuses their states
            examples = prompt_examples(getattr(data, split), self.model.large_prompt_ids if self.model.own_head
                                       else None) if prompt_only else getattr(data, split)
            fingerprint = ("prompt:" if prompt_only else "") + examples_digest(examples)
            key = state_cache_key(cached, fingerprint, hardware.state_cache_dtype)
            self.states[split] = StateCache.open_or_build(
                root, key, cached, examples, dtype=hardware.state_cache_dtype,
                progress=config.eval.progress and accelerator.is_main_process, model_key=model_key,
                held=self.held_states,
            ) if examples else None
        caches = [c for c in self.states.values() if c is not None]
        self.cache_keys = sorted(c.path.name for c in caches)
        reused = all(not c.built for c in caches)
        if accelerator.is_main_process:
            size, computed = sum(c.size_bytes for c in caches), sum(c.computed for c in caches)
            print(f"large-model state cache: {size / 2**20:.1f} MiB ({'reused' if reused else 'built'}, {computed} of "
                  f"{len(data.train) + len(data.val)} examples through the large model) in {root}")
            enforce_size_cap(root, keep={c.path.name for c in caches})
        return not reused

    def cached_model(self) -> Any:
        """The model as the state cache sees it (its `large_taps` are the cached hidden states and in its key)."""
        return self.model

    def batch_extras(self, split: str, indices: list[int], width: int) -> dict[str, torch.Tensor]:
        # (B, width, K, dL); a prompt-only cache's rows end at their prompt, zeros after (never read)
        states = self.states.get(split)
        if states is None:
            return {}
        if self.model.own_head:  # the prompts in the large tokenizer's ids: a width of their own
            return {"large_states": states.batch(indices, pad_to=max(states.lengths[i] for i in indices))}
        return {"large_states": states.batch(indices, pad_to=width)}

    def loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return wrapped(**batch, loss="sum").loss

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        return self.counts

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.trained_state_dict()

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_trained_state_dict(state)

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        return self.model.save_pretrained(directory, state)

    def before_generation(self) -> None:
        self.model.restore_large()

    def place(self, device: torch.device) -> None:
        self.model.place(device)

    def scorer(self) -> Any:
        from llm_modules.evaluation.harness import ComposedScorer

        self.before_generation()
        return ComposedScorer(self.model)
