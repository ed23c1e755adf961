"""Everything a training run depends on, as one validated dataclass saved as JSON beside its outputs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_modules.bridges import BRIDGES, option_names
from llm_modules.bridges.eca import EcaOptions
from llm_modules.bridges.xattn import XattnOptions
from llm_modules.data.prepare import LOSS_ON, OVERFLOW, TEMPLATES, DataConfig
from llm_modules.errors import LLMModulesError
from llm_modules.models.config import (
    GATED_BRIDGES,
    HEAD_KINDS,
    LARGE_READS,
    SMALL_INPUTS,
    ComposeConfig,
)
from llm_modules.models.large import DEVICE_MAPS, QUANTIZATIONS
from llm_modules.models.saved import RUN_CONFIG_FILE  # noqa: F401 (its old home)
from llm_modules.tensors import DTYPES
from llm_modules.training.objectives import METHODS

# Options that may differ between an interrupted run and its resumption.
RESUME_FREE = {"resume", "progress", "release_large", "large_device_map",  # change nothing a run computes
               "paper_lrs"}  # only picks the learning rates' defaults; the rates themselves are compared

# Default learning rates (small side, bridge or new embeddings) per method: what the learning-rate
# grids of our equal-time reports picked (3 points spanning 10x, validation bits per byte after a
# quarter of a 10-minute budget, Qwen2.5-Coder-1.5B and SmolLM2-135M; README "Results: equal training
# time", reports/equal_time/*/results.md). Where the two tasks picked differently, the rate that
# lost least on the other task. None: the method has no bridge (the paper's value is kept there).
LEARNING_RATES: dict[str, tuple[float, float | None]] = {
    "composed": (3e-4, 6e-4),  # picked for the paper's bridge on both tasks (1e-4 and 1e-3 lost 1-7%)
    "finetune": (1e-4, None),  # gsm_symbolic's pick; family_relationships picked 3e-4 (1e-4: +5.6%), which overfit later
    "lora": (3e-4, None),  # family_relationships' pick; gsm_symbolic picked 1e-3 (3e-4: +14%; 1e-3 lost 21% the other way)
    "distill": (5e-5, 1e-4),  # not measured: the paper's
}
PAPER_LEARNING_RATES = (5e-5, 1e-4)  # the paper's AdamW rates: small model and head, bridge (--paper-lrs)

DEMO = dict(  # sized to finish within 15 minutes on a 2-core CPU (measured: see README)
    large="qwen2.5-coder-0.5b-instruct",
    small="smollm2-135m-instruct",
    data="reasoning-gym:gsm_symbolic?size=160&seed=0",
    output="runs/demo",
    template="chat",
    head="residual",
    max_length=320,
    batch_size=4,
    epochs=1,
    eval_every=10,
    save_every=10,
    num_samples=3,
    max_new_tokens=200,
)

# Options with a fixed set of values: checked on construction, offered as choices by the CLI.
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS, "head": HEAD_KINDS, "bridge": tuple(BRIDGES), "small_inputs": SMALL_INPUTS,
    "large_reads": LARGE_READS,
    "template": TEMPLATES, "loss_on": LOSS_ON, "overflow": OVERFLOW,
    "mixed_precision": ("auto", "no", "bf16", "fp16"), "state_cache_dtype": tuple(DTYPES),
    "large_dtype": tuple(DTYPES), "large_device_map": DEVICE_MAPS, "large_quantization": QUANTIZATIONS,
    "drafter_loss": ("kl", "ce"), "drafter_targets": ("logits", "generated"),
}
# The methods that compose a model (a bridge, a small model, a head), and their composition defaults
# where they differ from ComposeConfig's: a drafter reads the large model's frozen output embedding (EAGLE
# reuses the target's LM head) and must see the tokens it drafts itself (with "bridge" inputs the newest
# token reaches it only through large states it does not have yet); its bridge is the ladder, whose drafters
# agreed with Qwen2.5-Coder-1.5B's next token 2.4-2.6x as often as the paper's bridge's (reports/speculative).
COMPOSING = ("composed", "drafter")
METHOD_DEFAULTS: dict[str, dict[str, str]] = {
    "composed": {"head": ComposeConfig.head, "small_inputs": ComposeConfig.small_inputs, "bridge": ComposeConfig.bridge},
    "drafter": {"head": "projected", "small_inputs": "mapped", "bridge": "ladder"},
}
# Options of --method drafter only.
DRAFTER_OPTIONS = ("draft_tokens", "drafter_loss", "drafter_targets", "draft_vocab")
# Options of the frozen large model: the methods that train it (lora) refuse them.
LARGE_LOADING = ("large_dtype", "large_device_map", "large_quantization")

# One line per option for `llm-modules train --help` (the CLI appends the default).
HELP: dict[str, str] = {
    "large": "frozen large model spec: a built-in name, a folder, a .gguf file, config:NAME or a hub id",
    "small": "small trainable model spec (same forms as --large)",
    "data": "data spec: a .jsonl/.json file, reasoning-gym:TASK?size=N&seed=S, or a hub data set",
    "output": "run folder: checkpoints/, best/, last/, metrics and summary are written here",
    "method": "what trains: composed (ours), finetune (the small model), lora (on the large model), distill, or "
              "drafter (the composed model trained to draft the large model's next tokens for speculative decoding)",
    "causal": "cross-attention reads only past large-model states; --no-causal reproduces the paper's leak",
    "head": "how the small model's output becomes logits over the large vocabulary (--method drafter: projected)",
    "bridge": "how the large model's states reach the small one: eca (the paper's; the default), ladder (the "
              "default of --method drafter) or xattn",
    "small_inputs": "what the small model reads: the bridge output only (the paper), or its own embeddings "
                    "through a map of the large vocabulary (mapped; the default of --method drafter)",
    "train_embeddings": "with --small-inputs mapped: train the small model's token embeddings too",
    "train_small": "composed: train the small model's own weights; --no-train-small freezes them (CALM's setting), "
                   "so only the bridge, the head and any --train-embeddings train",
    "small_layers": "keep only the small model's first N decoder layers (a cheaper drafter or decoder); default: all",
    "large_reads": "which large-model states the small side reads: all (its own position's and every earlier one) or "
                   "prompt (the prompt's only: generation then runs the large model once per prompt; needs "
                   "--small-inputs mapped and --head projected or new)",
    "large_layers": "ladder and xattn: large hidden states to tap, e.g. 3,7,11 (empty: every 4th, ending at the last)",
    "small_stride": "xattn: a cross-attention block after every N-th small layer",
    "gate_temperature": "ladder and xattn: T of the tanh(alpha / T) gates; smaller opens them faster (LST: 0.1)",
    "num_layers": "Enhanced Cross-Attention layers in the bridge",
    "num_heads": "attention heads per bridge layer (must divide the small model's width)",
    "adapter_dim": "bottleneck width of each bridge layer's adapter",
    "dropout": "dropout in the bridge's cross-attention",
    "template": "how a record becomes text: stratos (the paper's layout) or the tokenizer's chat template",
    "loss_on": "which tokens carry the loss: the assistant's answer only, or every token",
    "max_length": "longest example in large-model tokens",
    "overflow": "what happens to an example over --max-length: dropped or truncated",
    "val_fraction": "fraction of the examples held out for validation, fixed by --data-seed",
    "subset": "fraction of the records used at all (the paper: 0.3)",
    "lora_rank": "LoRA rank of --method lora (alpha = 2 x rank, every linear layer)",
    "distill_temperature": "softmax temperature of --method distill's KL to the large model",
    "draft_tokens": "--method drafter: K, the tokens drafted per verify step; training shows the drafter the large "
                    "states up to the token before each block of K, as it has them while drafting",
    "draft_vocab": "--method drafter: draft from the N most frequent answer tokens of the training data only (EAGLE-3's "
                   "smaller draft vocabulary; the head and the loss then cost N rows, not the whole vocabulary, "
                   "and the target still emits any token); 0: the whole vocabulary",
    "drafter_loss": "--method drafter: kl (to the large model's next-token distribution) or ce (on its arg-max)",
    "drafter_targets": "--method drafter: logits (the large model's own, on the training text) or generated (train "
                       "on the large model's greedy answers to the training prompts, generated once and cached)",
    "epochs": "passes over the training examples (ignored when --max-steps > 0)",
    "max_steps": "optimizer steps; > 0 overrides --epochs",
    "batch_size": "examples per process per micro-step",
    "grad_accum": "micro-steps accumulated into one optimizer step",
    "lr_bridge": "AdamW learning rate of the bridge (composed) or the new embeddings (distill); default: the "
                 "method's measured one (composed 6e-4, distill 1e-4), or the paper's 1e-4 with --paper-lrs",
    "lr_small": "AdamW learning rate of what else trains (the small model and head; the LoRA adapters); default: the "
                "method's measured one (composed 3e-4, finetune 1e-4, lora 3e-4, distill 5e-5), or the paper's 5e-5 "
                "with --paper-lrs",
    "paper_lrs": "default learning rates from the paper (5e-5 small side, 1e-4 bridge) instead of those our "
                 "equal-time reports picked per method",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of the steps with a linear warm-up before the cosine decay",
    "max_grad_norm": "gradient clipping norm; 0 turns clipping off",
    "mixed_precision": "autocast precision; auto: bf16 on a GPU that has it, else fp16 on GPU, else no",
    "gradient_checkpointing": "recompute the small model's activations in the backward pass to save memory",
    "seed": "seed of initialisation, dropout and batch order",
    "data_seed": "seed of the validation split and subset (fixed while --seed varies)",
    "state_cache": "compute the frozen large model's states once and keep them on disk",
    "state_cache_dtype": "storage precision of cached large-model states",
    "state_cache_dir": "folder of the state cache (empty: <LLM_MODULES_CACHE>/states)",
    "large_dtype": "precision the frozen large model runs in (and its cached states are computed in)",
    "large_device_map": "auto: spread the frozen large model over this process's GPUs, then the CPU, while loading "
                        "(accelerate big-model loading); none: load it whole on this process's device",
    "large_quantization": "load the frozen large model in 8 or 4 bits through bitsandbytes (a CUDA GPU)",
    "fsdp": "shard the trained parts over the processes with FSDP (GPUs) instead of replicating them (DDP)",
    "release_large": "with cached states, free the large weights training never reads (reloaded for samples)",
    "eval_every": "steps between validations; 0: once per epoch",
    "early_stopping_patience": "validations without improvement before stopping; 0: never stop early",
    "save_every": "steps between checkpoints; 0: only at the end",
    "keep_checkpoints": "newest checkpoints kept on disk",
    "num_samples": "held-out examples answered at the end of training (in summary.json)",
    "max_new_tokens": "longest answer generated for those samples",
    "resume": "continue the run in --output from its newest checkpoint",
    "progress": "show progress bars",
}


def _where(err: Exception) -> str:
    """A YAML or JSON parse error in one line: line, column and the problem."""
    mark = getattr(err, "problem_mark", None)  # yaml's MarkedYAMLError
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(err, 'problem', None) or err}"
    if isinstance(err, json.JSONDecodeError):
        return f"line {err.lineno}, column {err.colno}: {err.msg}"
    return " ".join(str(err).split())


# every bridge's option names; the TrainConfig fields among them are checked against --bridge
_BRIDGE_OPTIONS = {name for bridge in BRIDGES for name in option_names(bridge)}
# ComposeConfig's own options (not the model specs nor the version it stamps)
_COMPOSE_OPTIONS = {f.name for f in dataclasses.fields(ComposeConfig)} - {"large", "small", "library_version"}


@dataclass
class TrainConfig:
    """A training run: models, data, optimisation, checkpoints. Defaults are the paper's where it has one.

    `method` picks what trains (see `objectives.py`), every method through the same loop:
    "composed" (ours: bridge + small model + head over the frozen large model), "finetune" (the
    small model alone, every weight), "lora" (LoRA adapters on the large model), "distill" (a
    large-vocabulary student built from the small model, trained by KL to the large model).
    Learning rates: `lr_bridge` for the bridge (composed) or the student's new embeddings
    (distill); `lr_small` for everything else that trains. Unset, they are the method's measured
    defaults (`LEARNING_RATES`), or the paper's with `paper_lrs`; the saved config holds the values used.
    """

    large: str = ""
    small: str = ""
    data: str = ""
    output: str = ""
    method: str = "composed"
    # composition: the defaults are ComposeConfig's and the bridges' option classes', declared once there
    causal: bool = ComposeConfig.causal
    head: str | None = None  # None: the method's default (METHOD_DEFAULTS)
    bridge: str | None = None  # None: the method's default
    small_inputs: str | None = None  # None: the method's default
    train_embeddings: bool = ComposeConfig.train_embeddings
    train_small: bool = ComposeConfig.train_small
    small_layers: int | None = ComposeConfig.small_layers
    large_reads: str = ComposeConfig.large_reads
    # bridge options (each passed only to the bridges that have it): eca
    num_layers: int = EcaOptions.num_layers
    num_heads: int = EcaOptions.num_heads  # eca and xattn
    adapter_dim: int = EcaOptions.adapter_dim
    dropout: float = EcaOptions.dropout
    # ladder and xattn: large hidden states to tap, "3,7,11" (empty: every 4th, ending at the last)
    large_layers: str = ""
    small_stride: int = XattnOptions.small_stride  # xattn: a block after every N-th small layer
    gate_temperature: float = XattnOptions.gate_temperature  # ladder and xattn
    # data: the defaults are DataConfig's, declared once there
    template: str = DataConfig.template
    loss_on: str = DataConfig.loss_on
    max_length: int = DataConfig.max_length
    overflow: str = DataConfig.overflow
    val_fraction: float = DataConfig.val_fraction
    subset: float = DataConfig.subset
    lora_rank: int = 8  # method lora (alpha = 2 x rank, every linear layer)
    distill_temperature: float = 1.0  # method distill
    draft_tokens: int = 4  # method drafter: K
    drafter_loss: str = "kl"
    drafter_targets: str = "logits"
    draft_vocab: int = 0  # method drafter: N most frequent answer tokens (0: the whole vocabulary)
    # optimisation (paper: AdamW, lr 1e-4 bridge, 5e-5 small model and head, clip 1.0, batch 1)
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 1  # per process
    grad_accum: int = 1
    lr_bridge: float | None = None  # None: LEARNING_RATES[method] (or the paper's with paper_lrs)
    lr_small: float | None = None
    paper_lrs: bool = False
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp16 on GPU, else no
    gradient_checkpointing: bool = False
    seed: int = 0  # initialisation, dropout and batch order
    data_seed: int = 0  # the validation split and subset: fixed while `seed` varies, so seeds see the same data
    # large-model states
    state_cache: bool = True
    state_cache_dtype: str = "float32"
    state_cache_dir: str = ""  # default: <cache_dir()>/states
    # the frozen large model: precision, placement while loading, quantization (large.load_options)
    large_dtype: str = "float32"
    large_device_map: str = "none"
    large_quantization: str = "none"
    fsdp: bool = False  # the trained parts sharded (FSDP) instead of replicated (DDP) over the processes
    # with cached states, free the large model's weights training never reads (its body; its output
    # embedding too under the `new` head) and reload it from its spec for the end-of-training samples
    release_large: bool = True
    # evaluation, checkpoints, logging
    eval_every: int = 0  # steps; 0: once per epoch
    early_stopping_patience: int = 5  # evaluations without improvement; 0: never stop early
    save_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    num_samples: int = 3
    max_new_tokens: int = 256
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name, value in METHOD_DEFAULTS.get(self.method, METHOD_DEFAULTS["composed"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        positive = ["num_layers", "num_heads", "adapter_dim", "small_stride", "max_length", "batch_size", "grad_accum",
                    "keep_checkpoints", "lora_rank", "draft_tokens"]
        non_negative = ["epochs", "max_steps", "eval_every", "save_every", "early_stopping_patience", "num_samples",
                        "max_new_tokens", "draft_vocab"]
        for name in positive + non_negative:
            value = getattr(self, name)
            low = 1 if name in positive else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LLMModulesError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.epochs == 0 and self.max_steps == 0:
            raise LLMModulesError("give --epochs N or --max-steps N (both are 0)")
        for name, default in zip(("lr_small", "lr_bridge"), self.default_learning_rates()):
            if getattr(self, name) is None:
                setattr(self, name, default)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise LLMModulesError(f"--{name.replace('_', '-')} must be > 0, got {value!r}")
        for name in ("distill_temperature", "gate_temperature"):
            if not getattr(self, name) > 0:
                raise LLMModulesError(f"--{name.replace('_', '-')} must be > 0")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise LLMModulesError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                      f"got {getattr(self, name)!r}")
        if self.method in ("lora", "finetune"):
            for name in self._changed(LARGE_LOADING):
                raise LLMModulesError(f"--{name.replace('_', '-')} sets how the FROZEN large model loads (methods "
                                      f"composed and distill); --method {self.method} has none")
        if self.method not in COMPOSING:
            for name in self._changed(sorted((_COMPOSE_OPTIONS | _BRIDGE_OPTIONS) & set(self.fields()))):
                raise LLMModulesError(f"--{name.replace('_', '-')} shapes the composed model (--method composed); "
                                      f"--method {self.method} has no bridge, head or composition to apply it to")
        if self.large_reads == "prompt" and self.loss_on == "all":
            raise LLMModulesError("--large-reads prompt reads the states before each example's first labelled token; "
                                  "with --loss-on all every token is labelled, so there is no prompt to read")
        if self.method != "drafter":
            for name in self._changed(DRAFTER_OPTIONS):
                raise LLMModulesError(f"--{name.replace('_', '-')} is an option of --method drafter, not of "
                                      f"--method {self.method}")
        else:
            self._check_drafter()
        if self.fsdp and self.method == "lora":
            raise LLMModulesError("--fsdp with --method lora fails inside FSDP's state-dict gathering (seen on a GPU "
                                  "with torch 2.11: the large model's frozen embeddings go missing); train LoRA under "
                                  "DDP (leave out --fsdp): its trained adapters are small")
        needed = {"finetune": ("small",), "lora": ("large",)}.get(self.method, ("large", "small"))
        for name in (*needed, "data", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise LLMModulesError(f"--{name} is required" + (f" by --method {self.method}" if name in needed else ""))
        mine = set(option_names(self.bridge))
        for name in self._changed(sorted((_BRIDGE_OPTIONS & set(self.fields())) - mine)):
            owners = [b for b in BRIDGES if name in option_names(b)]
            raise LLMModulesError(f"--{name.replace('_', '-')} is an option of the {' and '.join(owners)} "
                                  f"bridge, not of --bridge {self.bridge}")
        self._large_layers()  # a parse error surfaces now, not after the models loaded
        if self.method in COMPOSING:
            ComposeConfig.from_options(self.large, self.small, **self.compose_options())

    def default_learning_rates(self) -> tuple[float, float]:
        """(lr_small, lr_bridge) of this method when not given: measured, or the paper's with paper_lrs."""
        if self.paper_lrs or self.method not in LEARNING_RATES:
            return PAPER_LEARNING_RATES
        small, bridge = LEARNING_RATES[self.method]
        return small, PAPER_LEARNING_RATES[1] if bridge is None else bridge

    def _check_drafter(self) -> None:
        if self.head == "residual":
            raise LLMModulesError("--head residual cannot draft: it adds the large model's logits at the very position "
                                  "it predicts, which a drafter does not have yet; use --head projected (the drafter's "
                                  "default) or new")
        if not self.state_cache:
            raise LLMModulesError("--method drafter trains from the state cache (its targets are the large model's "
                                  "cached final states through its head); leave out --no-state-cache")

    def _default(self, name: str) -> Any:
        """An option's default for this run's method."""
        defaults = METHOD_DEFAULTS.get(self.method, METHOD_DEFAULTS["composed"])
        return defaults[name] if name in defaults else self.fields()[name].default

    def _changed(self, names: Any) -> list[str]:
        """Those of `names` whose value differs from the option's default, in order."""
        return [name for name in names if getattr(self, name) != self._default(name)]

    def trained_model(self) -> str:
        """The spec a plain method trains: the small model (finetune) or the large one (lora)."""
        return self.small if self.method == "finetune" else self.large

    def _large_layers(self) -> list[int] | None:
        value = self.large_layers
        if isinstance(value, (list, tuple)):  # from a config file
            return list(value)
        try:
            return [int(x) for x in value.split(",")] if value.strip() else None
        except ValueError:
            raise LLMModulesError(f"--large-layers must be comma-separated integers like 3,7,11, got {value!r}") from None

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Read a YAML or JSON config file; `overrides` (from the command line) win."""
        path = Path(path)
        if not path.is_file():
            raise LLMModulesError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as err:  # yaml and json raise different types
            raise LLMModulesError(f"config file {path} cannot be parsed: {_where(err)}") from None
        if not isinstance(data, dict):
            raise LLMModulesError(f"config file {path} must hold a mapping of options")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - set(cls.fields()))
        if unknown:
            raise LLMModulesError(f"config file {path}: unknown options {unknown}")
        return cls(**{**data, **(overrides or {})})

    def data_config(self) -> DataConfig:
        """The data options of this run (the split and subset follow `data_seed`, not `seed`)."""
        return DataConfig(spec=self.data, template=self.template, loss_on=self.loss_on, max_length=self.max_length,
                          overflow=self.overflow, val_fraction=self.val_fraction, seed=self.data_seed,
                          subset=self.subset)

    def compose_options(self) -> dict[str, Any]:
        """The composition and bridge options of this run, as `LLMModulesModel.compose` takes them:
        ComposeConfig's fields, and only the chosen bridge's own options."""
        names = (_COMPOSE_OPTIONS | set(option_names(self.bridge))) & set(self.fields())
        options = {name: getattr(self, name) for name in names}
        if "large_layers" in options:
            options["large_layers"] = self._large_layers()
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Options (other than resume-free ones) whose value differs from a saved run's."""
        mine, fields = self.to_dict(), self.fields()
        # an option the saved run predates had its default then (the gates before they had a temperature: 1)
        then = {k: self._default(k) for k in fields}  # per method where the default depends on it
        if other.get("bridge") in GATED_BRIDGES:
            then["gate_temperature"] = 1.0
        saved = {k: other.get(k, then[k]) if k in fields else other.get(k) for k in set(mine) | set(other)}
        return sorted(k for k in saved if k not in RESUME_FREE and mine.get(k) != saved[k])
