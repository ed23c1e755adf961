"""`--drafter-targets generated`: the target's answers are kept batch by batch, so an interrupted
generation resumes where it stopped, and the resumed answers are those of an uninterrupted run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llm_modules.states.fence import host_name
from llm_modules.training import generated

from ..helpers import TINY

EOS, PAD, MAX_LENGTH = [7], 0, 20


@pytest.fixture(scope="module")
def large():
    torch.manual_seed(11)
    return TINY["qwen2"]().eval()


@pytest.fixture
def prompts():
    rng = random.Random(3)
    return [[rng.randrange(1, 120) for _ in range(rng.randint(2, 9))] for _ in range(10)]


def run(root, large, prompts, max_length=MAX_LENGTH):
    key = generated.generation_key(large, "tiny", prompts, max_length, EOS)
    return generated.load_or_generate(root / f"{key}.json", key, large, prompts, max_length, EOS, PAD)


def test_an_interrupted_generation_keeps_its_answers_and_resumes_to_the_same_ones(tmp_path, large, prompts, counted):
    straight, info = run(tmp_path / "straight", large, prompts)
    assert info == {"generated": True, "resumed": 0} and counted["n"] == 4
    counted.update(n=0, die_at=3)  # two batches answered and kept, the third interrupted
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", large, prompts)
    kept = list((tmp_path / "resumed").glob("*.parts/batch-*.json"))
    assert len(kept) == 2  # what was generated before the interruption is on disk
    counted.update(n=0, die_at=None)
    answers, info = run(tmp_path / "resumed", large, prompts)
    assert counted["n"] == 2  # only the missing batches
    assert info == {"generated": True, "resumed": 6}
    assert answers == straight
    assert not list((tmp_path / "resumed").glob("*.parts"))  # the whole file replaces the parts
    saved = [json.loads(p.read_text())["answers"] for p in (tmp_path / "resumed").glob("*.json")]
    assert saved == [straight]
    counted.update(n=0)
    assert run(tmp_path / "resumed", large, prompts) == (straight, {"generated": False, "resumed": 0})
    assert counted["n"] == 0


def test_parts_of_another_setting_are_not_reused(tmp_path, large, prompts, counted, monkeypatch):
    counted.update(die_at=3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, large, prompts)
    counted.update(n=0, die_at=None)
    shorter, info = run(tmp_path, large, prompts, max_length=MAX_LENGTH - 4)  # another key
    assert counted["n"] == 4 and info["resumed"] == 0
    assert all(len(p) + len(a) <= MAX_LENGTH - 4 for p, a in zip(prompts, shorter))
    counted.update(n=0, die_at=None)
    monkeypatch.setattr(generated, "GENERATE_BATCH", 4)  # other batches: other padding, so other bytes maybe
    _, info = run(tmp_path, large, prompts)
    assert counted["n"] == 3 and info["resumed"] == 0


def test_a_damaged_part_is_generated_again(tmp_path, large, prompts, counted):
    straight, _ = run(tmp_path / "straight", large, prompts)
    counted.update(n=0, die_at=4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", large, prompts)
    first, second, third = sorted((tmp_path / "resumed").glob("*.parts/batch-*.json"))
    first.write_text(first.read_text()[:-5])  # cut short
    dead = first.with_name(f"{first.name}.tmp-{host_name()}-{2**22 + 12345}")  # its writer killed mid-write
    dead.write_text("{")
    body = json.loads(second.read_text())
    second.write_text(json.dumps({**body, "rows": body["rows"][::-1]}))  # rows of another order
    counted.update(n=0, die_at=None)
    answers, info = run(tmp_path / "resumed", large, prompts)
    assert counted["n"] == 3 and info["resumed"] == 3 and answers == straight
    assert not list((tmp_path / "resumed").glob("*.parts"))
