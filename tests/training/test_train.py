"""Training end to end on tiny models: CLI, cached states, resume identity, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_modules.entrypoints.cli import main
from llm_modules.errors import LLMModulesError
from llm_modules.models.saved import WEIGHTS_FILE

from ..helpers import interrupt_training, losses, run_cli, write_data


@pytest.fixture
def train_args(tiny_pair_with_tokenizer, tmp_path):
    data = write_data(tmp_path / "data.jsonl")

    def build(output: str, *extra: str) -> list[str]:
        return ["train", "--large", tiny_pair_with_tokenizer["large"], "--small", tiny_pair_with_tokenizer["small"],
                "--data", data, "--output", str(tmp_path / output), "--template", "stratos",
                "--batch-size", "2", "--max-length", "512", "--max-steps", "6", "--eval-every", "3",
                "--num-samples", "1", "--max-new-tokens", "4", "--no-progress", "--dropout", "0.1",
                "--state-cache-dir", str(tmp_path / "states"), *extra]

    return build


def test_train_cli_writes_best_last_checkpoints_metrics(train_args, tmp_path, capsys):
    assert main(train_args("run", "--save-every", "3")) == 0
    run = tmp_path / "run"
    for name in ("best", "last"):
        assert (run / name / WEIGHTS_FILE).is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert len(losses(run)) == 7 and all(v > 0 for v in losses(run))  # step 0 validation + 6 steps
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["best_val_loss"] > 0 and len(summary["samples"]) == 1
    assert summary["initial_val_loss"] > summary["best_val_loss"]
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert "state cache" in capsys.readouterr().out


def test_another_split_of_the_same_data_reuses_the_cached_states(train_args, tmp_path, capsys):
    assert main(train_args("first", "--max-steps", "1")) == 0
    assert "(built, 24 of 24 examples through the large model)" in capsys.readouterr().out
    assert main(train_args("second", "--max-steps", "1", "--data-seed", "3", "--val-fraction", "0.25")) == 0
    assert "(built, 0 of 24 examples through the large model)" in capsys.readouterr().out
    assert main(train_args("third", "--max-steps", "1", "--data-seed", "3", "--val-fraction", "0.25", "--seed", "5")) == 0
    assert "(reused, 0 of 24 examples" in capsys.readouterr().out


def test_end_of_training_samples_come_from_best_weights(train_args, tmp_path, monkeypatch):
    import llm_modules.training.loop as train_module

    val_losses, seen = iter([5.0, 1.0, 2.0]), {}  # step 0, step 3 (best), step 6 (worse)
    monkeypatch.setattr(train_module, "validate", lambda run: dict.fromkeys(("val_loss", "val_bpb"), next(val_losses)))

    def fake_samples(scorer, examples, max_new_tokens):
        seen.update({k: v.detach().cpu().clone() for k, v in scorer.model.trained_state_dict().items()})
        return []

    monkeypatch.setattr(train_module, "held_out_samples", fake_samples)
    assert main(train_args("run")) == 0
    best, last = load_file(str(tmp_path / "run/best" / WEIGHTS_FILE)), load_file(str(tmp_path / "run/last" / WEIGHTS_FILE))
    assert any(not torch.equal(best[k], last[k]) for k in best)
    assert set(seen) == set(best) and all(torch.equal(seen[k], best[k]) for k in best)
    assert json.loads((tmp_path / "run/summary.json").read_text())["samples_from"] == "best"


def test_cached_states_train_exactly_like_uncached(train_args, tmp_path):
    assert main(train_args("cached")) == 0
    assert main(train_args("uncached", "--no-state-cache")) == 0
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "cached")), torch.tensor(losses(tmp_path / "uncached")),
                               rtol=1e-5, atol=1e-5)


def test_releasing_the_large_model_changes_nothing_trained(train_args, tmp_path, capsys):
    assert main(train_args("kept", "--no-release-large")) == 0
    assert "large model released" not in capsys.readouterr().out
    assert main(train_args("released")) == 0  # the default with cached states
    assert "large model released" in capsys.readouterr().out
    assert losses(tmp_path / "released") == losses(tmp_path / "kept")
    for name in ("best", "last"):
        kept, released = (load_file(str(tmp_path / run / name / WEIGHTS_FILE)) for run in ("kept", "released"))
        assert all(torch.equal(kept[k], released[k]) for k in kept)
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("kept", "released")]
    assert summaries[0]["samples"] == summaries[1]["samples"]  # generated after reloading the large model
    assert summaries[0]["parameters"] == summaries[1]["parameters"]
    assert [s["large_released"] for s in summaries] == [False, True]


def test_interrupted_run_resumes_to_the_same_weights(train_args, tmp_path, monkeypatch):
    assert main(train_args("straight", "--save-every", "2")) == 0
    interrupt_training(monkeypatch, train_args("interrupted", "--save-every", "2"))
    assert main(train_args("interrupted", "--save-every", "2")) == 2  # without --resume: refused, nothing lost
    assert (tmp_path / "interrupted" / "checkpoints" / "step-000002").is_dir()
    assert main(train_args("interrupted", "--save-every", "2", "--resume")) == 0
    a = load_file(str(tmp_path / "straight" / "last" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "interrupted" / "last" / WEIGHTS_FILE))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(tmp_path / "straight") == losses(tmp_path / "interrupted")


def test_without_validation_data_training_runs_to_the_end_and_best_is_last(train_args, tmp_path):
    # Every evaluation used to be "no better than NaN": best/ stayed at the first weights and early
    # stopping ended the run after `patience` evaluations.
    assert main(train_args("noval", "--val-fraction", "0", "--max-steps", "12", "--eval-every", "2",
                           "--early-stopping-patience", "2")) == 0
    summary = json.loads((tmp_path / "noval" / "summary.json").read_text())
    assert summary["steps"] == 12 and not summary["stopped_early"] and summary["best_val_loss"] is None
    best = load_file(str(tmp_path / "noval/best" / WEIGHTS_FILE))
    last = load_file(str(tmp_path / "noval/last" / WEIGHTS_FILE))
    assert all(torch.equal(best[k], last[k]) for k in last)


def test_resume_on_changed_data_is_refused(train_args, tmp_path, capsys):
    assert main(train_args("run", "--save-every", "3")) == 0
    args = train_args("run", "--save-every", "3", "--resume")
    data = Path(args[args.index("--data") + 1])
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1] + [lines[-1].replace("plus", "and")]) + "\n")  # one answer edited
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "other data" in err and "step-000006" in err
    assert (tmp_path / "run" / "checkpoints" / "step-000006").is_dir()  # nothing lost


def test_grad_scaler_state_survives_resume(train_args, tmp_path, monkeypatch):
    # fp16 training cannot run on this CPU: give the accelerator a scaler with a non-default state and
    # check that the resumed run gets that state back.
    import llm_modules.training.loop as train_module

    real_setup, restored = train_module.setup, {}

    def setup_with_scaler(config):
        run = real_setup(config)
        run.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
        if config.resume:
            real_load = run.accelerator.scaler.load_state_dict
            run.accelerator.scaler.load_state_dict = lambda s: (restored.update(s), real_load(s))
        return run

    monkeypatch.setattr(train_module, "setup", setup_with_scaler)
    assert main(train_args("fp16", "--save-every", "3", "--max-steps", "3")) == 0
    assert main(train_args("fp16", "--save-every", "3", "--max-steps", "3", "--resume")) == 0
    assert restored["scale"] == 2.0**10 and restored["growth_interval"] == 7


def test_output_of_a_different_run_is_refused(train_args, tmp_path, capsys):
    assert main(train_args("run")) == 0
    capsys.readouterr()
    assert main(train_args("run", "--lr-bridge", "0.001", "--resume")) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "lr_bridge" in err
    assert (tmp_path / "run" / "last" / WEIGHTS_FILE).is_file()


def test_malformed_data_line_is_one_clear_error(tiny_pair_with_tokenizer, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    code = main(["train", "--large", tiny_pair_with_tokenizer["large"], "--small", tiny_pair_with_tokenizer["small"],
                 "--data", str(bad), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl" in err and "2" in err and "Traceback" not in err


def test_unknown_model_spec_is_one_clear_error(tmp_path, capsys):
    code = main(["train", "--large", "no-such-model", "--small", "smollm2-135m-instruct", "--data",
                 "x.jsonl", "--output", str(tmp_path / "o")])
    assert code == 2 and "no-such-model" in capsys.readouterr().err


def same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    x, y = load_file(str(a / WEIGHTS_FILE)), load_file(str(b / WEIGHTS_FILE))
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=0, atol=atol, msg=key)


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_two_processes_match_one_at_the_same_global_batch(train_args, tmp_path):
    one = run_cli(train_args("one", "--dropout", "0", "--batch-size", "4"), cpu=True)
    assert one.wait(timeout=300) == 0, one.stdout.read()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    # Its own state cache: reusing the one-process run's would skip the multi-process build.
    two = run_cli(train_args("two", "--dropout", "0", "--batch-size", "2",
                             "--state-cache-dir", str(tmp_path / "states-two")), launcher, cpu=True)
    two_output = two.communicate(timeout=300)[0]
    assert two.returncode == 0, two_output
    assert "(built," in two_output and not list((tmp_path / "states-two").glob("*.tmp-*"))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "one")), torch.tensor(losses(tmp_path / "two")),
                               rtol=1e-5, atol=1e-5)
    same_weights(tmp_path / "one" / "last", tmp_path / "two" / "last", atol=1e-5)


@pytest.mark.subprocess
def test_sigkill_after_a_checkpoint_then_resume_gives_the_same_weights(train_args, tmp_path):
    from llm_modules.training.checkpoint import complete_checkpoints

    steps = 10
    args = ["--max-steps", str(steps), "--save-every", "1"]
    straight = run_cli(train_args("straight", *args))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    kill_at = random.Random().randint(int(0.3 * steps), int(0.8 * steps))  # 3..8
    victim = run_cli(train_args("killed", *args))
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any(int(p.name[5:]) >= kill_at for p in complete_checkpoints(checkpoints)):
        assert victim.poll() is None, f"the run ended before checkpoint {kill_at}: {victim.stdout.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    newest = complete_checkpoints(checkpoints)[-1]
    resumed_from = int(newest.name[5:])
    assert kill_at <= resumed_from < steps, (kill_at, resumed_from)  # killed mid-run, after a checkpoint
    resumed = run_cli(train_args("killed", *args, "--resume"))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"resumed from {newest} at step {resumed_from}" in output, (kill_at, output)
    same_weights(tmp_path / "straight" / "last", tmp_path / "killed" / "last")
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")


LOCK_FILE = "run.lock"  # training.run_lock's, spelled out: a user sees (and may delete) this name
PAUSED_RUN = """
import sys, time
from pathlib import Path

import llm_modules.training.loop as loop
from llm_modules.entrypoints.cli import main

real_step, flag = loop.train_step, Path(sys.argv[1])


def paused_step(run, batches):  # step 3 waits until the test lets it go on
    while run.scheduler.last_epoch == 2 and not flag.exists():
        time.sleep(0.02)
    return real_step(run, batches)


loop.train_step = paused_step
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.subprocess
def test_a_second_run_on_a_folder_that_a_live_run_writes_is_refused(train_args, tmp_path, capsys):
    """Issue 35, defect 4: `train --resume` on the folder of a run still writing was accepted, and both
    runs appended to metrics.jsonl (duplicated, out-of-order steps)."""
    from llm_modules.states.fence import host_name
    from llm_modules.training.checkpoint import complete_checkpoints

    args, flag = train_args("run", "--save-every", "2"), tmp_path / "go-on"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(flag), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])})
    try:
        deadline = time.monotonic() + 300
        while not complete_checkpoints(tmp_path / "run" / "checkpoints"):  # it has written step 2, waits in step 3
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(tmp_path / "run") in err, err
        assert f"host {host_name()}" in err and f"pid {first.pid}" in err, err
        assert main(args) == 2 and "in use by another run" in capsys.readouterr().err
        flag.touch()
        output = first.communicate(timeout=300)[0]
    finally:
        first.kill()
    assert first.returncode == 0, output
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] \
        == list(range(7))  # one writer: every step once, in order
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # let go at its end


def test_the_folder_is_let_go_after_a_normal_end_and_after_an_error(train_args, tmp_path, monkeypatch, capsys):
    import llm_modules.training.loop as train_module

    lock = tmp_path / "run" / LOCK_FILE
    seen = []
    real_setup = train_module.setup

    def watched_setup(config):
        run = real_setup(config)
        seen.append(lock.is_file())
        return run

    monkeypatch.setattr(train_module, "setup", watched_setup)
    assert main(train_args("run", "--max-steps", "2", "--save-every", "1")) == 0
    assert seen == [True] and not lock.exists()

    def failing_step(run, batches):
        raise LLMModulesError("a step failed")

    monkeypatch.setattr(train_module, "train_step", failing_step)
    capsys.readouterr()
    assert main(train_args("failed", "--max-steps", "2")) == 2 and "a step failed" in capsys.readouterr().err
    assert not (tmp_path / "failed" / LOCK_FILE).exists()
    monkeypatch.setattr(train_module, "train_step", lambda run, batches: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(train_args("interrupted", "--max-steps", "2")) == 130
    assert not (tmp_path / "interrupted" / LOCK_FILE).exists()
    assert main(train_args("refused", "--batch-size", "64")) == 2  # refused in setup, after the lock was taken
    assert not (tmp_path / "refused").exists()  # nor the folder it made for it


def test_eval_generate_and_chat_on_a_trained_model(train_args, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from llm_modules import LLMModulesModel
    from llm_modules.data.answers import answers_match, extract_final_answer
    from llm_modules.data.prepare import DataConfig, prepare_data
    from llm_modules.data.prompting import prompt_ids
    from llm_modules.entrypoints.cli import format_prompt
    from llm_modules.models.composed import next_token_loss
    from llm_modules.training.config import TrainConfig

    # The `new` head: with the default `residual` one, the tiny random large model's own predictions
    # still dominate after 6 steps, and `generate` printed nothing.
    assert main(train_args("run", "--head", "new")) == 0
    capsys.readouterr()
    model = str(tmp_path / "run" / "best")
    composed = LLMModulesModel.from_pretrained(model).eval()
    tok = composed.tokenizer
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())

    assert main(["eval", "--model", model, "--max-new-tokens", "6", "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Reference: the validation examples one at a time, full logits, plain cross-entropy.
    val = prepare_data(TrainConfig.from_dict(run_config).data, tok, composed.small_max_positions).val
    with torch.no_grad():
        sums = [next_token_loss(composed(input_ids=torch.tensor([e.input_ids])).logits,
                                torch.tensor([e.labels]), "sum").item() for e in val]
    tokens = sum(sum(label != -100 for label in e.labels[1:]) for e in val)
    assert result["split"] == "val" and result["examples"] == len(val) and result["answer_tokens"] == tokens
    # eval runs on the default device: a GPU's float32 kernels sum in another order than the CPU's
    tolerance = dict(rel=2e-5) if torch.cuda.is_available() else dict(abs=2e-5)
    assert result["loss"] == pytest.approx(sum(sums) / tokens, **tolerance)
    # Each validation question answered again, alone and unbatched: the samples hold these answers, and
    # `correct` counts the ones whose final answer matches the data's.
    alone = [answer_alone(composed, e, max_new_tokens=6) for e in val]
    samples = json.loads((tmp_path / "eval.json").read_text())["samples"]
    assert [s["model_answer"] for s in samples] == alone
    right = [answers_match(extract_final_answer(text), e.record.reference) for text, e in zip(alone, val)]
    assert result["checked"] == len(val) and result["correct"] == sum(right)
    assert result["accuracy"] == round(sum(right) / len(val), 4)
    # The same questions, every other one with the model's own final answer as its reference: those
    # and only those are counted right.
    own = [extract_final_answer(text) for text in alone]
    assert own[0] is not None  # so at least one is right
    crafted = tmp_path / "crafted.jsonl"
    crafted.write_text("".join(json.dumps({"prompt": s["question"], "completion": "-",
                                           "answer": own[i] if i % 2 == 0 else "no such answer"}) + "\n"
                               for i, s in enumerate(samples)))
    assert main(["eval", "--model", model, "--data", str(crafted), "--split", "all", "--max-new-tokens", "6"]) == 0
    crafted_result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert crafted_result["checked"] == len(val)
    assert crafted_result["correct"] == sum(own[i] is not None for i in range(0, len(val), 2))

    # The same harness scores a plain model spec (a baseline).
    data_spec = run_config["data"]["spec"]
    assert main(["eval", "--model", run_config["large"], "--data", data_spec, "--template", "stratos",
                 "--max-new-tokens", "4", "--limit", "2", "--no-generate"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    large = AutoModelForCausalLM.from_pretrained(run_config["large"]).eval()
    examples = prepare_data(DataConfig(spec=data_spec, template="stratos"), tok).val[:2]
    with torch.no_grad():
        sums = [next_token_loss(large(input_ids=torch.tensor([e.input_ids])).logits, torch.tensor([e.labels]),
                                "sum").item() for e in examples]
    tokens = sum(sum(label != -100 for label in e.labels[1:]) for e in examples)
    assert plain["examples"] == 2 and plain["answer_tokens"] == tokens
    assert plain["loss"] == pytest.approx(sum(sums) / tokens, **tolerance)

    # generate prints exactly what generate() returns.
    prompt = "What is 2 plus 2?"
    assert main(["generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    ids = torch.tensor([format_prompt(model, tok, prompt, "auto")])
    expected = tok.decode(composed.generate(ids, max_new_tokens=5)[0, ids.shape[1]:], skip_special_tokens=True)
    assert expected.strip() and capsys.readouterr().out == expected + "\n"

    # chat: each turn's streamed answer is generate()'s on the conversation so far.
    turns = ["What is 1 plus 1?", "And 2 plus 2?"]
    answers = iter([*turns, ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", "--model", model, "--max-new-tokens", "4"]) == 0
    history, expected = [], ""
    for turn in turns:
        history.append({"role": "user", "content": turn})
        ids = torch.tensor([prompt_ids(history, tok, "stratos")])
        answer = tok.decode(composed.generate(ids, max_new_tokens=4)[0, ids.shape[1]:], skip_special_tokens=True)
        expected += answer + "\n"
        history.append({"role": "assistant", "content": answer.strip()})
    assert capsys.readouterr().out == expected

    # info: the exact counts, the large model's counted on the plain transformers model.
    assert main(["info", "--model", model]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[4:]}
    trainable = sum(p.numel() for p in composed.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in composed.parameters() if not p.requires_grad)
    assert rows["total"] == [f"{trainable:,}", f"{frozen:,}"]
    assert rows["large"] == ["0", f"{sum(p.numel() for p in large.parameters()):,}"]
    assert rows["bridge"] == [f"{sum(p.numel() for p in composed.bridge.parameters()):,}", "0"]


def answer_alone(model, example, max_new_tokens: int) -> str:
    """`model`'s greedy answer to the prompt of `example` (its tokens before the first label), alone."""
    first = next(i for i, label in enumerate(example.labels) if label != -100)
    ids = torch.tensor([example.input_ids[:first]])
    return model.tokenizer.decode(model.generate(ids, max_new_tokens=max_new_tokens)[0, first:],
                                  skip_special_tokens=True)


def test_prompt_ids_match_training_render(tiny_pair_with_tokenizer):
    from transformers import AutoTokenizer

    from llm_modules.data.prepare import render
    from llm_modules.data.prompting import prompt_ids
    from llm_modules.data.sources import Record

    tok = AutoTokenizer.from_pretrained(tiny_pair_with_tokenizer["large"])
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    ids, labels = render(Record(None, [*messages, {"role": "assistant", "content": "7"}]), tok, "stratos")
    first = next(i for i, label in enumerate(labels) if label != -100)
    assert prompt_ids(messages, tok, "stratos") == ids[:first]


def test_gradient_accumulation_equals_the_larger_batch(train_args, tmp_path):
    assert main(train_args("big", "--dropout", "0", "--batch-size", "4", "--max-steps", "3")) == 0
    assert main(train_args("accum", "--dropout", "0", "--batch-size", "2", "--grad-accum", "2",
                           "--max-steps", "3", "--gradient-checkpointing")) == 0
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "big")), torch.tensor(losses(tmp_path / "accum")),
                               rtol=1e-5, atol=1e-5)
    same_weights(tmp_path / "big" / "last", tmp_path / "accum" / "last", atol=1e-5)


def test_yaml_config_file_with_flag_overrides(train_args, tmp_path):
    import yaml

    args = train_args("from_yaml")
    options = {args[i][2:].replace("-", "_"): args[i + 1] for i in range(1, len(args) - 1, 2)
               if args[i].startswith("--") and not args[i + 1].startswith("--")}
    options = {k: (int(v) if v.isdigit() else v) for k, v in options.items()}
    options["dropout"] = 0.1
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**options, "max-steps": 99}))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--max-steps", "2", "--no-progress"]) == 0
    saved = json.loads((tmp_path / "from_yaml" / "run_config.json").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["train"]["batch_size"] == 2
    assert saved["data"]["template"] == "stratos"
    (tmp_path / "bad.yaml").write_text("max_steps: 2\nbogus_option: 1\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2


def test_early_stopping_ends_the_run(train_args, tmp_path):
    # A learning rate this large makes validation worse at every evaluation.
    assert main(train_args("early", "--lr-bridge", "1", "--lr-small", "1", "--max-steps", "12", "--eval-every", "1",
                           "--early-stopping-patience", "2", "--max-grad-norm", "0")) == 0
    summary = json.loads((tmp_path / "early" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] < 12
