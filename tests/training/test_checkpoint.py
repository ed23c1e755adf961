"""Checkpoints: a kill at any point of re-saving a step leaves the newest complete checkpoint loadable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_modules import LLMModulesModel
from llm_modules.models.config import WEIGHTS_FILE
from llm_modules.training import checkpoint as ckpt


@pytest.fixture
def model(tiny_models):
    torch.manual_seed(0)
    return LLMModulesModel.compose(large=tiny_models["qwen2"], small=tiny_models["llama"])


def save(directory: Path, model, optimizer, step: int, marker: float) -> Path:
    tmp = ckpt.temporary_folder(directory, step)
    meta = ckpt.write_weights_and_optimizer(tmp, model, optimizer)
    ckpt.write_rng(tmp, 0)
    return ckpt.finish_checkpoint(tmp, step, {"optimizer": meta, "marker": marker}, keep=2)


def set_bias(model, value: float) -> None:
    with torch.no_grad():
        model.bridge.pre_proj.bias.fill_(value)


def killing_rmtree(real):
    """rmtree that dies after deleting one file of a checkpoint folder (a SIGKILL mid-delete)."""
    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.is_dir() and (path / WEIGHTS_FILE).is_file() and ".tmp-" not in path.name:
            (path / WEIGHTS_FILE).unlink()
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)
    return rmtree


def killing_promotion(real):
    """os.replace that dies when the new checkpoint folder is about to be renamed into place."""
    def replace(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt
        return real(src, dst)
    return replace


@pytest.mark.parametrize("kill", ["mid_delete", "mid_swap"])
def test_kill_while_resaving_a_step_leaves_a_loadable_checkpoint(tmp_path, model, monkeypatch, kill):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    set_bias(model, 1.0)
    save(tmp_path, model, optimizer, 2, marker=1.0)
    set_bias(model, 2.0)
    save(tmp_path, model, optimizer, 4, marker=2.0)
    set_bias(model, 3.0)  # step 4 saved again (a resumed run that ends on a checkpoint step)
    if kill == "mid_delete":
        monkeypatch.setattr(ckpt.shutil, "rmtree", killing_rmtree(shutil.rmtree))
    else:
        monkeypatch.setattr(ckpt.os, "replace", killing_promotion(ckpt.os.replace))
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, model, optimizer, 4, marker=3.0)
    monkeypatch.undo()

    newest = ckpt.recover_checkpoints(tmp_path)[-1]  # what a resume does first
    set_bias(model, 0.0)
    state = ckpt.load_checkpoint(newest, model, optimizer)
    # Either the old or the new step-4 checkpoint, whole: weights and state of one and the same save.
    assert state["step"] == 4 and state["marker"] in (2.0, 3.0)
    assert torch.all(model.bridge.pre_proj.bias == state["marker"])
    assert torch.all(load_file(str(newest / WEIGHTS_FILE))["bridge.pre_proj.bias"] == state["marker"])
    # The run goes on: the next save at the same step works and cleans up what the kill left.
    save(tmp_path, model, optimizer, 4, marker=3.0)
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000002", "step-000004"]


def test_listing_while_a_run_writes_never_moves_its_folder(tmp_path, model, monkeypatch):
    """A watcher lists checkpoints at the worst moment: the writer's temporary folder is complete
    (state file in) but not yet renamed. The listing must not take it; the writer's rename works."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    real = ckpt.os.replace
    seen = []

    def replace(src, dst):
        if Path(src).name.startswith(".tmp-"):
            seen.append([p.name for p in ckpt.complete_checkpoints(tmp_path)])
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    save(tmp_path, model, optimizer, 1, marker=1.0)
    save(tmp_path, model, optimizer, 2, marker=2.0)
    monkeypatch.undo()
    assert seen == [[], ["step-000001"]]  # the listing saw only finished renames
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_recovery_puts_a_complete_first_checkpoint_in_place(tmp_path, model, monkeypatch):
    """Killed between the state file and the rename of the very first checkpoint: a resume finds it."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    monkeypatch.setattr(ckpt.os, "replace", killing_promotion(ckpt.os.replace))
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, model, optimizer, 3, marker=1.0)
    monkeypatch.undo()
    assert ckpt.complete_checkpoints(tmp_path) == []  # read-only: nothing moved yet
    assert [p.name for p in ckpt.recover_checkpoints(tmp_path)] == ["step-000003"]
    assert ckpt.load_checkpoint(tmp_path / "step-000003", model, optimizer)["marker"] == 1.0
