"""`train --method drafter --drafter-layout eagle3` on tiny models: the loss of the training-time test falls on the
target's own answers, step 1's targets are the target's next-token distribution one position on, the saved folder
loads to the same network, exports for vLLM, and drafts through --draft with the target's greedy output."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llm_modules.data.prepare import collate, pad_id, prepare_data
from llm_modules.decoding.engine import DecodeBatch
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.entrypoints.cli import main
from llm_modules.errors import LLMModulesError
from llm_modules.models.eagle3 import EAGLE3_FILE
from llm_modules.models.eagle3_folder import check_export, load_eagle3
from llm_modules.models.loading import DraftOptions, RunnableModel, load_drafter
from llm_modules.models.saved import DRAFTER_FILE, WEIGHTS_FILE
from llm_modules.tensors import IGNORE_INDEX
from llm_modules.training.config import TrainConfig
from llm_modules.training.objectives import build_objective
from llm_modules.training.objectives.eagle3_drafter import Eagle3Objective

from ..helpers import decode_rows, interrupt_training, write_short_data

COMMON = dict(template="stratos", max_length=128, val_fraction=0.25, progress=False, large_dtype="float32",
              draft_vocab=0, save_every=0, num_samples=0, batch_size=2)


def _args(pair, tmp_path, output, *extra):
    return ["train", "--method", "drafter", "--drafter-layout", "eagle3", "--large", pair["large"], "--small",
            pair["small"], "--data", write_short_data(tmp_path / "data.jsonl"), "--output", str(tmp_path / output),
            "--template", "stratos", "--batch-size", "2", "--max-length", "128", "--val-fraction", "0.25",
            "--no-progress", "--large-dtype", "float32", "--save-every", "0", "--num-samples", "0",
            "--state-cache-dir", str(tmp_path / "states"), *extra]


def test_an_eagle3_drafter_trains_on_generated_targets_saves_exports_and_drafts(mapped_pair, tmp_path):
    args = _args(mapped_pair, tmp_path, "run", "--drafter-targets", "generated", "--draft-vocab", "64",
                 "--draft-tokens", "3", "--max-steps", "16", "--eval-every", "4", "--lr-small", "3e-3")
    assert main(args) == 0
    run = tmp_path / "run"
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert len(val) == 5 and val[-1]["val_loss"] < 0.8 * val[0]["val_loss"], [r["val_loss"] for r in val]
    assert all(0 <= r["val_agreement"] <= 1 for r in val)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["drafter"]["draft_tokens"] == 3 and summary["drafter"]["targets"] == "generated"
    folder = run / "best"
    assert (folder / EAGLE3_FILE).is_file() and (folder / DRAFTER_FILE).is_file()
    assert "embed_tokens.weight" not in load_file(str(folder / WEIGHTS_FILE))  # the target's, not saved
    vocab = summary["drafter"]["vocab"]
    assert 64 <= vocab < 70  # the 64 most frequent answer tokens and the end-of-sequence ids

    # exports for vLLM, every tensor present, the target's embedding filled in
    assert main(["export", str(run), "--format", "eagle3", str(tmp_path / "out")]) == 0
    check_export(tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["draft_vocab_size"] == vocab and exported["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]
    assert exported["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3

    # the run folder and the exported one draft in our engine with the target's greedy output
    target = AutoModelForCausalLM.from_pretrained(mapped_pair["large"]).eval()
    runnable = RunnableModel(target, SimpleNamespace(pad_token_id=0), composed=False)
    prompts = [[5, 9, 14, 3], [20, 7], [11, 12, 13, 14, 15]]
    options = [SamplingOptions(max_new_tokens=n) for n in (9, 6, 12)]
    alone = decode_rows(DecodeBatch(target), prompts, options)
    for where in (run, tmp_path / "out"):
        proposer = load_drafter(DraftOptions(str(where), lookup=False, width=1, adaptive=False), runnable, mapped_pair["large"])
        assert proposer.draft_tokens == 3
        assert decode_rows(SpeculativeBatch(target, proposer), prompts, options) == alone


def _objective(pair, tmp_path, **over):
    config = TrainConfig.from_flags(large=pair["large"], small=pair["small"],
                                    data=write_short_data(tmp_path / "data.jsonl"),
                                    output=str(tmp_path / "o"), method="drafter", drafter_layout="eagle3",
                                    max_steps=1, drafter_targets="logits", state_cache_dir=str(tmp_path / "states"),
                                    **{**COMMON, **over})
    objective = build_objective(config)
    data = prepare_data(config.data, objective.tokenizer, objective.max_positions)
    objective.attach_data(config, data, SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None))
    return objective, data


def test_step_one_is_trained_on_the_targets_distribution_at_the_next_position(mapped_pair, tmp_path):
    """The loss of one step, recomputed from the target's own logits (not the cached states): step 1 at p reads the
    taps at p and the token at p + 1, and its target is the target's distribution at p + 1."""
    objective, data = _objective(mapped_pair, tmp_path, draft_tokens=1)
    assert isinstance(objective, Eagle3Objective)
    indices = [0, 1]
    batch = collate([data.train[i] for i in indices], pad_id(objective.tokenizer))
    batch.update(objective.batch_extras("train", indices, batch["input_ids"].shape[1]))
    with torch.no_grad():
        loss, _ = objective.module(**batch)
        target = AutoModelForCausalLM.from_pretrained(mapped_pair["large"]).eval()
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        out = target(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        d = objective.drafter
        taps = torch.stack([out.hidden_states[t] for t in d.config.taps], 2)
        tokens = torch.cat([ids[:, 1:], ids[:, :1]], 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        first, _ = d(tokens, d.fuse(taps), positions, mask)
        want = torch.zeros(())
        for b in range(ids.shape[0]):
            for p in range(ids.shape[1] - 2):
                if labels[b, p + 2] != IGNORE_INDEX:
                    mine = F.log_softmax(d.head(first[b, p]), -1)
                    theirs = F.log_softmax(out.logits[b, p + 1], -1)
                    want = want + F.kl_div(mine, theirs, log_target=True, reduction="sum")
    assert torch.allclose(loss, want, rtol=1e-4), (loss, want)


def test_the_saved_folder_loads_to_the_same_network(mapped_pair, tmp_path):
    objective, _ = _objective(mapped_pair, tmp_path, draft_vocab=32)
    with torch.no_grad():
        for p in objective.drafter.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    folder = objective.save_pretrained(tmp_path / "saved")
    record = json.loads((folder / DRAFTER_FILE).read_text())
    assert record["vocab"] == objective.drafter.config.draft_vocab_size
    embeddings = objective.model.large.get_input_embeddings().weight
    again, _ = load_eagle3(folder, embeddings=embeddings)
    mine = objective.drafter.state_dict()
    assert mine.keys() == again.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in mine.items())
    trained = objective.trained_state_dict()
    objective.load_trained_state_dict({k: torch.zeros_like(v) if v.is_floating_point() else v
                                       for k, v in trained.items()})
    objective.load_trained_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    assert all(torch.equal(v, objective.drafter.state_dict()[k]) for k, v in trained.items())


def test_eagle3_refuses_text_samples(mapped_pair):
    with pytest.raises(LLMModulesError, match="writes no text samples"):
        TrainConfig.from_flags(large="l", small="s", data="d", output="o", method="drafter", drafter_layout="eagle3",
                               num_samples=2)
    with pytest.raises(LLMModulesError, match="--drafter-layout must be one of composed, eagle3"):
        TrainConfig.from_flags(large="l", small="s", data="d", output="o", method="drafter", drafter_layout="tree")


def test_an_interrupted_eagle3_run_resumes_to_the_weights_of_a_straight_one(mapped_pair, tmp_path, monkeypatch):
    def args(output, *extra):
        return _args(mapped_pair, tmp_path, output, "--drafter-targets", "logits", "--draft-vocab", "32",
                     "--max-steps", "6", "--eval-every", "3", *extra)

    assert main([*args("straight"), "--save-every", "2"]) == 0
    interrupt_training(monkeypatch, [*args("interrupted"), "--save-every", "2"])
    assert main([*args("interrupted"), "--save-every", "2", "--resume"]) == 0
    a, b = (load_file(str(tmp_path / run / "last" / WEIGHTS_FILE)) for run in ("straight", "interrupted"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "d2t" in a and "embed_tokens.weight" not in a
