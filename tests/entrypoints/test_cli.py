"""The command line explains itself: help with defaults and choices, one-line errors, --version."""

from __future__ import annotations

import argparse

import pytest

from llm_modules import __version__
from llm_modules.entrypoints.cli import build_parser, main
from llm_modules.training.config import option_default, train_options

REQUIRED = ("large", "small", "data", "output")


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_train_option_has_help_with_its_default_and_choices():
    actions = {a.dest: a for a in train_parser()._actions}
    for name in train_options():
        action = actions[name]
        assert action.help and len(action.help) > 20, name
        if name in ("lr_small", "lr_bridge"):  # decided per method: the help says how
            assert "default: the method's measured one" in action.help and "--paper-lrs" in action.help, name
        elif name not in REQUIRED and option_default(name) is not None:  # None: "all" or per method, in the help
            default = option_default(name)  # the composed method's
            assert f"default: {default}" in action.help.replace("%%", "%"), name
    choices = {name: tuple(actions[name].choices or ()) for name in train_options()}
    assert set(choices["head"]) == {"new", "projected", "residual", "own"}
    assert set(choices["template"]) == {"stratos", "chat"}
    assert set(choices["mixed_precision"]) == {"auto", "no", "bf16", "fp16"}
    assert set(choices["state_cache_dtype"]) == {"float32", "float16", "bfloat16"}
    assert choices["loss_on"] and choices["overflow"]
    text = train_parser().format_help()
    assert "--head {new,projected,residual,own}" in text and "(default: residual)" in text


@pytest.mark.parametrize("flag,value,names", [
    ("--head", "foo", ["--head", "new", "projected", "residual"]),
    ("--template", "x", ["--template", "stratos", "chat"]),
    ("--epochs", "-1", ["--epochs", ">= 0"]),
    ("--lr-bridge", "abc", ["--lr-bridge", "abc"]),
])
def test_a_wrong_option_value_is_one_line_naming_option_and_valid_values(tmp_path, capsys, flag, value, names):
    args = ["train", "--large", "config:gpt-neo-125m", "--small", "config:gpt-neo-125m", "--data", "d.jsonl",
            "--output", str(tmp_path / "out"), flag, value]
    try:
        code = main(args)
    except SystemExit as exit_info:  # argparse's own checks exit; later ones return the status
        code = exit_info.code
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert all(n in lines[0] for n in names), lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"llm-modules {__version__}"
