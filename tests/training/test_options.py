"""Training options: groups, one options class per method, and the run_config.json of older runs.

The fixtures tests/fixtures/run_config_v1_*.json were written by the code before the options were
grouped (flat, every option of every method), with LARGE, SMALL, DATA, OUTPUT and STATES standing
for the paths of a run made by `train_args` plus `--save-every 2`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_modules.entrypoints.cli import build_parser, main, train_config_from_args
from llm_modules.errors import LLMModulesError
from llm_modules.training.config import TrainConfig, option_default

from ..helpers import write_data

FIXTURES = Path(__file__).parents[1] / "fixtures"
PLACEHOLDERS = ("LARGE", "SMALL", "DATA", "OUTPUT", "STATES")
FLAGS = ["--template", "stratos", "--batch-size", "2", "--max-length", "512", "--max-steps", "6", "--eval-every", "3",
         "--num-samples", "1", "--max-new-tokens", "4", "--no-progress", "--dropout", "0.1", "--save-every", "2"]
EXTRA = {"composed": [], "lora": ["--method", "lora", "--lora-rank", "4"],
         # the drafter's recipe (DrafterOptions.run_defaults) set back to the defaults the fixtures were saved with
         "drafter": ["--method", "drafter", "--draft-tokens", "3", "--large-layers", "1,2", "--small-layers", "0",
                     "--drafter-targets", "logits", "--draft-vocab", "0", "--large-dtype", "float32",
                     "--val-fraction", "0.1", "--epochs", "1", "--lr-small", "5e-05", "--lr-bridge", "0.0001"]}


def old_run_config(method: str, paths: dict[str, str]) -> dict:
    """The flat run_config.json the code before the grouping saved, its paths replaced by `paths`."""
    saved = json.loads((FIXTURES / f"run_config_v1_{method}.json").read_text())
    for key, value in saved.items():
        if value in paths:
            saved[key] = paths[value]
    return saved


def flags(paths: dict[str, str], *extra: str) -> list[str]:
    return ["train", "--large", paths["LARGE"], "--small", paths["SMALL"], "--data", paths["DATA"],
            "--output", paths["OUTPUT"], "--state-cache-dir", paths["STATES"], *FLAGS, *extra]


def from_flags(argv: list[str]) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(argv))


@pytest.mark.parametrize("method", sorted(EXTRA))
def test_an_old_flat_run_config_loads_as_the_same_run(method, tmp_path):
    paths = {name: name for name in PLACEHOLDERS}
    saved = old_run_config(method, paths)
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    loaded = TrainConfig.from_file(tmp_path / "run_config.json")
    given = from_flags(flags(paths, *EXTRA[method]))
    assert loaded == given
    assert given.differences(saved) == []  # the same run: --resume goes on
    changed = from_flags(flags(paths, *EXTRA[method], "--weight-decay", "0.5"))
    assert changed.differences(saved) == ["weight_decay"]
    resume_free = from_flags(flags(paths, *EXTRA[method], "--resume", "--progress"))
    assert resume_free.differences(saved) == []


def test_a_run_saved_before_the_grouping_resumes(tiny_pair_with_tokenizer, tmp_path, capsys):
    paths = {"LARGE": tiny_pair_with_tokenizer["large"], "SMALL": tiny_pair_with_tokenizer["small"],
             "DATA": write_data(tmp_path / "data.jsonl"), "OUTPUT": str(tmp_path / "run"),
             "STATES": str(tmp_path / "states")}
    assert main(flags(paths, "--max-steps", "2")) == 0
    # the run as the older code left it: its options flat, every method's
    saved = old_run_config("composed", paths)
    saved["max_steps"] = 2
    (tmp_path / "run" / "run_config.json").write_text(json.dumps(saved, indent=1))
    capsys.readouterr()
    assert main(flags(paths, "--max-steps", "2", "--lr-bridge", "0.001", "--resume")) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "lr_bridge" in err
    assert main(flags(paths, "--max-steps", "4", "--resume")) == 2  # max_steps is no resume-free option
    assert main(flags(paths, "--max-steps", "2", "--resume")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2


# options added after the flat layout (format 1) was frozen in the fixtures
ADDED_SINCE_V1 = {"drafter_layout", "distill_init"}


def test_the_command_line_keeps_every_option_of_the_flat_layout():
    """One flag per option as before the grouping: the names the old run_config.json holds, and the ones added
    since (listed), no more, no fewer."""
    from llm_modules.training.config import train_options

    old = set(json.loads((FIXTURES / "run_config_v1_composed.json").read_text()))
    assert set(train_options()) == old | ADDED_SINCE_V1


@pytest.mark.parametrize("method", sorted(EXTRA))
def test_the_saved_run_config_is_grouped_and_loads_back(method, tmp_path):
    from llm_modules.training.config import FORMAT_VERSION

    config = from_flags(flags({name: name for name in PLACEHOLDERS}, *EXTRA[method]))
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["format_version"] == FORMAT_VERSION
    assert saved["train"]["batch_size"] == 2 and saved["data"]["max_length"] == 512 and saved["eval"]["save_every"] == 2
    assert TrainConfig.from_dict(saved) == config
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    assert TrainConfig.from_file(tmp_path / "run_config.json") == config
    assert TrainConfig.from_file(tmp_path / "run_config.json", {"max_steps": 9}).train.max_steps == 9
    assert config.differences(saved) == []
    assert config.differences(json.loads((FIXTURES / f"run_config_v1_{method}.json").read_text())) == []


def test_each_method_has_its_own_options_class():
    from llm_modules.training.objectives import METHODS
    from llm_modules.training.objectives.options import (
        DrafterOptions,
        LoraOptions,
        MethodOptions,
    )

    assert set(METHODS) == {"composed", "finetune", "lora", "distill", "drafter"}
    assert all(issubclass(options, MethodOptions) for options, _ in METHODS.values())
    base = {"large": "l", "small": "s", "data": "d", "output": "o"}
    lora = TrainConfig.from_flags(**base, method="lora", lora_rank=4)
    assert lora.method_options == LoraOptions(lora_rank=4) and lora.compose is None
    drafter = TrainConfig.from_flags(**base, method="drafter", draft_tokens=3)
    assert drafter.method_options == DrafterOptions(draft_tokens=3, drafter_targets="generated", draft_vocab=8192)
    assert drafter.compose.bridge == "ladder"
    assert TrainConfig.from_flags(**base).compose.bridge == "eca"
    with pytest.raises(LLMModulesError, match="^--lora-rank must be an integer >= 1, got 0$"):
        LoraOptions(lora_rank=0)  # a method's options validate themselves
    with pytest.raises(LLMModulesError, match="^--drafter-targets must be one of logits, generated"):
        DrafterOptions(drafter_targets="text")


@pytest.mark.parametrize("method, option, value, owner", [
    ("composed", "lora_rank", 4, "lora"),
    ("drafter", "distill_temperature", 2.0, "distill"),
    ("lora", "draft_tokens", 2, "drafter"),
    ("finetune", "lora_rank", 16, "lora"),
])
def test_an_option_of_another_method_is_one_line_naming_both(method, option, value, owner, tmp_path, capsys):
    base = {"large": "l", "small": "s", "data": "d", "output": "o", "method": method}
    expected = f"--{option.replace('_', '-')} is an option of --method {owner}, not of --method {method}"
    with pytest.raises(LLMModulesError, match=f"^{expected}$"):
        TrainConfig.from_flags(**base, **{option: value})
    # the same from a config file and from the command line
    (tmp_path / "run.yaml").write_text(f"method: {method}\n{option}: {value}\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--large", "l", "--small", "s", "--data", "d",
                 "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {expected}"
    # at its default, as every older run_config.json holds it: accepted
    assert TrainConfig.from_flags(**base, **{option: option_default(option)}).method == method


def test_a_registered_method_brings_its_own_options(monkeypatch):
    from dataclasses import dataclass

    from llm_modules.training import objectives
    from llm_modules.training.objectives.options import MethodOptions, check_ints

    @dataclass
    class EchoOptions(MethodOptions):
        specs = ("small",)
        frozen_large = False
        echo_depth: int = 1

        def __post_init__(self) -> None:
            check_ints(self, positive=("echo_depth",))

    monkeypatch.setattr(objectives, "METHODS", dict(objectives.METHODS))
    monkeypatch.setattr("llm_modules.training.config.METHODS", objectives.METHODS)
    objectives.register_method("echo", EchoOptions, lambda config, device, processes: None)
    with pytest.raises(LLMModulesError, match="registered already"):
        objectives.register_method("echo", EchoOptions, lambda config, device, processes: None)
    config = TrainConfig(small="s", output="o", method="echo", method_options=EchoOptions(echo_depth=3),
                         data=TrainConfig.from_flags(large="l", small="s", data="d", output="o").data)
    assert config.compose is None and config.method_options.echo_depth == 3
    with pytest.raises(LLMModulesError, match="--large is required|--small is required"):
        TrainConfig(method="echo", output="o", data=config.data)
    with pytest.raises(LLMModulesError, match="LoraOptions are not the options of --method echo"):
        from llm_modules.training.objectives.options import LoraOptions

        TrainConfig(small="s", output="o", method="echo", method_options=LoraOptions(), data=config.data)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("k", [65, 100_000_000])
def test_a_draft_length_a_decoder_would_refuse_is_refused_before_training(k):
    """The drafter's K obeys the bound its saved record and `--draft-tokens` obey (1..64), when the options are
    read, not after the models load."""
    from llm_modules.models.drafter import MAX_DRAFT_TOKENS
    from llm_modules.training.objectives.options import DrafterOptions

    with pytest.raises(LLMModulesError, match=f"between 1 and {MAX_DRAFT_TOKENS}"):
        DrafterOptions(draft_tokens=k)
    assert DrafterOptions(draft_tokens=MAX_DRAFT_TOKENS).draft_tokens == MAX_DRAFT_TOKENS


def test_large_dtype_auto_is_bfloat16_only_where_the_cpu_computes_in_it(tmp_path, monkeypatch):
    """--large-dtype auto (the drafter recipe's): bfloat16 on a CPU with bfloat16 matrix instructions, float32 on
    one that would emulate it (9-30x slower than float32 on an AVX2-only CPU here); resolved on construction, so
    the run's files and its state cache name the precision it ran in."""
    from llm_modules import devices
    from llm_modules.training.config import HardwareArgs

    monkeypatch.setattr(devices, "best_device", lambda: torch.device("cpu"))
    monkeypatch.setattr("llm_modules.training.config.best_device", lambda: torch.device("cpu"))
    for flags, expected in (("fpu avx2 fma avx512f avx512_bf16", "bfloat16"), ("fpu avx2 fma amx_bf16", "bfloat16"),
                            ("fp asimd bf16 i8mm", "bfloat16"), ("fpu avx2 fma f16c avx512f", "float32"), ("", "float32")):
        info = tmp_path / "cpuinfo"
        key = "Features" if "asimd" in flags else "flags"
        info.write_text(f"processor\t: 0\nvendor_id\t: X\n{key}\t\t: {flags}\n\nprocessor\t: 1\n{key}\t\t: {flags}\n")
        monkeypatch.setattr(devices, "CPUINFO", info)
        assert HardwareArgs(large_dtype="auto").large_dtype == expected, flags
    info.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu avx2\n")
    assert devices.cpu_model() == "Some CPU 9000" and devices.cpu_flags() == {"fpu", "avx2"}
    monkeypatch.setattr(devices, "CPUINFO", tmp_path / "absent")  # no /proc/cpuinfo (macOS): float32
    assert devices.cpu_flags() == set() and devices.cpu_model()  # the platform's name, or "unknown CPU"
    assert HardwareArgs(large_dtype="auto").large_dtype == "float32"
    assert HardwareArgs(large_dtype="bfloat16").large_dtype == "bfloat16"  # asked for: kept
    with pytest.raises(LLMModulesError, match="--large-dtype must be one of auto, float32"):
        HardwareArgs(large_dtype="bf16")
