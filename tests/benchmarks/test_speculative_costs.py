"""benchmarks/speculative.py's accounting of a drafter's training seconds, everything included."""

from __future__ import annotations

import argparse
import json

import pytest

from ..helpers import load_benchmark


def load_script():
    return load_benchmark("speculative")


def test_a_reused_state_cache_is_charged_what_its_build_cost(tmp_path):
    runs = {"a": {"train_seconds": 600, "state_cache_seconds": 500, "state_cache_keys": ["k1", "k2"]},
            "b": {"train_seconds": 700, "state_cache_seconds": 0, "state_cache_keys": ["k1", "k2"]},
            "c": {"train_seconds": 650, "state_cache_seconds": 0, "state_cache_keys": ["k3"],
                  "target_generation_seconds": 40},
            "d": {"train_seconds": 100, "state_cache_seconds": 30, "state_cache_keys": ["k3"],
                  "self_prompts": {"kept": 8, "seconds": 12.5}}}  # the prompts it wrote itself count too
    folders = []
    for name, summary in runs.items():
        (tmp_path / name / "best").mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        folders.append(tmp_path / name / "best")  # a run's best/ finds the summary above it
    (tmp_path / "e").mkdir()
    folders.append(tmp_path / "e")
    costs = load_script().training_costs(folders)
    assert [costs[f] for f in folders] == [1100.0, 1200.0, 720.0, 142.5, None]


def test_the_cache_builder_is_found_beside_the_drafters_given(tmp_path):
    """A drafter that reused a cache is charged its build even when the drafter that built it is not benchmarked."""
    for name, summary in {"builder": {"train_seconds": 300, "state_cache_seconds": 561, "state_cache_keys": ["k"]},
                          "reuser": {"train_seconds": 563, "state_cache_seconds": 0, "state_cache_keys": ["k"]},
                          "other": {"train_seconds": 5, "state_cache_seconds": 9, "state_cache_keys": ["z"]}}.items():
        (tmp_path / "runs" / name / "best").mkdir(parents=True)
        (tmp_path / "runs" / name / "summary.json").write_text(json.dumps(summary))
    folder = tmp_path / "runs" / "reuser" / "best"
    assert load_script().training_costs([folder]) == {folder: 1124.0}


def test_a_tree_proposers_lookup_counts_are_reported_per_run_and_per_category(tiny_models):
    """run_ours gives the rows given lookup's copy in this call alone (a proposer lives across calls); the
    Spec-Bench report sums them per method and category."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
    from llm_modules.decoding.speculative.tree_proposer import TreeProposer

    script = load_script()
    target = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float64).eval()
    vocab = target.config.vocab_size
    # K=4 keeps a verify pass inside these short prompts' answers
    drafter = TreeProposer(None, PromptLookup(vocab, draft_tokens=4))
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 12, 13]]
    runs = [script.run_ours(target, prompts, 2, 12, 0, [], drafter) for _ in range(2)]
    (outputs, _, stats), (again, _, stats_again) = runs
    assert outputs == again and stats["lookup_rows"] == stats_again["lookup_rows"] > 0
    assert stats["lookup_rows"] <= stats["row_passes"] and drafter.lookup_rows == 2 * stats["lookup_rows"]
    records = [{"method": "m", "category": c, "lookup_rows": a, "row_passes": b}
               for c, a, b in (("rag", 3, 4), ("rag", 2, 4), ("math_reasoning", 0, 5))] + [
        {"method": "plain", "category": "rag"}]
    table = script.sources_table(records)
    assert table[-1] == "| m | 0 / 5 | 5 / 8 | 5 / 13 |"
    assert table[-3] == "| method | math_reasoning | rag | overall |"
    assert script.sources_table(records[-1:]) == []

def test_an_eagle3_folder_drafts_in_the_benchmark_as_chain_and_tree(tmp_path):
    """The benchmark loads an EAGLE-3 folder (ours or another trainer's) beside composed drafters: its chain and its
    tree with lookup give the target's own greedy tokens."""
    from types import SimpleNamespace

    import torch

    from llm_modules.decoding.speculative.eagle3_proposer import Eagle3Proposer
    from llm_modules.decoding.speculative.tree_proposer import TreeProposer
    from llm_modules.models.eagle3_folder import save_eagle3

    from ..helpers import tiny_eagle3, tiny_eagle3_target

    script = load_script()
    target = tiny_eagle3_target()
    save_eagle3(tiny_eagle3(target), tmp_path / "eagle3")
    network = script.load_network(str(tmp_path / "eagle3"), SimpleNamespace(model=target), torch.float32)
    assert script.saved_vocabulary(tmp_path / "eagle3") is None  # its own d2t, not a draft vocabulary file
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() * 2 for n in (3, 5)]
    reference, _, _ = script.run_ours(target, prompts, 2, 10, 0, [1])
    for width, lookup in ((None, False), (3, True)):
        drafter = script.our_drafter(network, 3, 0, None, lookup=lookup, width=width)
        assert isinstance(drafter if width is None else drafter.drafter, Eagle3Proposer)
        assert width is None or isinstance(drafter, TreeProposer)
        outputs, _, stats = script.run_ours(target, prompts, 2, 10, 0, [1], drafter=drafter)
        assert outputs == reference and stats["passes"] > 0


def test_the_queue_refills_finished_rows_and_gives_the_targets_own_tokens():
    """--queue: prompts served `size` rows at a time, a finished row replaced at the next step; plain and
    speculative rows give the fixed batches' greedy tokens, and the batch never holds more than `size` rows."""
    import torch

    from ..helpers import tiny_eagle3, tiny_eagle3_target

    script = load_script()
    target = tiny_eagle3_target()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 100, (int(n),), generator=g).tolist() * 2 for n in torch.randint(2, 7, (7,), generator=g)]
    alone = [script.run_ours(target, [p], 1, 9, 0, [1])[0][0] for p in prompts]
    seen = []
    real_step = script.DecodeBatch.step

    def step(self):
        seen.append(len(self.rows))
        return real_step(self)

    script.DecodeBatch.step = step
    try:
        outputs, _, stats = script.run_queue(target, prompts, 3, 9, 0, [1])
    finally:
        script.DecodeBatch.step = real_step
    assert outputs == alone and stats is None
    assert max(seen) == 3 and len(seen) > 9  # 7 prompts, 3 at a time: more steps than one batch's 9
    drafter = script.our_drafter(tiny_eagle3(target), 2, 0, None, lookup=True, width=2)
    outputs, _, stats = script.run_queue(target, prompts, 3, 9, 0, [1], drafter=drafter)
    assert outputs == alone and stats["passes"] > 0 and stats["row_passes"] <= 3 * stats["passes"]


def test_the_report_says_whether_the_prompts_were_a_queue(tmp_path):
    from types import SimpleNamespace

    script = load_script()
    row = {"task": "reasoning-gym:gsm_symbolic?size=8", "batch": 8, "row": "target alone (our engine)",
           "tokens_per_s": 10.0, "speedup": 1.0, "accepted_per_pass": None, "train_seconds": None, "identical": "8/8"}
    for queue, says in ((32, "a queue of 32 prompts per task"), (0, "8 prompts per task")):
        args = SimpleNamespace(output=str(tmp_path / str(queue)), target="t", max_new_tokens=64, queue=queue, prompts=8,
                               dtype="bfloat16", repeats=1)
        script.write_report(args, [row])
        text = (tmp_path / str(queue) / "results.md").read_text()
        assert says in text and "| gsm_symbolic | 8 | target alone (our engine) |" in text
        assert "times in turn" not in text and "1.0x |" in text


def test_repeated_rows_report_the_median_speedup_and_its_spread(tmp_path):
    from types import SimpleNamespace

    script = load_script()
    row = {"task": "reasoning-gym:gsm_symbolic?size=8", "batch": 8, "row": "ours: d", "tokens_per_s": 11.0,
           "speedup": 1.04, "speedups": [0.98, 1.04, 1.11], "accepted_per_pass": 2.0, "train_seconds": None,
           "identical": "8/8"}
    args = SimpleNamespace(output=str(tmp_path), target="t", max_new_tokens=64, queue=0, prompts=8, dtype="bfloat16",
                           repeats=3)
    script.write_report(args, [row])
    text = (tmp_path / "results.md").read_text()
    assert "Every row ran 3 times in turn" in text and "| 1.04x (0.98-1.11) |" in text


def test_the_parts_table_splits_a_methods_time_and_leaves_older_records_unsplit():
    script = load_script()
    new = {"method": "ours: lookup", "passes": 4, "seconds": 2.0, "prefill_seconds": 0.6, "draft_seconds": 0.04,
           "verify_seconds": 1.2, "rollback_seconds": 0.08}
    old = {"method": "ours: old", "passes": 2, "seconds": 1.0, "draft_seconds": 0.02, "verify_seconds": 0.5,
           "rollback_seconds": 0.04}
    lines = script.parts_table([new, dict(new), old, {"method": "target alone (our engine)", "passes": None,
                                                      "seconds": 1.0}])
    # prefill per question; per pass: drafting 10, target 300, rollback 20, the rest (2 - 1.92) / 4 s = 20 ms
    assert "| ours: lookup | 600 | 10.0 | 300.0 | 20.0 | 20.0 |" in lines
    assert "| ours: old | n/a | 10.0 | 250.0 | 20.0 | n/a |" in lines
    assert not any("target alone" in line for line in lines)


def test_only_default_runs_each_drafter_as_draft_dir_does():
    from types import SimpleNamespace

    script = load_script()
    args = SimpleNamespace(chains=False, only_default=True, tree_width=[5], adaptive=False, policy=[])
    assert [label for label, _ in script.drafter_variants(args, None, 4, 0, None)] == [" tree w=5+lookup adaptive"]
    args.chains = True
    assert [label for label, _ in script.drafter_variants(args, None, 4, 0, None)] == ["", " tree w=5+lookup adaptive"]
    args.policy = [script.policy_field("stand_aside=0"), script.policy_field("margin=0.2")]
    assert args.policy == [("stand_aside", False), ("margin", 0.2)]
    assert [label for label, _ in script.drafter_variants(args, None, 4, 0, None)] == [
        "", " tree w=5+lookup adaptive", " tree w=5+lookup adaptive, stand_aside=False",
        " tree w=5+lookup adaptive, margin=0.2"]
    script.our_drafter = lambda *args, **kwargs: kwargs  # what each row's fresh proposer is made with
    made = [make() for _, make in script.drafter_variants(args, None, 4, 0, None)]
    assert [m.get("policy") for m in made] == [None, None, {"stand_aside": False}, {"margin": 0.2}]
    for bad in ("stand_aside", "nothing=1", "margin=x", "rates=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="FIELD=VALUE|could not convert"):
            script.policy_field(bad)
    args = SimpleNamespace(chains=True, only_default=False, tree_width=[3], adaptive=True, policy=[])
    assert [label for label, _ in script.drafter_variants(args, None, 4, 0, None)] == [
        "", " tree w=3", " tree w=3+lookup", " tree w=3+lookup adaptive"]
