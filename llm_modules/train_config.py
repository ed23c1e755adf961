"""Everything a training run depends on, as one validated dataclass saved as JSON beside its outputs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bridges import BRIDGES, option_names
from .bridges.eca import EcaOptions
from .bridges.xattn import XattnOptions
from .config import ComposeConfig
from .errors import LLMModulesError

RUN_CONFIG_FILE = "run_config.json"
# Options that may differ between an interrupted run and its resumption.
RESUME_FREE = {"resume", "progress", "release_large"}  # change nothing a run computes

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


# every bridge's option names; the TrainConfig fields among them are checked against --bridge
_BRIDGE_OPTIONS = {name for bridge in BRIDGES for name in option_names(bridge)}


@dataclass
class TrainConfig:
    """A training run: models, data, optimisation, checkpoints. Defaults are the paper's where it has one."""

    large: str
    small: str
    data: str
    output: str
    # composition: the defaults are ComposeConfig's and the bridges' option classes', declared once there
    causal: bool = ComposeConfig.causal
    head: str = ComposeConfig.head
    bridge: str = ComposeConfig.bridge
    small_inputs: str = ComposeConfig.small_inputs
    train_embeddings: bool = ComposeConfig.train_embeddings
    # bridge options (each passed only to the bridges that have it): eca
    num_layers: int = EcaOptions.num_layers
    num_heads: int = EcaOptions.num_heads  # eca and xattn
    adapter_dim: int = EcaOptions.adapter_dim
    dropout: float = EcaOptions.dropout
    # ladder and xattn: large hidden states to tap, "3,7,11" (empty: every 4th, ending at the last)
    large_layers: str = ""
    small_stride: int = XattnOptions.small_stride  # xattn: a block after every N-th small layer
    # data
    template: str = "stratos"
    loss_on: str = "assistant"
    max_length: int = 1024
    overflow: str = "drop"
    val_fraction: float = 0.1
    subset: float = 1.0
    # optimisation (paper: AdamW, lr 1e-4 bridge, 5e-5 small model and head, clip 1.0, batch 1)
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 1  # per process
    grad_accum: int = 1
    lr_bridge: float = 1e-4
    lr_small: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp16 on GPU, else no
    gradient_checkpointing: bool = False
    seed: int = 0
    # large-model states
    state_cache: bool = True
    state_cache_dtype: str = "float32"
    state_cache_dir: str = ""  # default: <cache_dir()>/states
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
        positive = ["num_layers", "num_heads", "adapter_dim", "small_stride", "max_length", "batch_size", "grad_accum", "keep_checkpoints"]
        non_negative = ["epochs", "max_steps", "eval_every", "save_every", "early_stopping_patience", "num_samples",
                        "max_new_tokens"]
        for name in positive + non_negative:
            value = getattr(self, name)
            low = 1 if name in positive else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LLMModulesError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.epochs == 0 and self.max_steps == 0:
            raise LLMModulesError("give --epochs N or --max-steps N (both are 0)")
        for name in ("lr_bridge", "lr_small"):
            if not getattr(self, name) > 0:
                raise LLMModulesError(f"--{name.replace('_', '-')} must be > 0")
        choices = {"mixed_precision": ("auto", "no", "bf16", "fp16"),
                   "state_cache_dtype": ("float32", "float16", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LLMModulesError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
        for name in ("large", "small", "data", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise LLMModulesError(f"--{name} is required")
        if self.bridge not in BRIDGES:
            raise LLMModulesError(f"--bridge must be one of {', '.join(BRIDGES)}, got {self.bridge!r}")
        mine = set(option_names(self.bridge))
        for name in sorted((_BRIDGE_OPTIONS & set(self.fields())) - mine):
            if getattr(self, name) != self.fields()[name].default:
                owners = [b for b in BRIDGES if name in option_names(b)]
                raise LLMModulesError(f"--{name.replace('_', '-')} is an option of the {' and '.join(owners)} "
                                      f"bridge, not of --bridge {self.bridge}")
        self._large_layers()  # a parse error surfaces now, not after the models loaded
        ComposeConfig.from_options(self.large, self.small, **self.compose_options())

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
            raise LLMModulesError(f"config file {path} cannot be parsed: {err}") from None
        if not isinstance(data, dict):
            raise LLMModulesError(f"config file {path} must hold a mapping of options")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - set(cls.fields()))
        if unknown:
            raise LLMModulesError(f"config file {path}: unknown options {unknown}")
        return cls(**{**data, **(overrides or {})})

    def compose_options(self) -> dict[str, Any]:
        """The composition and bridge options of this run, as `LLMModulesModel.compose` takes them:
        ComposeConfig's fields, and only the chosen bridge's own options."""
        names = ({f.name for f in dataclasses.fields(ComposeConfig)} | set(option_names(self.bridge))) & set(self.fields())
        options = {name: getattr(self, name) for name in names - {"large", "small", "library_version"}}
        if "large_layers" in options:
            options["large_layers"] = self._large_layers()
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Options (other than resume-free ones) whose value differs from a saved run's."""
        mine, fields = self.to_dict(), self.fields()
        # an option the saved run predates had its default then
        saved = {k: other.get(k, fields[k].default) if k in fields else other.get(k) for k in set(mine) | set(other)}
        return sorted(k for k in saved if k not in RESUME_FREE and mine.get(k) != saved[k])
