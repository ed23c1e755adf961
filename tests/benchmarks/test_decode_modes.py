"""benchmarks/decode_modes.py end to end on tiny models: every mode's row at every batch size, a report."""

from __future__ import annotations

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
    assert names == {"large alone", "small alone", "lora on large (rank 8, unmerged)",
                     *(f"composed {b}, reads {m}" for b in ("eca", "xattn") for m in ("all", "prompt")),
                     "composed eca, reads prompt, small layers 1", "composed xattn, reads prompt, small layers 1",
                     "row_x"}
    assert sorted(r["batch"] for r in rows) == sorted([1, 2] * len(names))
    # decode ms is a difference of two timings (N tokens minus 1): 24 tokens keep it clear of timer noise
    assert all(r["tokens_per_s"] > 0 and r["decode_ms_per_token"] > 0 for r in rows)
    assert {r["prompts"] for r in rows if r["batch"] == 1} == {2}  # --prompts-at-1
    assert {r["prompts"] for r in rows if r["batch"] == 2} == {3}
    assert "| large alone | 1 |" in (out / "results.md").read_text()
