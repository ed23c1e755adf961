"""Plain (non-composed) models: a Hugging Face causal LM as `finetune`, `lora` and `distill` train it, and its
saved folder.

    finetune   a plain causal LM, every weight
    lora       a plain causal LM with LoRA adapters on every linear layer (peft)
    distill    a student over the LARGE vocabulary: the small model's body with new tied embeddings, each large
               token's row the mean of the small model's embeddings of its text's small-tokenizer pieces
               (`student_init="mapped"`, the default) or random (`"random"`)

A plain folder: `WEIGHTS_FILE` (its trained tensors only), `PLAIN_FILE` (a `PlainSpec`: method, base
spec, options) and the tokenizer files; `load_plain` rebuilds the model from the base spec and loads
the tensors. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm_modules.errors import LLMModulesError
from llm_modules.models.saved import (
    PLAIN_FILE,
    WEIGHTS_FILE,
    cpu_copies,
    load_weights,
    plain_name,
    save_weights,
)


@dataclasses.dataclass
class PlainSpec:
    """How a plain method's model is rebuilt from its base spec (saved as PLAIN_FILE)."""

    method: str
    base: str  # model spec of the trained model's starting point (the student's body for distill)
    lora_rank: int = 0
    lora_alpha: int = 0
    teacher: str = ""  # distill: the large model whose vocabulary the student reads and writes
    vocab_size: int = 0  # distill: the teacher's vocabulary size
    special_ids: dict[str, Any] = dataclasses.field(default_factory=dict)  # distill: eos/bos/pad of the teacher
    student_init: str = "random"  # distill: how the new embeddings started, "mapped" or "random" (older folders)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a plain model by state-dict name (tied weights once, under their first name)."""
    seen: set[int] = set()
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            state[plain_name(name)] = p
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], method: str) -> None:
    """Copy saved trained tensors into `model`; the names must be exactly its trainable ones."""
    expected = set(trainable_state(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise LLMModulesError(f"saved {method} weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    params = {plain_name(name): p for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def save_plain(directory: str | Path, spec: "PlainSpec", model: nn.Module, tokenizer: Any,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a plain model's folder: its trained tensors (or `state`'s, gathered from FSDP shards), its spec
    and its tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(directory, cpu_copies(trainable_state(model), state), {"format": "pt"})
    (directory / PLAIN_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def build_student(small: nn.Module, vocab_size: int, special_ids: dict[str, Any],
                  init: torch.Tensor | None = None) -> nn.Module:
    """The small model's body with new, tied token embeddings and LM head over the large vocabulary: `init`
    (vocab_size, width) where given (`mapped_embeddings`), else random."""
    width = small.get_input_embeddings().weight.shape[1]
    embed = nn.Embedding(vocab_size, width)
    if init is None:
        nn.init.normal_(embed.weight, std=getattr(small.config, "initializer_range", 0.02))
    else:
        if tuple(init.shape) != (vocab_size, width):
            raise LLMModulesError(f"student embeddings: init is {tuple(init.shape)}, the student needs "
                                  f"{(vocab_size, width)}")
        with torch.no_grad():
            embed.weight.copy_(init)
    small.set_input_embeddings(embed)
    head = nn.Linear(width, vocab_size, bias=False)
    head.weight = embed.weight
    small.set_output_embeddings(head)
    small.config.vocab_size = vocab_size
    small.config.tie_word_embeddings = True
    for name, value in special_ids.items():
        setattr(small.config, name, value)
        setattr(small.generation_config, name, value)
    return small


def mapped_embeddings(large_tokenizer: Any, small: nn.Module, small_tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """(vocab_size, width): each large token's row the mean of the small model's input embeddings of the pieces the
    small tokenizer cuts its text into (`models.vocab_map`), so the student starts from the small model's own
    knowledge of every token the two vocabularies share rather than from noise."""
    from llm_modules.models.vocab_map import VocabMap

    weight = small.get_input_embeddings().weight
    vocab_map = VocabMap.from_tokenizers(large_tokenizer, small_tokenizer, vocab_size, weight.shape[0])
    with torch.no_grad():
        return vocab_map(torch.arange(vocab_size)[None], weight.float())[0].to(weight.dtype)


def special_ids(large: nn.Module, tokenizer: Any) -> dict[str, Any]:
    return {name: getattr(large.generation_config, name, None) or getattr(tokenizer, name, None)
            for name in ("eos_token_id", "bos_token_id", "pad_token_id")}


def add_lora(model: nn.Module, rank: int, alpha: int) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LLMModulesError("method 'lora' needs peft: pip install 'llm-modules[eval]'") from None
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def build_plain(spec: PlainSpec, tokenizer: Any = None, initialise: bool = True) -> tuple[nn.Module, Any]:
    """The (untrained) model of a plain method from its spec; returns (model, tokenizer). `initialise=False`: the
    weights are about to be loaded over it (a distill student's embeddings are then left random)."""
    from llm_modules.models.specs import resolve_model, resolve_tokenizer

    if spec.method == "distill":
        if spec.student_init not in ("mapped", "random"):
            raise LLMModulesError(f"distill student_init must be 'mapped' or 'random', got {spec.student_init!r}")
        mapped = initialise and spec.student_init == "mapped"
        loaded = resolve_model(spec.base, with_tokenizer=mapped)
        tokenizer = tokenizer if tokenizer is not None else resolve_tokenizer(spec.teacher)
        init = None
        if mapped:
            if loaded.tokenizer is None or tokenizer is None:
                missing = spec.base if loaded.tokenizer is None else spec.teacher
                raise LLMModulesError(f"a mapped student needs both tokenizers: none found for {missing!r} (add its "
                                      f"tokenizer files, or start from random embeddings: --distill-init random)")
            init = mapped_embeddings(tokenizer, loaded.model, loaded.tokenizer, spec.vocab_size)
        return build_student(loaded.model, spec.vocab_size, spec.special_ids, init), tokenizer
    loaded = resolve_model(spec.base)
    if loaded.tokenizer is None:
        raise LLMModulesError(f"model {spec.base!r} has no tokenizer; method '{spec.method}' needs one")
    model = add_lora(loaded.model, spec.lora_rank, spec.lora_alpha) if spec.method == "lora" else loaded.model
    return model, loaded.tokenizer


def load_plain(directory: str | Path) -> tuple[nn.Module, Any]:
    """A folder written by a plain objective's save_pretrained -> (model with trained weights, tokenizer)."""
    from llm_modules.models.specs import resolve_tokenizer

    directory = Path(directory)
    try:
        spec = PlainSpec(**json.loads((directory / PLAIN_FILE).read_text()))
    except (OSError, ValueError, TypeError) as err:  # ValueError: not JSON; TypeError: not its fields
        raise LLMModulesError(f"{directory / PLAIN_FILE} cannot be read: {err}") from None
    tokenizer = resolve_tokenizer(str(directory))
    model, base_tokenizer = build_plain(spec, tokenizer=tokenizer, initialise=False)
    load_trainable_state(model, load_weights(directory / WEIGHTS_FILE), spec.method)
    return model.eval(), tokenizer or base_tokenizer
