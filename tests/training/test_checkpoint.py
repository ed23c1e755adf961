"""Checkpoints: a kill at any point of re-saving a step leaves the newest complete checkpoint loadable;
one run at a time holds an output folder (its lock), and a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_modules import LLMModulesModel
from llm_modules.errors import LLMModulesError
from llm_modules.models.saved import WEIGHTS_FILE
from llm_modules.states.fence import host_name
from llm_modules.training import checkpoint as ckpt
from llm_modules.training import run_lock


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


# ----------------------------------------------------------------------------- one run per output folder
def holding_process(output: Path) -> subprocess.Popen:
    """Another process that takes `output`'s run lock and holds it until killed."""
    code = ("import sys, time; from llm_modules.training.run_lock import take_run_lock; "
            "lock = take_run_lock(sys.argv[1]); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(output)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_runs_lock_refuses_another_run_and_its_recovery(tmp_path):
    holder = holding_process(tmp_path / "run")
    try:
        with pytest.raises(LLMModulesError) as err:
            run_lock.take_run_lock(tmp_path / "run")
        message = str(err.value)
        assert "\n" not in message and str(tmp_path / "run") in message and f"pid {holder.pid}" in message
        assert f"host {host_name()}" in message
        (tmp_path / "run" / "checkpoints").mkdir()
        with pytest.raises(LLMModulesError, match=f"pid {holder.pid}"):
            ckpt.recover_checkpoints(tmp_path / "run" / "checkpoints")  # it may be writing a checkpoint
        assert ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints") == []  # listing stays read-only
    finally:
        holder.kill()
        holder.wait()
    lock = run_lock.take_run_lock(tmp_path / "run")  # its process is dead: the lock is stale, taken over
    assert json.loads((tmp_path / "run" / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert ckpt.recover_checkpoints(tmp_path / "run" / "checkpoints") == []  # this process holds it
    lock.release()
    assert not (tmp_path / "run" / run_lock.LOCK_FILE).exists()


def write_lock(output: Path, age: float = 0.0, **holder) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    path = output / run_lock.LOCK_FILE
    path.write_text(json.dumps({"host": host_name(), "pid": os.getpid(), "time": time.time(), **holder}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


@pytest.mark.parametrize("holder, age, taken", [
    ({"pid": 2**22 + 12345}, 0, True),  # no such process on this host (beyond the default pid_max)
    ({"started": -1}, 0, True),  # this pid, but a process started at another time: the pid was reused
    ({}, 0, False),  # this very process, alive (a run in another thread, a notebook)
    ({"host": "elsewhere", "pid": 1}, 3600, False),  # another host, touched an hour ago: live
    ({"host": "elsewhere", "pid": 1}, 2 * 24 * 3600, True),  # another host, untouched for two days
])
def test_stale_locks_are_taken_over_live_ones_refused(tmp_path, holder, age, taken):
    path = write_lock(tmp_path, age, **holder)
    if not taken:
        with pytest.raises(LLMModulesError, match="in use by another run"):
            run_lock.take_run_lock(tmp_path)
        assert json.loads(path.read_text())["pid"] == holder.get("pid", os.getpid())
        return
    lock = run_lock.take_run_lock(tmp_path)
    assert lock.held and json.loads(path.read_text())["nonce"] == lock.holder["nonce"]
    lock.release()
    assert not path.exists() and not lock.held


def test_a_held_lock_is_kept_fresh_for_runs_on_other_hosts(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "TOUCH_SECONDS", 0.02)
    lock = run_lock.take_run_lock(tmp_path)
    os.utime(lock.path, (1.0, 1.0))  # as if untouched since 1970: stale to another host, unless touched
    deadline = time.monotonic() + 30
    while lock.path.stat().st_mtime < time.time() - 60:
        assert time.monotonic() < deadline, "the lock was not touched"
        time.sleep(0.02)
    lock.release()


def test_a_half_written_lock_is_waited_for_then_broken(tmp_path):
    path = tmp_path / run_lock.LOCK_FILE
    path.write_text('{"host": ')  # its writer is between create and write, or died there
    with pytest.raises(LLMModulesError, match="being taken by another run"):
        run_lock.take_run_lock(tmp_path)
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    run_lock.take_run_lock(tmp_path).release()
    assert not path.exists()


def test_a_lock_taken_over_is_not_removed_by_its_first_holder(tmp_path):
    first = run_lock.take_run_lock(tmp_path / "run")
    # judged dead by another run (a pid reused, a clock skew) and replaced by its lock
    path = write_lock(tmp_path / "run", pid=os.getpid(), nonce="theirs")
    first.release()
    assert json.loads(path.read_text())["nonce"] == "theirs"


def test_a_refused_run_leaves_no_folder_it_made(tmp_path):
    lock = run_lock.take_run_lock(tmp_path / "new" / "run")
    lock.release()
    assert not (tmp_path / "new" / "run").exists() and (tmp_path / "new").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(LLMModulesError, match="not a folder"):
        run_lock.take_run_lock(tmp_path / "file")
