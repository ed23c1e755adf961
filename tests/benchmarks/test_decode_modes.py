"""benchmarks/decode_modes.py end to end on tiny models: every mode's row at every batch size, a report; and the
arithmetic of a row on a scripted clock (no assertion on a measured time: issue 35, defect 11)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from ..helpers import REPO, build_chat_pair

SCRIPT = REPO / "benchmarks" / "decode_modes.py"


@pytest.mark.subprocess
def test_every_mode_is_timed_at_every_batch_size(tmp_path):
    pytest.importorskip("peft")
    pair = build_chat_pair(tmp_path / "pair")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": w}) + "\n"
                            for w in ("one", "two", "three")))
    out = tmp_path / "report"
    command = [sys.executable, str(SCRIPT), "--large", pair["large"], "--small", pair["small"], "--data", str(data),
               "--prompts", "3", "--prompts-at-1", "2", "--batch", "1", "--batch", "2", "--new-tokens", "24",
               "--small-layers", "1", "--bridge", "eca", "--bridge", "xattn", "--output", str(out),
               "--compose", "row_x:bridge=xattn,head=projected,small_inputs=mapped,large_reads=prompt,small_layers=1"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    names = {r["row"] for r in rows}
    assert names == {"large alone", "small alone", "distilled small", "lora on large (rank 8, unmerged)",
                     *(f"composed {b}, reads {m}" for b in ("eca", "xattn") for m in ("all", "prompt")),
                     "composed eca, reads prompt, small layers 1", "composed xattn, reads prompt, small layers 1",
                     "row_x"}
    assert sorted(r["batch"] for r in rows) == sorted([1, 2] * len(names))
    # the timings themselves depend on how busy the machine is: only their presence is checked here (their
    # arithmetic: test_the_rows_arithmetic_on_a_scripted_clock)
    timed = ("tokens_per_s", "seconds", "decode_ms_per_token", "prefill_s_per_batch")
    assert all(isinstance(r[key], (int, float)) for r in rows for key in timed)
    assert {r["prompts"] for r in rows if r["batch"] == 1} == {2}  # --prompts-at-1
    assert {r["prompts"] for r in rows if r["batch"] == 2} == {3}
    assert "| large alone | 1 |" in (out / "results.md").read_text()


def load_script():
    spec = importlib.util.spec_from_file_location("decode_modes_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScriptedClock:
    """A clock that `generate` moves: each call costs PREFILL seconds per batch plus PER_TOKEN per new token."""

    PREFILL, PER_TOKEN = 0.5, 0.02

    def __init__(self):
        self.now, self.calls = 100.0, []

    def __call__(self) -> float:
        return self.now

    def generate(self, model, ids, mask, max_new_tokens, eos_token_id, pad_token_id):
        self.calls.append((ids.shape[0], max_new_tokens))
        self.now += self.PREFILL + self.PER_TOKEN * max_new_tokens


def test_the_rows_arithmetic_on_a_scripted_clock(monkeypatch):
    """5 prompts at batch 2 (3 batches; the last holds one) and batch 1 on the first 2 prompts, 11 new tokens:
    every number of the row follows from the clock, whatever the machine is doing."""
    script, clock = load_script(), ScriptedClock()
    monkeypatch.setattr(script, "generate", clock.generate)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8], [9]]
    rows = script.measure("m", object(), prompts, [2, 1], 11, 0, at_one=2, clock=clock)
    batch_of = {r["batch"]: r for r in rows}
    assert [r["batch"] for r in rows] == [2, 1] and batch_of[2]["prompts"] == 5 and batch_of[1]["prompts"] == 2
    seconds = 3 * (0.5 + 0.02 * 11)  # three batches of 11 new tokens
    first = 3 * (0.5 + 0.02 * 1)
    assert batch_of[2]["seconds"] == round(seconds, 1)
    assert batch_of[2]["tokens_per_s"] == round(5 * 11 / seconds, 2)
    assert batch_of[2]["decode_ms_per_token"] == 20.0  # (11 tokens' time - 1 token's) / 10, per batch
    assert batch_of[2]["prefill_s_per_batch"] == round(first / 3, 2)
    assert batch_of[1]["decode_ms_per_token"] == 20.0 and batch_of[1]["tokens_per_s"] == round(2 * 11 / (2 * 0.72), 2)
    assert clock.calls[0] == (1, 4)  # the warm-up: one prompt, 4 tokens
    assert clock.calls[1:] == [(2, 11), (2, 11), (1, 11), (2, 1), (2, 1), (1, 1), (1, 11), (1, 11), (1, 1), (1, 1)]
