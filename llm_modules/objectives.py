"""What the one training loop trains: per method, a model and a loss (TRL's trainer = model + loss).

    composed   LLMModulesModel: frozen large -> bridge -> small -> head, from cached large states
    finetune   a plain causal LM, every weight (the small model alone, in the reports)
    lora       a plain causal LM with LoRA adapters on every linear layer (peft)
    distill    a student over the LARGE vocabulary (the small model's body, new tied embeddings)
               trained by forward KL to the frozen large model's next-token distribution

`train.py` owns the loop (batches, schedule, clipping, evaluation, checkpoints, resume); an
objective only says which parameters train at which rate, what the training loss of a batch is,
and how its trained weights are saved and loaded. Every loss is a SUM over answer positions, so
the loop divides by the step's answer-token count whatever the method. Validation always scores
cross-entropy of the real answer tokens (`eval_loss_sum`), also for distillation, so curves of
every method are in the same unit (bits per byte of answer text, see `evaluate.py`).

A plain method's folder: `model.safetensors` (its trained tensors only), `llm_modules_plain.json`
(method, base spec, options) and the tokenizer files; `load_plain` rebuilds the model from the
base spec and loads the tensors. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_FILE, WEIGHTS_FILE
from .errors import LLMModulesError

METHODS = ("composed", "finetune", "lora", "distill")
PLAIN_FILE = "llm_modules_plain.json"


def answer_logit_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the positions that predict an answer token, and those tokens (N,)."""
    targets = labels[:, 1:].to(logits.device)  # (B, T-1)
    keep = targets != -100
    return logits[:, :-1][keep], targets[keep]


def answer_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over answer tokens (the one loss every method reports)."""
    picked, targets = answer_logit_targets(logits, labels)
    return F.cross_entropy(picked.float(), targets, reduction="sum")


class Objective:
    """A trainable model and its loss, as the training loop sees them."""

    method: str
    module: nn.Module  # what accelerate prepares: every trainable parameter lives in it
    tokenizer: Any
    max_positions: int | None

    def param_groups(self, config: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    def attach_data(self, config: Any, data: Any, accelerator: Any) -> None:
        """Called once the data is prepared (the composed model builds its state caches here)."""

    def batch_extras(self, split: str, indices: list[int], width: int) -> dict[str, torch.Tensor]:
        """Tensors beside input_ids/attention_mask/labels for examples `indices` of `split`."""
        return {}

    def loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch, summed over its answer positions."""
        raise NotImplementedError

    def eval_loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy of the answer tokens (validation; the same for every method)."""
        return self.loss_sum(wrapped, batch)

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        return {"total": _count(self.module)}

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the trained weights (or `state`, the same names gathered from FSDP shards) and JSON."""
        raise NotImplementedError

    def scorer(self) -> Any:
        """The evaluation adapter (`evaluate.ComposedScorer` / `PlainScorer`) over the trained model."""
        raise NotImplementedError

    def before_generation(self) -> None:
        """Make the model able to generate (the composed model reloads a released large model)."""

    def place(self, device: torch.device) -> None:
        """Move what trains (and any frozen model the loss reads) to this process's device."""
        self.module.to(device)


def _count(module: nn.Module) -> dict[str, int]:
    seen: dict[int, nn.Parameter] = {id(p): p for p in module.parameters()}
    return {"trainable": sum(p.numel() for p in seen.values() if p.requires_grad),
            "frozen": sum(p.numel() for p in seen.values() if not p.requires_grad)}


def large_loading(config: Any, device: Any = "cpu", processes: int = 1) -> dict[str, Any]:
    """`resolve_model` arguments of a run's frozen large model: its dtype and placement (large.load_options)."""
    from .large import LARGE_DTYPES, load_options

    placement = load_options(config.large_dtype, config.large_device_map, config.large_quantization, device, processes)
    return {"dtype": LARGE_DTYPES[config.large_dtype], "placement": placement}


# ----------------------------------------------------------------------------- composed
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


class ComposedObjective(Objective):
    """Ours: the bridge, the small model and the head train; the large model's states are cached."""

    method = "composed"

    def __init__(self, config: Any, device: Any = "cpu", processes: int = 1):
        from .model import LLMModulesModel

        large = large_loading(config, device, processes)
        self.model = LLMModulesModel.compose(large=config.large, small=config.small, large_dtype=large["dtype"],
                                             large_placement=large["placement"], **config.compose_options())
        if self.model.tokenizer is None:
            raise LLMModulesError(f"the large model {config.large!r} has no tokenizer; training needs one")
        if config.gradient_checkpointing:
            self.model.small.gradient_checkpointing_enable()
        self.module, self.tokenizer = TrainedParts(self.model), self.model.tokenizer
        self.max_positions = self.model.small_max_positions
        self.states: dict[str, Any] = {"train": None, "val": None}
        self.counts = self.model.parameter_counts()  # before any release of the large model
        self.released = False
        self.cache_seconds = 0.0  # spent building the state cache in this run (0 when reused)

    def param_groups(self, config: Any) -> list[dict[str, Any]]:
        rest = [p for m in (self.model.small, self.model.head) for p in m.parameters() if p.requires_grad]
        return [{"params": [p for p in self.model.bridge.parameters() if p.requires_grad], "lr": config.lr_bridge},
                {"params": rest, "lr": config.lr_small}]

    def attach_data(self, config: Any, data: Any, accelerator: Any) -> None:
        started = time.perf_counter()
        built = self._build_state_caches(config, data, accelerator)
        self.cache_seconds = round(time.perf_counter() - started, 2) if built else 0.0
        self.released = self.states["train"] is not None and config.release_large and self.model.release_large()
        if self.released and accelerator.is_main_process:
            print("large model released for training from cached states (reloaded to generate)")

    def _build_state_caches(self, config: Any, data: Any, accelerator: Any) -> bool:
        """Large-model states of train and validation examples, computed once, every process encoding
        its share (`StateCache.open_or_build`); returns whether anything was built (rather than reused)."""
        if not config.state_cache:
            return False
        from .cache_admin import enforce_size_cap
        from .specs import cache_dir
        from .state_cache import StateCache, examples_digest, model_state_key, state_cache_key

        root = Path(config.state_cache_dir) if config.state_cache_dir else cache_dir() / "states"
        model_key = model_state_key(self.model, config.state_cache_dtype)
        for split in ("train", "val"):  # keyed by token ids: another split reuses their states
            examples = getattr(data, split)
            key = state_cache_key(self.model, examples_digest(examples), config.state_cache_dtype)
            self.states[split] = StateCache.open_or_build(
                root, key, self.model, examples, dtype=config.state_cache_dtype,
                progress=config.progress and accelerator.is_main_process, model_key=model_key,
            ) if examples else None
        caches = [c for c in self.states.values() if c is not None]
        reused = all(not c.built for c in caches)
        if accelerator.is_main_process:
            size, computed = sum(c.size_bytes for c in caches), sum(c.computed for c in caches)
            print(f"large-model state cache: {size / 2**20:.1f} MiB ({'reused' if reused else 'built'}, {computed} of "
                  f"{len(data.train) + len(data.val)} examples through the large model) in {root}")
            enforce_size_cap(root, keep={c.path.name for c in caches})
        return not reused

    def batch_extras(self, split: str, indices: list[int], width: int) -> dict[str, torch.Tensor]:
        states = self.states.get(split)
        return {} if states is None else {"large_states": states.batch(indices, pad_to=width)}

    def loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return wrapped(**batch, return_logits=False, loss_reduction="sum").loss

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
        from .evaluate import ComposedScorer

        self.before_generation()
        return ComposedScorer(self.model)


# ----------------------------------------------------------------------------- plain models
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


class PlainObjective(Objective):
    """finetune / lora / distill: one Hugging Face causal LM whose trainable weights are saved alone."""

    def __init__(self, spec: PlainSpec, model: nn.Module, tokenizer: Any, teacher: nn.Module | None = None,
                 temperature: float = 1.0):
        self.spec, self.method = spec, spec.method
        self.module, self.tokenizer, self.teacher, self.temperature = model, tokenizer, teacher, temperature
        self.max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def param_groups(self, config: Any) -> list[dict[str, Any]]:
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        if self.method != "distill":
            return [{"params": trainable, "lr": config.lr_small}]
        embed = self.module.get_input_embeddings().weight  # new and random: it gets the bridge's (higher) rate
        return [{"params": [embed], "lr": config.lr_bridge},
                {"params": [p for p in trainable if p is not embed], "lr": config.lr_small}]

    def _logits(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)

    def loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self._logits(wrapped, batch)
        if self.teacher is None:
            return answer_nll_sum(logits, batch["labels"])
        with torch.no_grad():
            teacher = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target, _ = answer_logit_targets(teacher.to(logits.device), batch["labels"])  # (N, V)
        student, _ = answer_logit_targets(logits, batch["labels"])
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(target.float() / t, -1),
                      log_target=True, reduction="sum")
        return kl * t**2

    def eval_loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return answer_nll_sum(self._logits(wrapped, batch), batch["labels"])

    def place(self, device: torch.device) -> None:
        from .large import is_placed

        self.module.to(device)
        if self.teacher is not None and not is_placed(self.teacher):
            self.teacher.to(device)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        from .model import plain_name

        seen: set[int] = set()
        state = {}
        for name, p in self.module.named_parameters():  # tied weights once, under their first name
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                state[plain_name(name)] = p
        return state

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trained_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise LLMModulesError(f"saved {self.method} weights do not match the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        from .model import plain_name

        params = {plain_name(name): p for name, p in self.module.named_parameters()}
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        from .model import cpu_copies

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = cpu_copies(self.trained_state_dict(), state)
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(directory / WEIGHTS_FILE)
        (directory / PLAIN_FILE).write_text(json.dumps(dataclasses.asdict(self.spec), indent=1))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory

    def scorer(self) -> Any:
        from .evaluate import PlainScorer

        return PlainScorer(self.module, self.tokenizer)


def build_student(small: nn.Module, vocab_size: int, special_ids: dict[str, Any]) -> nn.Module:
    """The small model's body with new, tied token embeddings and LM head over the large vocabulary."""
    width = small.get_input_embeddings().weight.shape[1]
    embed = nn.Embedding(vocab_size, width)
    nn.init.normal_(embed.weight, std=getattr(small.config, "initializer_range", 0.02))
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


def _special_ids(large: nn.Module, tokenizer: Any) -> dict[str, Any]:
    return {name: getattr(large.generation_config, name, None) or getattr(tokenizer, name, None)
            for name in ("eos_token_id", "bos_token_id", "pad_token_id")}


def _add_lora(model: nn.Module, rank: int, alpha: int) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LLMModulesError("method 'lora' needs peft: pip install 'llm-modules[eval]'") from None
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def build_plain(spec: PlainSpec, teacher: nn.Module | None = None, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """The (untrained) model of a plain method from its spec; returns (model, tokenizer)."""
    from .specs import resolve_model, resolve_tokenizer

    if spec.method == "distill":
        student = resolve_model(spec.base, with_tokenizer=False).model
        tokenizer = tokenizer if tokenizer is not None else resolve_tokenizer(spec.teacher)
        return build_student(student, spec.vocab_size, spec.special_ids), tokenizer
    loaded = resolve_model(spec.base)
    if loaded.tokenizer is None:
        raise LLMModulesError(f"model {spec.base!r} has no tokenizer; method '{spec.method}' needs one")
    model = _add_lora(loaded.model, spec.lora_rank, spec.lora_alpha) if spec.method == "lora" else loaded.model
    return model, loaded.tokenizer


def plain_objective(config: Any, device: Any = "cpu", processes: int = 1) -> PlainObjective:
    """finetune trains `config.small`, lora `config.large`; distill reads `config.large` as the
    teacher (loaded like the composed method's frozen large model) and builds its student from
    `config.small`'s body."""
    from .specs import resolve_model

    if config.method == "distill":
        large = resolve_model(config.large, **large_loading(config, device, processes))
        if large.tokenizer is None:
            raise LLMModulesError(f"model {config.large!r} has no tokenizer; distillation needs one")
        teacher = large.model.eval().requires_grad_(False)
        vocab = teacher.get_output_embeddings().weight.shape[0]
        spec = PlainSpec("distill", config.small, teacher=config.large, vocab_size=vocab,
                         special_ids=_special_ids(teacher, large.tokenizer))
        model, tokenizer = build_plain(spec, tokenizer=large.tokenizer)
        return PlainObjective(spec, model.train(), tokenizer, teacher, config.distill_temperature)
    spec = PlainSpec(config.method, config.trained_model(),
                     lora_rank=config.lora_rank if config.method == "lora" else 0,
                     lora_alpha=2 * config.lora_rank if config.method == "lora" else 0)
    model, tokenizer = build_plain(spec)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return PlainObjective(spec, model.train(), tokenizer)


def build_objective(config: Any, device: Any = "cpu", processes: int = 1) -> Objective:
    """The objective of a TrainConfig's `method`; `device` and `processes` place a frozen large model."""
    if config.method == "composed":
        return ComposedObjective(config, device, processes)
    return plain_objective(config, device, processes)


def load_plain(directory: str | Path) -> tuple[nn.Module, Any]:
    """A folder written by a plain objective's save_pretrained -> (model with trained weights, tokenizer)."""
    from .specs import resolve_tokenizer

    directory = Path(directory)
    try:
        spec = PlainSpec(**json.loads((directory / PLAIN_FILE).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise LLMModulesError(f"{directory / PLAIN_FILE} cannot be read: {err}") from None
    tokenizer = resolve_tokenizer(str(directory))
    model, base_tokenizer = build_plain(spec, tokenizer=tokenizer)
    objective = PlainObjective(spec, model, tokenizer or base_tokenizer)
    objective.load_trained_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval(), objective.tokenizer


def saved_kind(directory: str | Path) -> str | None:
    """'composed' or 'plain' for a folder written by save_pretrained; None otherwise."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        return "composed"
    if (directory / PLAIN_FILE).is_file():
        return "plain"
    return None
