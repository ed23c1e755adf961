"""Everything a training run depends on, validated on construction and saved as JSON beside its outputs.

Options come in groups, as litgpt's `TrainArgs` and `EvalArgs`: the data (`DataConfig`), optimisation and
schedule (`TrainArgs`), evaluation and checkpoints (`EvalArgs`), hardware and precision (`HardwareArgs`) and
the composition (`ComposeArgs`, the composing methods only); each validates itself. Each method's own
options are its class in `objectives.METHODS` (as PEFT registers a tuner, and `bridges.BRIDGES` a bridge).
The command line and config files stay flat, one name per option (`train_options`); `TrainConfig.from_flags`
sorts them into their groups and refuses, in one line, an option of another method or bridge.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_modules.bridges import BRIDGES, bridge_options, option_names
from llm_modules.data.prepare import LOSS_ON, OVERFLOW, TEMPLATES, DataConfig
from llm_modules.devices import best_device, half_where_native
from llm_modules.errors import LLMModulesError
from llm_modules.models.compose_config import (
    GATED_BRIDGES,
    HEAD_KINDS,
    LARGE_READS,
    SMALL_INPUTS,
    ComposeConfig,
)
from llm_modules.models.large import DEVICE_MAPS, QUANTIZATIONS
from llm_modules.tensors import DTYPES
from llm_modules.training.objectives import METHODS, method_classes
from llm_modules.training.objectives.options import (
    MethodOptions,
    check_choices,
    check_ints,
    check_positive,
    flag,
)

# run_config.json's layout: 2 grouped (this file's `TrainConfig.to_dict`); a file without "format_version"
# is flat (every option by its command-line name), as runs before the grouping saved it, and as config files are.
FORMAT_VERSION = 2

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
    "method": tuple(METHODS), "head": HEAD_KINDS, "bridge": tuple(BRIDGES), "small_inputs": SMALL_INPUTS,
    "large_reads": LARGE_READS,
    "template": TEMPLATES, "loss_on": LOSS_ON, "overflow": OVERFLOW,
    "mixed_precision": ("auto", "no", "bf16", "fp16"), "state_cache_dtype": tuple(DTYPES),
    "large_dtype": ("auto", *DTYPES), "large_device_map": DEVICE_MAPS, "large_quantization": QUANTIZATIONS,
    **{name: allowed for options, _ in METHODS.values() for name, allowed in options.choices.items()},
}
# Options of the frozen large model: the methods that have none (finetune, lora: `frozen_large`) refuse them.
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
    "head": "how the small model's output becomes logits: residual, new or projected over the large vocabulary "
            "(--method drafter: projected), or own: the small model's own language head over its own tokenizer "
            "(needs --large-reads prompt and --bridge ladder or xattn; starts as the small model alone)",
    "bridge": "how the large model's states reach the small one: eca (the paper's; the default), ladder (the "
              "default of --method drafter) or xattn",
    "small_inputs": "what the small model reads: the bridge output only (the paper), or its own embeddings "
                    "through a map of the large vocabulary (mapped; the default of --method drafter); --head own sets own (its own "
                    "tokens)",
    "train_embeddings": "with --small-inputs mapped: train the small model's token embeddings too",
    "train_small": "composed: train the small model's own weights; --no-train-small freezes them (CALM's setting), "
                   "so only the bridge, the head and any --train-embeddings train",
    "small_layers": "keep only the small model's first N decoder layers (a cheaper drafter or decoder); 0 or default: all",
    "large_reads": "which large-model states the small side reads: all (its own position's and every earlier one) or "
                   "prompt (the prompt's only: generation then runs the large model once per prompt; needs "
                   "--small-inputs mapped and --head projected or new, or --head own)",
    "large_layers": "ladder and xattn: large hidden states to tap, e.g. 3,7,11 (empty: every 4th, ending at the last)",
    "small_stride": "xattn: a cross-attention block after every N-th small layer",
    "gate_temperature": "ladder and xattn: T of the tanh(alpha / T) gates; smaller opens them faster (LST: 0.1)",
    "num_layers": "Enhanced Cross-Attention layers in the bridge",
    "num_heads": "attention heads per bridge layer (must divide the small model's width)",
    "adapter_dim": "bottleneck width of each bridge layer's adapter",
    "dropout": "dropout in the bridge's cross-attention",
    "template": "how a record becomes text: stratos (the paper's layout) or the tokenizer's chat template",
    "loss_on": "which tokens carry the loss: the assistant's answer only, or every token",
    "max_length": "longest example in large-model tokens (small-model tokens with --head own)",
    "overflow": "what happens to an example over --max-length: dropped or truncated",
    "val_fraction": "fraction of the examples held out for validation, fixed by --data-seed",
    "subset": "fraction of the records used at all (the paper: 0.3)",
    "lora_rank": "LoRA rank of --method lora (alpha = 2 x rank, every linear layer)",
    "distill_temperature": "softmax temperature of --method distill's KL to the large model",
    "distill_init": "--method distill's student embeddings over the large vocabulary: mapped (each large token's row "
                    "the mean of the small model's embeddings of its text's small-tokenizer pieces) or random",
    "draft_tokens": "--method drafter: K, the tokens drafted per verify step; training shows the drafter the large "
                    "states up to the token before each block of K, as it has them while drafting",
    "draft_vocab": "--method drafter: draft from the N most frequent answer tokens of the training data only (EAGLE-3's "
                   "smaller draft vocabulary; the head and the loss then cost N rows, not the whole vocabulary, "
                   "and the target still emits any token); 0: the whole vocabulary",
    "drafter_layout": "--method drafter: composed (a bridge, a small model and a head) or eagle3 (one EAGLE-3 draft "
                      "layer over the target's layers 2, L/2 and L-3, trained by EAGLE-3's training-time test; "
                      "`export --format eagle3` writes it for vLLM and SGLang; --small and the bridge are ignored)",
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
    "large_dtype": "precision the frozen large model runs in (and its cached states are computed in); auto: "
                   "bfloat16 where the device computes in it natively (a CUDA GPU that has it, a CPU with AVX512-BF16, "
                   "AMX or Arm BF16 instructions), else float32",
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


@dataclass
class TrainArgs:
    """Optimisation and schedule (the paper: AdamW, lr 1e-4 bridge, 5e-5 small model and head, clip 1.0, batch 1).

    `lr_bridge` trains the bridge (composed) or the student's new embeddings (distill), `lr_small` everything
    else that trains. None: the method's measured default (`LEARNING_RATES`), or the paper's with `paper_lrs`,
    filled in by `TrainConfig`, so the saved config holds the values used.
    """

    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 1  # per process
    grad_accum: int = 1
    lr_bridge: float | None = None
    lr_small: float | None = None
    paper_lrs: bool = False
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0  # initialisation, dropout and batch order (the data's split follows data_seed)

    def __post_init__(self) -> None:
        check_ints(self, positive=("batch_size", "grad_accum"), non_negative=("epochs", "max_steps"))
        if self.epochs == 0 and self.max_steps == 0:
            raise LLMModulesError("give --epochs N or --max-steps N (both are 0)")
        check_positive(self, *(name for name in ("lr_small", "lr_bridge") if getattr(self, name) is not None))


@dataclass
class EvalArgs:
    """Evaluation, checkpoints and logging."""

    eval_every: int = 0  # steps; 0: once per epoch
    early_stopping_patience: int = 5  # evaluations without improvement; 0: never stop early
    save_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    num_samples: int = 3  # held-out examples answered at the end
    max_new_tokens: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        check_ints(self, positive=("keep_checkpoints",),
                   non_negative=("eval_every", "save_every", "early_stopping_patience", "num_samples",
                                 "max_new_tokens"))


@dataclass
class HardwareArgs:
    """Precision, memory and placement; how the frozen large model loads and its states are kept."""

    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp16 on GPU, else no
    gradient_checkpointing: bool = False
    fsdp: bool = False  # the trained parts sharded (FSDP) instead of replicated (DDP) over the processes
    state_cache: bool = True
    state_cache_dtype: str = "float32"
    state_cache_dir: str = ""  # default: <cache_dir()>/states
    # the frozen large model: precision, placement while loading, quantization (large.load_options)
    large_dtype: str = "float32"
    large_device_map: str = "none"
    large_quantization: str = "none"
    # with cached states, free the large model's weights training never reads (its body; its output
    # embedding too under the `new` head) and reload it from its spec for the end-of-training samples
    release_large: bool = True

    def __post_init__(self) -> None:
        check_choices(self, CHOICES)
        if self.large_dtype == "auto":  # resolved here, so the run's files and its state cache name a real one
            self.large_dtype = half_where_native(best_device())


@dataclass
class ComposeArgs:
    """How a composing method puts the models together: ComposeConfig's options (its defaults, declared once
    there) and the chosen bridge's own options dataclass (`bridges.BRIDGES`)."""

    causal: bool = ComposeConfig.causal
    head: str = ComposeConfig.head
    bridge: str = ComposeConfig.bridge
    small_inputs: str = ComposeConfig.small_inputs
    train_embeddings: bool = ComposeConfig.train_embeddings
    train_small: bool = ComposeConfig.train_small
    small_layers: int | None = ComposeConfig.small_layers
    large_reads: str = ComposeConfig.large_reads
    bridge_options: Any = None  # the bridge's options dataclass; a dict (from JSON) or None (its defaults) becomes one

    def __post_init__(self) -> None:
        check_choices(self, CHOICES)
        if self.small_layers == 0 and not isinstance(self.small_layers, bool):  # --small-layers 0: all of them
            self.small_layers = None
        if self.bridge_options is None or isinstance(self.bridge_options, dict):
            self.bridge_options = bridge_options(self.bridge, self.bridge_options or {})
        elif not isinstance(self.bridge_options, BRIDGES[self.bridge][0]):
            raise LLMModulesError(f"{type(self.bridge_options).__name__} are not the options of --bridge {self.bridge}")
        # the command line's bounds, stricter than the bridges' own (an eca bridge of 0 layers)
        check_ints(self.bridge_options, positive=tuple(name for name in ("num_layers", "num_heads", "adapter_dim",
                                                                         "small_stride")
                                                       if hasattr(self.bridge_options, name)))

    def options(self) -> dict[str, Any]:
        """Flat, as `LLMModulesModel.compose` and `ComposeConfig.from_options` take them: the composition
        options and the bridge's own."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "bridge_options"}
        return {**own, **dataclasses.asdict(self.bridge_options)}


@dataclass
class TrainConfig:
    """A training run: the models, what trains (`method`), the option groups, where it writes.

    Defaults are the paper's where it has one. `method` picks what trains (see `objectives`), every method
    through the same loop: "composed" (ours: bridge + small model + head over the frozen large model),
    "finetune" (the small model alone, every weight), "lora" (LoRA adapters on the large model), "distill" (a
    large-vocabulary student built from the small model, trained by KL to the large model), "drafter" (the
    composed model trained to draft the large model's next tokens). `method_options` holds that method's own
    options (its class in `objectives.METHODS`); `compose` the composition, for the methods that compose.
    From command-line names: `from_flags`; from a config file or a saved run_config.json: `from_file`.
    """

    large: str = ""
    small: str = ""
    output: str = ""
    method: str = "composed"
    data: DataConfig | None = None  # required; the split and subset follow its seed (--data-seed), not train.seed
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    hardware: HardwareArgs = field(default_factory=HardwareArgs)
    compose: ComposeArgs | None = None  # None: the method's defaults (a composing method); the others have none
    method_options: MethodOptions | None = None  # None: the method's defaults
    resume: bool = False

    def __post_init__(self) -> None:
        options_class = method_classes(self.method)[0]
        if self.method_options is None:
            self.method_options = options_class()
        if type(self.method_options) is not options_class:
            raise LLMModulesError(f"{type(self.method_options).__name__} are not the options of --method {self.method}")
        if options_class.composes and self.compose is None:
            self.compose = ComposeArgs(**options_class.compose_defaults)
        if not options_class.composes and self.compose is not None:
            raise LLMModulesError(f"--method {self.method} has no bridge, head or composition to apply composition "
                                  "options to")
        if not options_class.frozen_large:
            for name in LARGE_LOADING:
                if getattr(self.hardware, name) != getattr(HardwareArgs, name):
                    readers = " and ".join(m for m, (o, _) in METHODS.items() if o.frozen_large)
                    raise LLMModulesError(f"{flag(name)} sets how the FROZEN large model loads (methods {readers}); "
                                          f"--method {self.method} has none")
        small, bridge = self.default_learning_rates()
        given = self.train
        self.train = dataclasses.replace(given, lr_small=small if given.lr_small is None else given.lr_small,
                                         lr_bridge=bridge if given.lr_bridge is None else given.lr_bridge)
        if self.compose is not None and self.compose.large_reads == "prompt" and self.data is not None \
                and self.data.loss_on == "all":
            raise LLMModulesError("--large-reads prompt reads the states before each example's first labelled token; "
                                  "with --loss-on all every token is labelled, so there is no prompt to read")
        self.method_options.check_run(self)
        for name in (*options_class.specs, "data", "output"):
            value = getattr(self, name)
            if not (isinstance(value, DataConfig) if name == "data" else isinstance(value, str) and value):
                raise LLMModulesError(f"--{name} is required" + (f" by --method {self.method}"
                                                                 if name in options_class.specs else ""))
        if self.compose is not None:
            ComposeConfig.from_options(self.large, self.small, **self.compose.options())

    def default_learning_rates(self) -> tuple[float, float]:
        """(lr_small, lr_bridge) of this method when not given: measured, or the paper's with paper_lrs."""
        if self.train.paper_lrs or self.method not in LEARNING_RATES:
            return PAPER_LEARNING_RATES
        small, bridge = LEARNING_RATES[self.method]
        return small, PAPER_LEARNING_RATES[1] if bridge is None else bridge

    @classmethod
    def from_flags(cls, **options: Any) -> TrainConfig:
        """A run from options by their command-line names (`train_options`), as the command line and config files
        give them and as runs saved their run_config.json before the grouping. An option of another method or
        bridge, or a composition option under a method that composes nothing, is refused in one line naming it
        and the method, unless it holds its default (those older files hold every option)."""
        table = train_options()
        unknown = sorted(set(options) - set(table))
        if unknown:
            raise LLMModulesError(f"unknown options {unknown}")
        method = options.get("method", cls.method)
        options_class = method_classes(method)[0]
        # the method's recipe where nothing is given (a null given, as saved files hold, stays given)
        options = {**options_class.run_defaults, **options}
        # None: the method's default, for the composition options whose default is per method
        options = {k: v for k, v in options.items() if not (v is None and k in _PER_METHOD)}
        if "large_layers" in options:
            options["large_layers"] = parse_large_layers(options["large_layers"])
        bridge = options.get("bridge", options_class.compose_defaults.get("bridge", ComposeArgs.bridge))
        bridge_names = set(option_names(bridge)) if bridge in BRIDGES else set(table)
        for name, value in options.items():
            home = table[name][0]
            if value == option_default(name, method) or home not in ("method", "compose", "bridge"):
                continue
            if home == "method" and name not in options_class.names():
                owners = [m for m, (o, _) in METHODS.items() if name in o.names()]
                raise LLMModulesError(f"{flag(name)} is an option of --method {' and --method '.join(owners)}, not of "
                                      f"--method {method}")
            if home != "method" and not options_class.composes:
                raise LLMModulesError(f"{flag(name)} shapes the composed model (--method composed); --method {method} "
                                      "has no bridge, head or composition to apply it to")
            if home == "bridge" and name not in bridge_names:
                owners = [b for b in BRIDGES if name in option_names(b)]
                raise LLMModulesError(f"{flag(name)} is an option of the {' and '.join(owners)} bridge, not of "
                                      f"--bridge {bridge}")

        def group(home: str) -> dict[str, Any]:
            return {table[name][1].name: value for name, value in options.items() if table[name][0] == home}

        compose = None
        if options_class.composes:
            own = {k: v for k, v in group("bridge").items() if k in bridge_names}
            compose = ComposeArgs(**{**options_class.compose_defaults, **group("compose"), "bridge_options": own})
        data = group("data")
        mine = {k: v for k, v in group("method").items() if k in options_class.names()}
        return cls(**group(""), data=DataConfig(**data) if data.get("spec") else None,
                   train=TrainArgs(**group("train")), eval=EvalArgs(**group("eval")),
                   hardware=HardwareArgs(**group("hardware")), compose=compose, method_options=options_class(**mine))

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainConfig:
        """A run from a saved run_config.json's object: grouped (`to_dict`), or flat (by command-line names)."""
        if "format_version" not in saved:
            return cls.from_flags(**saved)
        if saved["format_version"] != FORMAT_VERSION:
            raise LLMModulesError(f"run config format_version {saved['format_version']!r} is not one this version "
                                  f"reads ({FORMAT_VERSION}: grouped; none: flat)")
        unknown = sorted(set(saved) - {*_TOP, *_GROUPS, "compose", "method_options", "format_version"})
        if unknown:
            raise LLMModulesError(f"run config: unknown options {unknown}")
        try:
            groups = {name: kind(**saved[name]) for name, kind in _GROUPS.items() if saved.get(name) is not None}
            compose = ComposeArgs(**saved["compose"]) if saved.get("compose") is not None else None
            options = method_classes(saved.get("method", cls.method))[0](**(saved.get("method_options") or {}))
        except TypeError as err:  # an option this version does not know
            raise LLMModulesError(f"run config: {err}") from None
        return cls(**{k: saved[k] for k in _TOP if k in saved}, **groups, compose=compose, method_options=options)

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a YAML or JSON config file, or a run's saved run_config.json; `overrides` (from the command
        line, by command-line names) win."""
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
        if "format_version" in data:  # a saved run's grouped options
            saved = cls.from_dict(data)
            return cls.from_flags(**{**saved.as_flags(), **overrides}) if overrides else saved
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - set(train_options()))
        if unknown:
            raise LLMModulesError(f"config file {path}: unknown options {unknown}")
        return cls.from_flags(**{**data, **(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        """The grouped JSON object saved as run_config.json."""
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    def as_flags(self) -> dict[str, Any]:
        """Every option by its command-line name: this run's values, other methods' and bridges' at their defaults."""
        values = {name: option_default(name, self.method) for name in train_options()}
        values.update({name: getattr(self, name) for name in _TOP})
        for home in _GROUPS:
            group = getattr(self, home)
            if group is not None:
                values.update({_flag_name(home, f.name): getattr(group, f.name) for f in dataclasses.fields(group)})
        if self.compose is not None:
            values.update({k: v for k, v in self.compose.options().items() if k in values})
        values.update(dataclasses.asdict(self.method_options))
        return values

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Options (other than resume-free ones) whose value differs from a saved run's (either format)."""
        mine, theirs = self.as_flags(), flat_options(other)
        # an option the saved run predates had its default then (the gates before they had a temperature: 1)
        then = {k: option_default(k, self.method) for k in mine}  # per method where the default depends on it
        if theirs.get("bridge") in GATED_BRIDGES:
            then["gate_temperature"] = 1.0
        saved = {k: theirs.get(k, then[k]) if k in mine else theirs.get(k) for k in set(mine) | set(theirs)}
        if saved.get("large_layers") is not None:
            saved["large_layers"] = parse_large_layers(saved["large_layers"])
        return sorted(k for k in saved if k not in RESUME_FREE and mine.get(k) != saved[k])


_TOP = ("large", "small", "output", "method", "resume")  # TrainConfig's own options; the rest are in groups
_GROUPS: dict[str, type] = {"data": DataConfig, "train": TrainArgs, "eval": EvalArgs, "hardware": HardwareArgs}
_DATA_FLAGS = {"spec": "data", "seed": "data_seed"}  # DataConfig's fields whose command-line names differ
# the bridges' options the command line sets (eca's large_layer is not one)
BRIDGE_FLAGS = ("num_layers", "num_heads", "adapter_dim", "dropout", "large_layers", "small_stride", "gate_temperature")
# composition options whose default is per method (None given: that default)
_PER_METHOD = {name for options, _ in METHODS.values() for name in options.compose_defaults}


def _flag_name(home: str, name: str) -> str:
    return _DATA_FLAGS.get(name, name) if home == "data" else name


def train_options() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every option by its command-line name: (where it lives, its field). Where: "" (TrainConfig itself), a
    group ("data", "train", "eval", "hardware", "compose"), "bridge" (a bridge's options) or "method" (a
    method's); the order is `train --help`'s."""
    top = {f.name: ("", f) for f in dataclasses.fields(TrainConfig) if f.name in _TOP}
    table = {"large": top["large"], "small": top["small"]}
    data = {_flag_name("data", f.name): ("data", f) for f in dataclasses.fields(DataConfig)}
    table["data"] = data.pop("data")
    table.update(output=top["output"], method=top["method"])
    table.update({f.name: ("compose", f) for f in dataclasses.fields(ComposeArgs) if f.name != "bridge_options"})
    for name in BRIDGE_FLAGS:
        owner = next(b for b in BRIDGES if name in option_names(b))
        table[name] = ("bridge", next(f for f in dataclasses.fields(BRIDGES[owner][0]) if f.name == name))
    table.update(data)
    for options, _ in METHODS.values():
        table.update({f.name: ("method", f) for f in dataclasses.fields(options)})
    for home in ("train", "hardware", "eval"):
        table.update({f.name: (home, f) for f in dataclasses.fields(_GROUPS[home])})
    table["resume"] = top["resume"]
    return table


def option_default(name: str, method: str = "composed") -> Any:
    """An option's default under `method`: its recipe's (`run_defaults`), else the composition's per method, else the
    option's own (a method without one: composed's)."""
    home, spec = train_options()[name]
    if method in METHODS and name in METHODS[method][0].run_defaults:
        return METHODS[method][0].run_defaults[name]
    if home == "compose" and method in METHODS:
        return METHODS[method][0].compose_defaults.get(name, spec.default)
    return "" if spec.default is dataclasses.MISSING else spec.default


def parse_large_layers(value: Any) -> list[int] | None:
    """--large-layers "3,7,11" (or a config file's list) as a list; empty: None (the bridge's default taps)."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else list(value)
    try:
        return [int(x) for x in value.split(",")] if value.strip() else None
    except (AttributeError, ValueError):
        raise LLMModulesError(f"--large-layers must be comma-separated integers like 3,7,11, got {value!r}") from None


def flat_options(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run_config.json's options by their command-line names, whichever its format (no validation)."""
    if "format_version" not in saved:
        return dict(saved)
    flat = {k: v for k, v in saved.items() if k in _TOP}
    for home in _GROUPS:
        flat.update({_flag_name(home, k): v for k, v in (saved.get(home) or {}).items()})
    compose = dict(saved.get("compose") or {})
    flat.update({k: v for k, v in (compose.pop("bridge_options", None) or {}).items() if k in BRIDGE_FLAGS})
    flat.update(compose)
    flat.update(saved.get("method_options") or {})
    return flat
