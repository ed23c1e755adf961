"""Fixtures shared by the tests of the target's generated answers."""

from __future__ import annotations

import pytest

from llm_modules.training import generated


@pytest.fixture
def counted(monkeypatch):
    """Answers generated 3 prompts a batch; `calls["n"]` counts the batches generated, and the
    generation dies (KeyboardInterrupt, as a Ctrl-C or a kill) at batch `calls["die_at"]`."""
    monkeypatch.setattr(generated, "GENERATE_BATCH", 3)
    real, calls = generated.answer_batch, {"n": 0, "die_at": None}

    def answer_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generated, "answer_batch", answer_batch)
    return calls
