"""The objective interface of the one training loop, and what every objective shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm_modules.tensors import DTYPES


class Objective:
    """A trainable model and its loss, as the training loop sees them."""

    method: str
    module: nn.Module  # what accelerate prepares: every trainable parameter lives in it
    tokenizer: Any
    max_positions: int | None
    # whether the validation loss is the answer text's cross-entropy, so bits per byte mean something
    # (the drafter's is its distance to the large model: no bits per byte)
    loss_is_answer_nll: bool = True

    def param_groups(self, config: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    def written_records(self, config: Any, accelerator: Any) -> list[Any] | None:
        """The data's records when this objective writes them itself (the drafter's `self-prompts:`); None: the
        data spec is loaded as usual."""
        return None

    def attach_data(self, config: Any, data: Any, accelerator: Any) -> None:
        """Called once the data is prepared (the composed model builds its state caches here)."""

    def begin_step(self, step: int) -> None:
        """Called before optimizer step `step` (0-based) trains: an objective whose batches depend on the
        step (the drafter's random offsets) derives them from it, so a resumed run draws the same."""

    def batch_extras(self, split: str, indices: list[int], width: int) -> dict[str, torch.Tensor]:
        """Tensors beside input_ids/attention_mask/labels for examples `indices` of `split`."""
        return {}

    def loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch, summed over its answer positions."""
        raise NotImplementedError

    def eval_loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy of the answer tokens (validation; the same for every method but the drafter)."""
        return self.loss_sum(wrapped, batch)

    def eval_sums(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What validation sums over a batch: "loss" (`eval_loss_sum`), and any other count the objective
        reports (the drafter: "agreement"); each is divided by the answer-token count and logged as val_<name>."""
        return {"loss": self.eval_loss_sum(wrapped, batch)}

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        return {"total": _count(self.module)}

    def run_files(self) -> dict[str, str]:
        """Files this objective keeps in the run folder ({name: text}: the drafter's self-prompts), written by the
        loop once the folder holds this run's config, so a run interrupted before then leaves the folder as it was."""
        return {}

    def summary_extras(self) -> dict[str, Any]:
        """Entries this method adds to the run's summary.json (the drafter: its record)."""
        return {}

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
    from llm_modules.models.large import load_options

    hardware = config.hardware
    placement = load_options(hardware.large_dtype, hardware.large_device_map, hardware.large_quantization, device,
                             processes)
    return {"dtype": DTYPES[hardware.large_dtype], "placement": placement}
