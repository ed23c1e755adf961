"""benchmarks/lookup_replay.py: its "ours now" rule is the library's prompt lookup, and the replay counts passes
as greedy speculative decoding keeps tokens."""

from __future__ import annotations

import random

from llm_modules.decoding.speculative.prompt_lookup import (
    PromptLookup,
    find_continuation,
)

from ..helpers import load_benchmark


def load_script():
    return load_benchmark("lookup_replay")


def test_the_rule_marked_ours_is_the_librarys_prompt_lookup():
    script = load_script()
    longest, shortest, first, extend = script.RULES["first, n 3..1 (ours now)"]
    defaults = PromptLookup(10)
    assert (longest, shortest) == (defaults.max_ngram, defaults.min_ngram) and first and extend
    rng = random.Random(0)
    differs = 0
    for _ in range(300):
        context = [rng.randrange(5) for _ in range(rng.randrange(2, 30))]
        k = rng.randrange(1, 8)
        ours = script.match(context, k, longest, shortest, first)
        assert ours == find_continuation(context, k)
        differs += ours != script.match(context, k, longest, shortest, False)
    assert differs > 0  # the contexts tell the first occurrence from the most recent


def test_a_pass_keeps_the_matching_copies_and_the_targets_own_token():
    script = load_script()
    rule = script.RULES["first, n 3..1 (ours now)"]
    prompt = [1, 2, 3, 4, 5, 6]
    assert script.replay(prompt, [7], 4, rule) == (0, 0)  # the prefill gives the only token
    passes, nodes = script.replay(prompt, [2, 3, 4, 5, 6, 9], 10, rule)
    # one pass: the context (prompt, 2) ends in 2, first seen at 1, so lookup copies 3, 4, 5, 6, 2, ... ; the
    # pass keeps 3, 4, 5, 6 (they are the answer's) and the target's own 9
    assert passes == 1 and nodes >= 5
