"""`train --method drafter` on tiny models: end to end through the CLI for every bridge, the targets are the
large model's own logits from the cached final states, no leak of states after a position's source through
the cache path, identical offsets on resume, both losses, generated targets, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from llm_modules.data.prepare import collate, pad_id, prepare_data
from llm_modules.entrypoints.cli import main
from llm_modules.errors import LLMModulesError
from llm_modules.models.composed import LLMModulesModel
from llm_modules.models.drafter import DrafterRecord
from llm_modules.models.loading import DraftOptions
from llm_modules.models.saved import DRAFTER_FILE, WEIGHTS_FILE
from llm_modules.states.store import model_state_key
from llm_modules.tensors import IGNORE_INDEX
from llm_modules.training.config import TrainConfig
from llm_modules.training.objectives import build_objective
from llm_modules.training.objectives import drafter as drafter_module
from llm_modules.training.objectives.drafter import draft_loss, draft_offsets

from ..helpers import interrupt_training, write_short_data
from ..helpers import nudge_gates as nudge

# the options of tests/helpers.py's OPTIONS, as command-line flags (the large model has 4 layers)
BRIDGE_FLAGS = {
    "eca": ["--num-heads", "4"],
    "ladder": ["--large-layers", "1,3"],
    "xattn": ["--large-layers", "2,4", "--small-stride", "1", "--num-heads", "4"],
}


# the options of the drafter's recipe (DrafterOptions.run_defaults) these tests set back to the plain defaults
NOT_THE_RECIPE = ["--drafter-targets", "logits", "--draft-vocab", "0", "--large-dtype", "float32", "--epochs", "1",
                  "--save-every", "0"]
NOT_THE_RECIPE_OPTIONS = dict(drafter_targets="logits", draft_vocab=0, large_dtype="float32", epochs=1, save_every=0)


@pytest.fixture
def drafter_args(mapped_pair, tmp_path):
    data = write_short_data(tmp_path / "data.jsonl")

    def build(output: str, *extra: str, bridge: str = "eca") -> list[str]:
        return ["train", "--method", "drafter", "--large", mapped_pair["large"], "--small", mapped_pair["small"],
                "--data", data, "--output", str(tmp_path / output), "--template", "stratos", "--batch-size", "2",
                "--max-length", "128", "--max-steps", "6", "--eval-every", "3", "--num-samples", "0",
                "--val-fraction", "0.25", "--lr-small", "3e-3", "--lr-bridge", "3e-2", "--no-progress",
                "--state-cache-dir", str(tmp_path / "states"), "--bridge", bridge, *BRIDGE_FLAGS[bridge],
                *NOT_THE_RECIPE, *extra]

    return build


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bridge, loss", [("eca", "kl"), ("ladder", "ce"), ("xattn", "kl")])
def test_a_drafter_trains_end_to_end_and_saves_a_composed_model_that_loads(drafter_args, tmp_path, bridge, loss):
    assert main(drafter_args("run", "--drafter-loss", loss, bridge=bridge)) == 0
    run = tmp_path / "run"
    metrics = rows(run)
    val = [r for r in metrics if "val_loss" in r]
    assert len(val) == 3 and all(0 <= r["val_agreement"] <= 1 and "val_bpb" not in r for r in val)
    assert val[-1]["val_loss"] < val[0]["val_loss"]  # the drafter's loss to the large model falls
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "drafter" and summary["best_val_metrics"]["val_agreement"] >= 0
    assert summary["drafter"] == {"draft_tokens": 4, "loss": loss, "targets": "logits", "vocab": 0,
                                  "format_version": 1}
    for name in ("best", "last"):
        folder = run / name
        assert (folder / WEIGHTS_FILE).is_file() and (folder / DRAFTER_FILE).is_file()
        assert DrafterRecord.load(folder) == DrafterRecord(4, loss, "logits")
        model = LLMModulesModel.from_pretrained(folder)
        assert (model.config.head, model.config.small_inputs, model.config.bridge) == ("projected", "mapped", bridge)
        saved = load_file(str(folder / WEIGHTS_FILE))
        assert all(torch.equal(saved[k], v) for k, v in model.trained_state_dict().items())
    assert DrafterRecord.load(run) == DrafterRecord(4, loss, "logits")  # a run folder stands for its best/


def test_the_drafter_defaults_and_refusals():
    base = dict(large="l", small="s", data="d", output="o", max_steps=1)
    config = TrainConfig.from_flags(**base, method="drafter")
    options = config.method_options
    assert (config.compose.head, config.compose.small_inputs, config.compose.bridge, options.draft_tokens,
            options.drafter_loss, options.drafter_targets) == ("projected", "mapped", "ladder", 4, "kl", "generated")
    composed = TrainConfig.from_flags(**base)
    shape = composed.compose
    assert (shape.head, shape.small_inputs, shape.bridge) == ("residual", "bridge", "eca")  # unchanged
    assert TrainConfig.from_flags(**base, method="drafter", bridge="eca").compose.bridge == "eca"
    with pytest.raises(LLMModulesError, match="--head residual cannot draft"):
        TrainConfig.from_flags(**base, method="drafter", head="residual")
    with pytest.raises(LLMModulesError, match="--draft-tokens is an option of --method drafter"):
        TrainConfig.from_flags(**base, draft_tokens=2)
    with pytest.raises(LLMModulesError, match="--drafter-loss must be one of kl, ce"):
        TrainConfig.from_flags(**base, method="drafter", drafter_loss="mse")
    with pytest.raises(LLMModulesError, match="--draft-vocab is an option of --method drafter"):
        TrainConfig.from_flags(**base, draft_vocab=100)
    with pytest.raises(LLMModulesError, match="--draft-vocab"):
        TrainConfig.from_flags(**base, method="drafter", draft_vocab=-1)
    with pytest.raises(LLMModulesError, match="trains from the state cache"):
        TrainConfig.from_flags(**base, method="drafter", state_cache=False)
    given = TrainConfig.from_flags(**base, method="drafter", head="new", small_inputs="bridge", bridge="ladder")
    assert given.compose.head == "new"


def test_the_residual_head_is_refused_on_the_command_line(drafter_args, capsys):
    assert main(drafter_args("run", "--head", "residual")) == 2
    assert "--head residual cannot draft" in capsys.readouterr().err


def _objective(pair, tmp_path, bridge="ladder", **over):
    flags = {"eca": dict(num_heads=4), "ladder": dict(large_layers="1,3"),
             "xattn": dict(large_layers="2,4", small_stride=1, num_heads=4)}[bridge]
    config = TrainConfig.from_flags(large=pair["large"], small=pair["small"],
                                    data=write_short_data(tmp_path / "data.jsonl"),
                                    output=str(tmp_path / "o"), method="drafter", bridge=bridge, template="stratos",
                                    max_length=128, val_fraction=0.25, max_steps=1, progress=False,
                                    state_cache_dir=str(tmp_path / "states"),
                                    **{**NOT_THE_RECIPE_OPTIONS, **flags, **over})
    objective = build_objective(config)
    data = prepare_data(config.data, objective.tokenizer, objective.max_positions)
    objective.attach_data(config, data, SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None))
    return objective, data


def _batch(objective, data, indices):
    batch = collate([data.train[i] for i in indices], pad_id(objective.tokenizer))
    batch.update(objective.batch_extras("train", indices, batch["input_ids"].shape[1]))
    return batch


def test_the_targets_are_the_large_models_own_logits_from_the_cached_final_states(mapped_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    objective, data = _objective(mapped_pair, tmp_path, bridge="ladder")
    model = objective.model
    assert model.large_released  # trained from the cache: the large body is gone, its head stays
    # the ladder taps hidden states 1 and 3; the cache holds the final one (4) too, under its own key
    assert objective.cache_taps == [1, 3, 4] and model.large_taps == [1, 3]
    assert model_state_key(objective.cached_model()) != model_state_key(model)
    assert objective.states["train"][0].shape[1] == 3
    batch = _batch(objective, data, [0, 1, 2])
    assert batch["large_states"].shape[2] == 2
    with torch.no_grad():
        targets = model.large_head(batch["target_states"])  # (B, T, V)
        large = AutoModelForCausalLM.from_pretrained(mapped_pair["large"]).eval()
        own = large(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(targets[real], own[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bridge", ["eca", "ladder", "xattn"])
def test_the_loss_at_a_position_reads_no_state_after_its_source_through_the_cache(mapped_pair, tmp_path, bridge):
    """Noise in every cached state after a position's source (all taps; the final state at the position
    itself is its target, not an input) leaves that position's drafter loss unchanged."""
    objective, data = _objective(mapped_pair, tmp_path, bridge=bridge)
    nudge(objective.model)
    objective.model.double().eval()
    objective.begin_step(3)
    real_states, index = objective.states["train"], [0]
    clean = real_states.batch(index, pad_to=len(data.train[0].input_ids)).double()  # (1, T, Kc, dL)
    batch = _batch(objective, data, index)
    source, labels = batch["large_source"][0], batch["labels"]
    answer = [t for t in range(labels.shape[1] - 1) if labels[0, t + 1] != IGNORE_INDEX]
    assert len(answer) >= 5 and len({int(source[t]) for t in answer}) >= 2
    g = torch.Generator().manual_seed(0)

    def loss_at(t: int, states: torch.Tensor) -> torch.Tensor:
        objective.states["train"] = SimpleNamespace(batch=lambda indices, pad_to: states)
        one = _batch(objective, data, index)
        one["labels"] = torch.full_like(labels, IGNORE_INDEX)
        one["labels"][0, t + 1] = labels[0, t + 1]
        with torch.no_grad():
            return objective.loss_sum(objective.module, one)

    changed = 0
    for t in answer[:8]:
        after = int(source[t]) + 1
        noisy = clean.clone()
        noisy[:, after:] = torch.randn(noisy[:, after:].shape, generator=g, dtype=noisy.dtype) * 3
        noisy[:, t, objective._final] = clean[:, t, objective._final]  # the target stays
        torch.testing.assert_close(loss_at(t, noisy), loss_at(t, clean), rtol=0, atol=1e-10)
        if after > 0:  # and what it does read matters
            seen = clean.clone()
            seen[:, :after] += torch.randn(seen[:, :after].shape, generator=g, dtype=seen.dtype)
            changed += bool((loss_at(t, seen) - loss_at(t, clean)).abs() > 1e-8)
    assert changed > 0
    objective.states["train"] = real_states


def test_draft_loss_is_kl_or_cross_entropy_on_the_arg_max_whatever_the_chunking(mapped_pair):
    from ..helpers import compose_pair as compose

    model = compose(mapped_pair, "eca", "mapped", head="projected").double()
    nudge(model)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(23, model.small.config.hidden_size, generator=g, dtype=torch.float64)
    h = torch.randn(23, model.large_head.weight.shape[1], generator=g, dtype=torch.float64)
    with torch.no_grad():
        q, p = model.head(s, None, model.large_head).log_softmax(-1), model.large_head(h).log_softmax(-1)
    expected = {"kl": (p.exp() * (p - q)).sum(), "ce": -q.gather(1, p.argmax(-1, keepdim=True)).sum()}
    agree = (q.argmax(-1) == p.argmax(-1)).sum()
    for kind in ("kl", "ce"):
        for chunk in (256, 5):
            model.loss_chunk_tokens = chunk
            loss, agreement = draft_loss(model, s.requires_grad_(True), h, kind)
            torch.testing.assert_close(loss.detach(), expected[kind], rtol=1e-10, atol=1e-10)
            assert int(agreement) == int(agree)
            loss.backward()  # chunks recomputed in the backward pass


def test_a_draft_vocabulary_restricts_both_distributions_and_agreement_uses_the_whole_one(mapped_pair):
    """With rows: KL between the two distributions renormalised over the rows (so training never costs |V|);
    the agreement counted without gradients is against the target's arg-max over the WHOLE vocabulary (a
    position whose target token the drafter cannot propose is a miss), with gradients over the rows."""
    from ..helpers import compose_pair as compose

    model = compose(mapped_pair, "eca", "mapped", head="projected").double()
    nudge(model)
    g = torch.Generator().manual_seed(2)
    s = torch.randn(31, model.small.config.hidden_size, generator=g, dtype=torch.float64)
    h = torch.randn(31, model.large_head.weight.shape[1], generator=g, dtype=torch.float64)
    with torch.no_grad():
        full_p = model.large_head(h)
    rows = torch.unique(full_p.argmax(-1))[: 3]  # some positions' target token is outside the rows
    rows = torch.unique(torch.cat([rows, torch.tensor([0, 1])]))
    with torch.no_grad():
        q = model.head(s, None, model.large_head)[:, rows].log_softmax(-1)
        p = full_p[:, rows].log_softmax(-1)
    expected = {"kl": (p.exp() * (p - q)).sum(), "ce": -q.gather(1, p.argmax(-1, keepdim=True)).sum()}
    whole = int((rows[q.argmax(-1)] == full_p.argmax(-1)).sum())
    within = int((q.argmax(-1) == p.argmax(-1)).sum())
    assert whole < within  # the test can tell the two counts apart
    for kind in ("kl", "ce"):
        loss, agreement = draft_loss(model, s.requires_grad_(True), h, kind, rows)
        torch.testing.assert_close(loss.detach(), expected[kind], rtol=1e-10, atol=1e-10)
        assert int(agreement) == within
        loss.backward()
        with torch.no_grad():
            assert int(draft_loss(model, s, h, kind, rows)[1]) == whole


def test_a_drafter_trained_on_a_draft_vocabulary_saves_it_and_decodes_from_it(drafter_args, mapped_pair, tmp_path,
                                                                            capsys):
    from llm_modules.models.drafter import DRAFT_VOCAB_FILE, load_draft_vocab
    from llm_modules.models.loading import load_drafter, load_model

    assert main(drafter_args("run", "--draft-vocab", "6")) == 0
    capsys.readouterr()
    record = DrafterRecord.load(tmp_path / "run")
    ids = load_file(str(tmp_path / "run" / "best" / DRAFT_VOCAB_FILE))["ids"]
    assert record.vocab == ids.numel() and 6 <= ids.numel() <= 6 + 2 and torch.equal(ids, ids.sort().values)
    assert torch.equal(load_draft_vocab(tmp_path / "run", record), ids)
    target = load_model(mapped_pair["large"])
    drafter = load_drafter(DraftOptions(str(tmp_path / "run"), lookup=False, width=1), target, mapped_pair["large"])
    assert torch.equal(drafter.vocab.cpu(), ids)
    base = ["--model", mapped_pair["large"], "--prompt", "What is 3 plus 4?", "--max-new-tokens", "12",
            "--template", "stratos"]
    assert main(["generate", *base]) == 0
    alone = capsys.readouterr().out
    assert main(["generate", *base, "--draft", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out == alone
    (tmp_path / "run" / "best" / DRAFT_VOCAB_FILE).unlink()
    with pytest.raises(LLMModulesError, match="is missing"):
        load_draft_vocab(tmp_path / "run", record)


def test_offsets_are_a_function_of_seed_step_and_example():
    a = draft_offsets(0, "train", 5, list(range(64)), 4)
    assert torch.equal(a, draft_offsets(0, "train", 5, list(range(64)), 4)) and 0 <= a.min() and a.max() < 4
    assert len(set(a.tolist())) == 4  # every offset drawn
    assert not torch.equal(a, draft_offsets(0, "train", 6, list(range(64)), 4))  # a new draw each step ...
    assert not torch.equal(a, draft_offsets(1, "train", 5, list(range(64)), 4))  # ... and each seed
    assert torch.equal(draft_offsets(0, "val", 1, [3, 4], 4), draft_offsets(0, "val", 9, [3, 4], 4))  # val: fixed
    assert torch.equal(draft_offsets(0, "train", 5, [7], 4), a[7:8])  # the same wherever the example is in a batch


def test_an_interrupted_drafter_resumes_with_the_same_offsets_and_weights(drafter_args, tmp_path, monkeypatch):
    drawn: dict[str, list] = {"straight": [], "interrupted": []}
    real_offsets, current = drafter_module.draft_offsets, {"run": "straight"}

    def recording(seed, split, step, indices, block):
        offsets = real_offsets(seed, split, step, indices, block)
        if split == "train":
            drawn[current["run"]].append((step, list(indices), offsets.tolist()))
        return offsets

    monkeypatch.setattr(drafter_module, "draft_offsets", recording)
    assert main(drafter_args("straight", "--save-every", "2")) == 0
    current["run"] = "interrupted"
    interrupt_training(monkeypatch, drafter_args("interrupted", "--save-every", "2"))
    drawn["interrupted"] = [d for d in drawn["interrupted"] if d[0] < 2]  # what the kept checkpoint saw
    assert main(drafter_args("interrupted", "--save-every", "2", "--resume")) == 0
    assert drawn["interrupted"] == drawn["straight"] and len({d[0] for d in drawn["straight"]}) == 6
    a, b = (load_file(str(tmp_path / run / "last" / WEIGHTS_FILE)) for run in ("straight", "interrupted"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untimed = [[{k: v for k, v in r.items() if k != "time"} for r in rows(tmp_path / run)]
               for run in ("straight", "interrupted")]
    assert untimed[0] == untimed[1]


def test_generated_targets_are_the_large_models_greedy_answers_cached_once(drafter_args, tmp_path, mapped_pair,
                                                                         capsys):
    from transformers import AutoModelForCausalLM

    from llm_modules.decoding.generation import generate

    assert main(drafter_args("gen", "--drafter-targets", "generated", "--max-steps", "2", "--max-length", "64")) == 0
    out = capsys.readouterr().out
    assert "greedy answers" in out and "generated)" in out
    summary = json.loads((tmp_path / "gen" / "summary.json").read_text())
    generation = summary["target_generation"]
    assert generation["generated"] and generation["examples"] == 16 and summary["target_generation_seconds"] > 0
    assert summary["drafter"]["targets"] == "generated"
    # the generating pass kept its states: the state cache ran no example through the large model again, and
    # the kept states went once the cache held them
    assert "their states kept for 16 examples" in out and "0 of 16 examples through the large model" in out
    assert not Path(generation["states"]).exists()
    kept = {key: tmp_path / "states" / "aside" / key for key in summary["state_cache_keys"]}
    for key, aside in kept.items():
        aside.parent.mkdir(exist_ok=True)
        (tmp_path / "states" / key).rename(aside)
    answers = json.loads(Path(generation["file"]).read_text())["answers"]
    assert Path(generation["file"]).parent == tmp_path / "drafter_targets"
    # the first example's answer is what the large model writes greedily after its prompt
    from transformers import AutoTokenizer

    from llm_modules.data.prepare import DataConfig
    from llm_modules.training.generated import prompt_length

    tokenizer = AutoTokenizer.from_pretrained(mapped_pair["large"])
    data = prepare_data(DataConfig(spec=str(tmp_path / "data.jsonl"), template="stratos", max_length=64,
                                   val_fraction=0.25), tokenizer)
    example = data.train[0]
    p = prompt_length(example, tokenizer, "stratos")
    large = AutoModelForCausalLM.from_pretrained(mapped_pair["large"]).eval()
    ids = torch.tensor([example.input_ids[:p]])
    greedy = generate(large, ids, max_new_tokens=64 - p, eos_token_id=[tokenizer.eos_token_id])[0, p:].tolist()
    eos = next((i + 1 for i, t in enumerate(greedy) if t == tokenizer.eos_token_id), len(greedy))
    assert answers[0] == greedy[:eos] and len(answers[0]) >= 1
    # a second run reads them instead of generating again; its state cache (the first's moved aside) is computed
    # by the large model and equals the kept one
    assert main(drafter_args("gen2", "--drafter-targets", "generated", "--max-steps", "1", "--max-length", "64")) == 0
    out = capsys.readouterr().out
    assert "reused)" in out and "16 of 16 examples through the large model" in out
    assert json.loads((tmp_path / "gen2" / "summary.json").read_text())["target_generation"]["generated"] is False
    from llm_modules.states.store import StateCache

    for key, aside in kept.items():
        again = StateCache._open_leased(tmp_path / "states", key, "float32")
        before = StateCache._open_leased(aside.parent, key, "float32")
        assert len(again) == len(before) > 0
        for i in range(len(again)):
            torch.testing.assert_close(before[i], again[i], atol=1e-4, rtol=1e-4)


def test_generate_eval_and_serve_take_a_trained_drafter_and_give_the_targets_output(drafter_args, mapped_pair,
                                                                                   tmp_path, capsys):
    """`--draft DIR` on generate and eval: the target's own greedy output, whatever the drafter drafts; the
    server's engine decodes through it too."""
    assert main(drafter_args("run")) == 0
    capsys.readouterr()
    base = ["--model", mapped_pair["large"], "--prompt", "What is 3 plus 4?", "--max-new-tokens", "12",
            "--template", "stratos"]
    assert main(["generate", *base]) == 0
    alone = capsys.readouterr().out
    assert main(["generate", *base, "--draft", str(tmp_path / "run"), "--draft-tokens", "3"]) == 0
    assert capsys.readouterr().out == alone
    data = str(tmp_path / "data.jsonl")
    ev = ["eval", "--model", mapped_pair["large"], "--data", data, "--template", "stratos", "--limit", "3",
          "--max-new-tokens", "8"]
    assert main(ev) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*ev, "--draft", str(tmp_path / "run")]) == 0
    drafted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert drafted["accuracy"] == plain["accuracy"] and drafted["loss"] == plain["loss"]

    from llm_modules.decoding.speculative.batch import SpeculativeBatch
    from llm_modules.entrypoints.openai import build_app

    app = build_app(mapped_pair["large"], draft=DraftOptions(str(tmp_path / "run"), tokens=2))
    assert isinstance(app.state.served.engine.batch, SpeculativeBatch)


def test_draft_refuses_a_folder_that_is_not_a_drafter(drafter_args, mapped_pair, tmp_path, capsys):
    assert main(["generate", "--model", mapped_pair["large"], "--prompt", "hi", "--draft", str(tmp_path)]) == 2
    assert "not" in capsys.readouterr().err
