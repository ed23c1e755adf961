"""`serve --draft`: a request that fails inside a speculative step ends alone with a 500, counted in /health;
the requests decoding beside it finish and the server keeps serving (issue 35, defects 1 and 5)."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from llm_modules.models.composed import LLMModulesModel
from llm_modules.models.drafter import DrafterRecord
from llm_modules.models.loading import DraftOptions

from ..helpers import OPTIONS, ServerThread, nudge_gates, wait_for


@pytest.fixture(scope="module")
def server(mapped_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served_drafter") / "drafter"
    torch.manual_seed(0)
    drafter = LLMModulesModel.compose(large=mapped_pair["large"], small=mapped_pair["small"], bridge="eca",
                                      small_inputs="mapped", head="projected", **OPTIONS["eca"])
    nudge_gates(drafter)
    drafter.save_pretrained(folder)
    DrafterRecord(draft_tokens=2).save(folder)
    with ServerThread(mapped_pair["large"], max_batch=4, max_queue=8, draft=DraftOptions(str(folder))) as running:
        yield running


def complete(url: str, prompt: str, max_tokens: int) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                      timeout=30)


def failed(url: str) -> int:
    return httpx.get(url + "/health", timeout=10).json()["failed"]


def concurrently(calls) -> list:
    """Run the calls on threads at once; their results in order."""
    results = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as err:  # a timeout: the engine stopped answering
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_a_row_failing_in_a_verify_pass_is_a_500_and_its_neighbours_finish(server, monkeypatch):
    engine = server.server.config.app.state.served.engine
    sequence = engine.sequence

    def failing_when_asked_for_7(prompt, options, *args, **kwargs):
        seq = sequence(prompt, options, *args, **kwargs)
        if options.max_new_tokens == 7:  # this request's own computation fails once it has a few tokens
            seq.processors.append(lambda ids, scores: 1 / 0 if ids.shape[1] > len(prompt) + 2 else scores)
        return seq

    before = failed(server.url)
    monkeypatch.setattr(engine, "sequence", failing_when_asked_for_7)
    replies = concurrently([lambda: complete(server.url, "What is 2 plus 3?", 12),
                            lambda: complete(server.url, "What is 4 plus 4?", 7),
                            lambda: complete(server.url, "What is 1 plus 6?", 12)])
    monkeypatch.undo()
    assert all(isinstance(r, httpx.Response) for r in replies), replies
    good, bad, other = replies
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error", bad.text
    for reply in (good, other):
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert failed(server.url) == before + 1
    assert complete(server.url, "What is 5 plus 1?", 4).status_code == 200  # still serving


def test_a_prompt_whose_prefill_fails_is_a_500_and_the_prompts_joining_with_it_finish(server, monkeypatch):
    engine = server.server.config.app.state.served.engine
    run, run_tree = engine.batch.stepper.run, engine.batch.stepper.run_tree
    held = []

    def limited(ids, mask, cache, *rest, **kw):
        if cache is None and ids.shape[1] > 40:  # the target's prefill of one long prompt fails
            raise IndexError("index out of range in self")
        return run(ids, mask, cache, *rest, **kw)

    def holding(*args, **kw):
        if not held:  # hold the first verify pass until three requests wait: they join at once
            held.append(wait_for(lambda: len(engine._waiting) >= 3, timeout=20, what="three waiting requests"))
        return run_tree(*args, **kw)

    before = failed(server.url)
    monkeypatch.setattr(engine.batch.stepper, "run", limited)
    monkeypatch.setattr(engine.batch.stepper, "run_tree", holding)
    long_prompt = "What is 2 plus 3? " * 12
    blocker = threading.Thread(target=complete, args=(server.url, "What is 3 plus 3?", 4))
    blocker.start()
    wait_for(lambda: engine.stats.running >= 1, timeout=20, what="the first request decoding")
    replies = concurrently([lambda: complete(server.url, "What is 2 plus 3?", 6),
                            lambda: complete(server.url, long_prompt, 6),
                            lambda: complete(server.url, "What is 1 plus 6?", 6)])
    blocker.join()
    monkeypatch.undo()
    assert held, "the three requests did not join together"
    good, bad, other = replies
    assert bad.status_code == 500, bad.text
    assert good.status_code == 200 and other.status_code == 200, (good.text, other.text)
    assert failed(server.url) == before + 1
