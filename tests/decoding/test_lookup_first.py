"""Prompt lookup first, the drafter elsewhere (`LookupFirst`): each row takes one source's drafts per pass,
greedy output is the target's own, the drafter stays in step (drafting one token in passes where every row
copies), and sampled rows follow the target's distribution."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_modules import LLMModulesModel
from llm_modules.bridges import LargeRead
from llm_modules.decoding.engine import DecodeBatch, Sequence
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.lookup_first import LookupFirst
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import draft_source

from ..helpers import OPTIONS, decode_rows, nudge_gates


def _model(pair, bridge="eca", noise=False):
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=pair["large"], small=pair["small"], bridge=bridge, small_inputs="mapped",
                                    head="projected", **OPTIONS[bridge])
    nudge_gates(model)
    if noise:
        with torch.no_grad():
            model.head.up.weight.normal_(0, 5.0)  # the drafter's drafts are noise
    return model.double().eval()


def _hybrid(model, k, min_match=2):
    return LookupFirst(ComposedProposer(model, draft_tokens=k), PromptLookup(model.vocab_size, draft_tokens=k),
                       min_match)


def _prompts(vocab, seed):
    """Three prompts that repeat a span (lookup can copy at once) and three random ones, interleaved."""
    g = torch.Generator().manual_seed(seed)
    spans = [torch.randint(3, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
             for _ in range(3)]
    randoms = [torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(3)]
    return [p for pair in zip([s * 3 + s[:2] for s in spans], randoms) for p in pair]


def _recording(hybrid):
    """Per pass, the n-gram lookup matched per row and the k the drafter drafted (spies on both)."""
    seen = {"matched": [], "k": []}
    propose, inner = hybrid.propose, hybrid.drafter.propose

    def outer(first, k, rows):
        out = propose(first, k, rows)
        seen["matched"].append(list(hybrid.lookup.matched))
        return out

    def drafter(first, k, rows):
        seen["k"].append(k)
        return inner(first, k, rows)

    hybrid.propose, hybrid.drafter.propose = outer, drafter
    return seen


# ---------------------------------------------------------------------- which rows take which drafts
class Fixed:
    """A drafter that proposes 50 + row index at every position, with probability 0.5 on it."""

    taps: list[int] = []
    draft_tokens = 3

    def __init__(self, vocab):
        self.vocab, self.asked = vocab, []

    def join(self, rows, ids, mask, states):
        pass

    def propose(self, first, k, rows):
        self.asked.append(k)
        drafts = (50 + torch.arange(first.shape[0]))[:, None].expand(-1, k)
        q = torch.full((first.shape[0], k, self.vocab), 0.5 / (self.vocab - 1))
        q.scatter_(2, drafts[..., None], 0.5)
        return drafts, q

    def commit(self, accepted, tokens, states):
        pass

    def keep(self, index):
        pass


def test_rows_with_a_long_enough_match_take_the_copy_and_the_others_the_drafters_drafts():
    drafter = Fixed(vocab=60)
    hybrid = LookupFirst(drafter, PromptLookup(60, draft_tokens=3))
    contexts = [[1, 2, 3, 4, 5, 1, 2],  # + 3: the 3-gram (1, 2, 3) recurs -> copies 4, 5, 1
                [9, 8, 7, 6, 5, 4, 3],  # + 9: only the 1-gram (9) recurs -> the drafter
                [0, 0, 7, 6, 1, 2, 3]]  # + 5: nothing recurs -> the drafter
    width = 7
    hybrid.join([None] * 3, torch.tensor(contexts), torch.ones(3, width, dtype=torch.long), None)
    rows = [Sequence([1], SamplingOptions(max_new_tokens=4, do_sample=True), []) for _ in range(3)]
    drafts, q = hybrid.propose(torch.tensor([3, 9, 5]), 3, rows)
    assert hybrid.lookup.matched == [3, 1, 0]
    assert drafts.tolist() == [[4, 5, 1], [51, 51, 51], [52, 52, 52]] and drafter.asked == [3]
    assert torch.equal(q[0], torch.nn.functional.one_hot(torch.tensor([4, 5, 1]), 60).float())  # lookup's q
    assert torch.allclose(q[1:, :, 51:53].amax(-1), torch.tensor(0.5, dtype=q.dtype))  # the drafter's
    assert hybrid.counts() == {"lookup_rows": 1, "drafter_rows": 2, "passes": 1, "light_passes": 0}
    # every row copies: the drafter is asked for one token only, the drafts and q are lookup's
    hybrid.keep([0])
    drafts, q = hybrid.propose(torch.tensor([3]), 3, rows[:1])
    assert drafts.tolist() == [[4, 5, 1]] and drafter.asked == [3, 1] and q.shape == (1, 3, 60)
    assert hybrid.counts() == {"lookup_rows": 2, "drafter_rows": 2, "passes": 2, "light_passes": 1}
    # min_match 1: the 1-gram row copies too
    assert LookupFirst(Fixed(60), PromptLookup(60), min_match=1).min_match == 1
    with pytest.raises(LLMModulesError, match="min_match"):
        LookupFirst(Fixed(60), PromptLookup(60, max_ngram=3), min_match=4)


# ---------------------------------------------------------------------- the target's own tokens
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("join_at", [None, 2])
def test_greedy_output_is_the_targets_own_with_a_noise_drafter(mapped_pair, k, join_at):
    model = _model(mapped_pair, noise=True)
    target = model.large
    prompts = _prompts(model.vocab_size, seed=1)
    options = [SamplingOptions(max_new_tokens=n) for n in (20, 9, 25, 14, 30, 12)]
    alone = decode_rows(DecodeBatch(target), prompts, options)
    hybrid = _hybrid(model, k)
    seen = _recording(hybrid)
    spec = SpeculativeBatch(target, hybrid)
    assert decode_rows(spec, prompts, options, join_at=join_at) == alone
    counts = hybrid.counts()
    assert counts["lookup_rows"] > 0 and counts["drafter_rows"] > 0 and counts["passes"] == spec.stats.passes
    assert counts["lookup_rows"] + counts["drafter_rows"] == spec.stats.row_passes
    # a row took lookup's copy exactly when its match was 2 tokens or more
    assert counts["lookup_rows"] == sum(n >= 2 for m in seen["matched"] for n in m)
    if join_at is not None:  # rows that joined late have no match yet while the others copy: mixed passes
        assert any(len({n >= 2 for n in m}) == 2 for m in seen["matched"])


def test_a_pass_where_every_row_copies_steps_the_drafter_one_token(mapped_pair):
    model = _model(mapped_pair)
    target = model.large
    prompts = _prompts(model.vocab_size, seed=1)
    options = [SamplingOptions(max_new_tokens=n) for n in (20, 9, 25, 14, 30, 12)]
    alone = decode_rows(DecodeBatch(target), prompts, options)
    hybrid = _hybrid(model, 3)
    seen = _recording(hybrid)
    assert decode_rows(SpeculativeBatch(target, hybrid), prompts, options) == alone
    light = [all(n >= 2 for n in m) for m in seen["matched"]]
    assert any(light) and not all(light)
    assert seen["k"] == [1 if all_copy else 3 for all_copy in light]
    assert hybrid.light_passes == sum(light)


@pytest.mark.parametrize("bridge", ["eca", "ladder", "xattn"])
def test_the_drafter_after_passes_it_did_not_draft_equals_a_fresh_recompute(mapped_pair, bridge):
    """After rounds drafted by the drafter and rounds copied by lookup (the drafter drafting one token), the
    drafter's next logits equal the same model run from scratch over the verified tokens, with the target's
    states and the sources it trained with (one block per round)."""
    k = 3
    model = _model(mapped_pair, bridge)
    target = model.large
    prompt = _prompts(model.vocab_size, seed=1)[1]  # random: the drafter drafts the first rounds
    hybrid = _hybrid(model, k)
    seen = _recording(hybrid)
    accepted = []
    commit = hybrid.drafter.commit
    hybrid.drafter.commit = lambda a, tokens, states: accepted.extend(a.tolist()) or commit(a, tokens, states)
    spec = SpeculativeBatch(target, hybrid)
    seq = Sequence(prompt, SamplingOptions(max_new_tokens=60), [])
    spec.add([seq])
    for _ in range(6):
        spec.step()
    assert 1 in seen["k"] and k in seen["k"] and max(accepted) > 0
    inner = hybrid.drafter
    probe = copy.copy(inner)  # the same model; a copy of the decoding state
    probe.cache, probe.chunk, probe.chunk_states = copy.deepcopy(inner.cache), list(inner.chunk), list(inner.chunk_states)
    captured = []
    probe._choose = lambda logits, *rest: (captured.append(logits) or (logits.argmax(-1), None))
    ComposedProposer.propose(probe, torch.tensor(spec.pending), 1, [seq])  # not the spies on the drafter
    tokens = prompt + seq.tokens + spec.pending
    n = len(prompt)
    source = draft_source((n - 1) % k, k, 1, n)[0].tolist()
    start = n
    for a in accepted:
        source += [start - 1] * (a + 1)
        start += a + 1
    source.append(start - 1)  # the pending token reads up to the last verified one
    assert len(source) == len(tokens)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        states, _ = model.encode_large(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        fresh = model.forward_read(LargeRead(source=torch.tensor([source])), input_ids=ids,
                                   large_states=states).logits[0, -1]
    torch.testing.assert_close(captured[0][0].double(), fresh.double(), rtol=0, atol=1e-9)


# ---------------------------------------------------------------------- the target's distribution
SAMPLES = 1200


def _joint(target, prompt, options):
    """The target's exact distribution of its first two tokens, with the same processors."""
    base = Sequence(prompt, options, [])
    with torch.no_grad():
        first = base.processors(torch.tensor([prompt]), target(torch.tensor([prompt])).logits[:, -1].float())[0]
        p1 = torch.softmax(first, -1)
        joint = {}
        for t1 in torch.nonzero(p1 > 0).flatten().tolist():
            ids = torch.tensor([prompt + [t1]])
            second = base.processors(ids, target(ids).logits[:, -1].float())[0]
            for t2, p2 in enumerate(torch.softmax(second, -1).tolist()):
                if p2 > 0:
                    joint[(t1, t2)] = float(p1[t1]) * p2
    return joint


def _prompt_with_a_likely_copy(target, vocab, options):
    """A prompt [z, t, w, ..., z] after which the target draws t, then w, each with a probability between 0.2 and
    0.8 (top-k 3): rows whose first token is t copy w, which the target often keeps."""
    g = torch.Generator().manual_seed(8)

    def likely(ids, besides):  # the target's likeliest token after ids, other than those given
        with torch.no_grad():
            logits = target(torch.tensor([ids])).logits[0, -1]
        return next(i for i in logits.argsort(descending=True).tolist() if i not in besides)

    for _ in range(20):
        z, t, w, *rest = torch.randint(3, vocab, (7,), generator=g).tolist()
        for _ in range(3):  # t and w as the prompt they are part of makes them
            t = likely([z, t, w] + rest + [z], {z, *rest})
            w = likely([z, t, w] + rest + [z, t], {z, t, *rest})
        prompt = [z, t, w] + rest + [z]
        if len(set(prompt)) < len(prompt) - 1:  # only z twice: (z, t) is the one 2-gram that can recur
            continue
        joint = _joint(target, prompt, options)
        p_t = sum(v for (t1, _), v in joint.items() if t1 == t)
        if 0.2 < p_t < 0.8 and 0.2 < joint.get((t, w), 0) / p_t < 0.8:
            return prompt, joint
    pytest.fail("no prompt found")


def test_sampled_tokens_follow_the_targets_distribution_when_rows_take_different_sources(mapped_pair):
    """The prompt holds (z, t, w): rows whose first token is t copy w, the others take the drafter's draft (a q
    that is not lookup's one-hot would keep w too often). The first two sampled tokens (top-k 3, 9 cells) over
    1200 seeds: chi-square against the target's exact joint, p = 0.001 (26.1 for 8 degrees of freedom; cells merged up to 5 expected)."""
    model = _model(mapped_pair).float()
    target = model.large
    options = SamplingOptions(max_new_tokens=2, do_sample=True, temperature=1.5, top_k=3)
    prompt, joint = _prompt_with_a_likely_copy(target, model.vocab_size, options)
    seqs = [Sequence(prompt, options, [], generator=torch.Generator().manual_seed(seed)) for seed in range(SAMPLES)]
    hybrid = _hybrid(model, 2)
    batch = SpeculativeBatch(target, hybrid)
    batch.add(seqs)
    while batch.rows:
        batch.step()
    assert hybrid.lookup_rows > 100 and hybrid.drafter_rows > 100  # both sources drafted, in the same pass
    counts = dict.fromkeys(joint, 0)
    for seq in seqs:
        counts[tuple(seq.tokens)] += 1
    chi2, merged_e, merged_o = 0.0, 0.0, 0
    for cell in sorted(joint, key=joint.get):
        merged_e += joint[cell] * SAMPLES
        merged_o += counts[cell]
        if merged_e >= 5:
            chi2 += (merged_o - merged_e) ** 2 / merged_e
            merged_e, merged_o = 0.0, 0
    assert chi2 < 26.1, chi2  # p = 0.001 for up to 8 degrees of freedom
