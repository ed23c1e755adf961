"""Speculative decoding with an EAGLE-3 drafter: greedy output is the target's own (rows joining and leaving, a
noise drafter, prompt lookup in front), the drafts after every rollback equal a recompute from scratch, and
`--draft` takes an EAGLE-3 folder, ours or one made by speculators' trainer classes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llm_modules.decoding.engine import DecodeBatch
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.eagle3_proposer import Eagle3Proposer
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.decoding.speculative.tree_proposer import TreeProposer
from llm_modules.errors import LLMModulesError
from llm_modules.models.eagle3_folder import save_eagle3
from llm_modules.models.loading import DraftOptions, RunnableModel, load_drafter

from ..helpers import (
    decode_rows,
    eagle3_taps,
    tiny_eagle3,
    tiny_eagle3_target,
    vllm_env,
    vllm_python,
)

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "eagle3_reference.py"


def _prompts(n=4, seed=1, repeat=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(3, 100, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(p * 3 if repeat else p)
    return out


def _alone(target, prompts, options):
    return decode_rows(DecodeBatch(target), prompts, options)


@pytest.fixture(scope="module")
def pair():
    target = tiny_eagle3_target().double()
    return target, tiny_eagle3(target).double()


def test_greedy_output_is_the_targets_own_with_rows_joining_and_leaving(pair):
    target, drafter = pair
    prompts = _prompts(n=6, seed=4) + [[7]]  # a one-token prompt: no column until its first round
    options = [SamplingOptions(max_new_tokens=n) for n in (5, 14, 9, 11, 3, 13, 8)]
    alone = _alone(target, prompts, options)
    for k, join_at in ((1, None), (3, 0), (3, 2), (4, 5)):
        spec = SpeculativeBatch(target, Eagle3Proposer(drafter, draft_tokens=k))
        assert decode_rows(spec, prompts, options, join_at=join_at) == alone, (k, join_at)
        assert spec.stats.drafted == k * spec.stats.row_passes


def test_a_noise_drafter_still_gives_the_targets_output(pair):
    target, _ = pair
    noise = tiny_eagle3(target, seed=9, scale=3.0).double()
    prompts = _prompts(seed=7)
    options = [SamplingOptions(max_new_tokens=10)] * 4
    spec = SpeculativeBatch(target, Eagle3Proposer(noise, draft_tokens=4))
    assert decode_rows(spec, prompts, options) == _alone(target, prompts, options)
    assert spec.stats.accepted < spec.stats.drafted / 4


def _reference_drafts(target, drafter, tokens: list[int], k: int) -> list[int]:
    """K greedy drafts after `tokens` (the last one not yet read by the target), recomputed from scratch: the
    target's taps over all but the last token, one forward of the drafter over them, then K - 1 fed-back steps."""
    ids = torch.tensor([tokens])
    n = len(tokens) - 1
    with torch.no_grad():
        fused = drafter.fuse(eagle3_taps(target, ids[:, :n], drafter.config.taps))
        out, cache = drafter(ids[:, 1:], fused, torch.arange(n)[None], torch.ones(1, n))
        out, drafts = out[:, -1:], []
        for j in range(k):
            token = drafter.draft_ids[drafter.head(out[0, 0]).argmax()]
            drafts.append(int(token))
            if j + 1 < k:
                out, cache = drafter(token.view(1, 1), drafter.feedback(out), torch.tensor([[n + j]]),
                                     torch.ones(1, n + j + 1), cache)
    return drafts


def test_the_drafts_after_every_rollback_equal_a_recompute_from_scratch(pair):
    """Prompt lookup in front makes rows keep 0..K drafts per pass, so the drafter's cache is rolled back by
    different amounts per row; its drafts must still be what a fresh run over the verified tokens gives."""
    target, drafter = pair
    k = 3
    proposer = Eagle3Proposer(drafter, draft_tokens=k)
    checked = []
    original = proposer.propose

    def checking(first, kk, rows):
        drafts, q = original(first, kk, rows)
        for i, seq in enumerate(rows):
            want = _reference_drafts(target, drafter, seq.prompt + seq.tokens, kk)
            assert drafts[i].tolist() == want
            checked.append(len(seq.tokens))
        return drafts, q

    proposer.propose = checking
    batch = SpeculativeBatch(target, TreeProposer(proposer, PromptLookup(100, draft_tokens=k)), draft_tokens=k)
    prompts = _prompts(n=3, seed=2, repeat=True)
    options = [SamplingOptions(max_new_tokens=n) for n in (12, 7, 10)]
    assert decode_rows(batch, prompts, options, join_at=1) == _alone(target, prompts, options)
    assert checked and 0 < batch.stats.accepted  # some rows kept lookup's copies: rollbacks of several sizes


def _runnable(target):
    return RunnableModel(target, SimpleNamespace(pad_token_id=0), composed=False)


def test_draft_takes_our_eagle3_folder_and_refuses_a_tap_past_the_last_layer(pair, tmp_path):
    target, drafter = pair
    save_eagle3(drafter, tmp_path / "ours")
    proposer = load_drafter(DraftOptions(str(tmp_path / "ours"), tokens=2, lookup=False, width=1, adaptive=False), _runnable(target),
                            "tiny")
    assert isinstance(proposer, Eagle3Proposer) and proposer.taps == [2, 4, 5] and proposer.draft_tokens == 2
    prompts, options = _prompts(seed=3), [SamplingOptions(max_new_tokens=8)] * 4
    assert decode_rows(SpeculativeBatch(target, proposer), prompts, options) == _alone(target, prompts, options)
    bad = tiny_eagle3(target, taps=[2, 4, 8])
    save_eagle3(bad, tmp_path / "bad")
    with pytest.raises(LLMModulesError, match="tap L is the state before the final norm"):
        load_drafter(DraftOptions(str(tmp_path / "bad"), lookup=False), _runnable(target), "tiny")


@pytest.mark.vllm
@pytest.mark.subprocess
def test_draft_decodes_with_a_folder_made_by_speculators_trainer_classes(tmp_path):
    """Another trainer's drafter (speculators' Eagle3DraftModel.from_training_args + save_pretrained) runs in our
    engine through --draft, with the target's greedy output."""
    python = vllm_python()
    target = tiny_eagle3_target()
    target.save_pretrained(tmp_path / "target")
    done = subprocess.run([str(python), str(REFERENCE), "build", str(tmp_path / "target"), str(tmp_path / "theirs"),
                           "40"], capture_output=True, text=True, env=vllm_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    proposer = load_drafter(DraftOptions(str(tmp_path / "theirs"), lookup=False, width=1, adaptive=False), _runnable(target),
                            str(tmp_path / "target"))
    assert isinstance(proposer, Eagle3Proposer) and proposer.draft_tokens == 3  # the K its folder names
    assert proposer.network.config.norm_before_residual and proposer.network.config.draft_vocab_size == 40
    prompts, options = _prompts(seed=5), [SamplingOptions(max_new_tokens=9)] * 4
    spec = SpeculativeBatch(target, proposer)
    assert decode_rows(spec, prompts, options) == _alone(target, prompts, options)
    assert spec.stats.passes > 0


def test_sampled_rows_decode_beside_greedy_ones(pair):
    """A sampled row gets the drafter's probabilities over the target's vocabulary (zero outside the draft
    vocabulary) for the acceptance rule; a greedy row beside it still gets the target's own tokens."""
    target, drafter = pair
    prompts = _prompts(n=2, seed=8)
    options = [SamplingOptions(max_new_tokens=9, do_sample=True, seed=3), SamplingOptions(max_new_tokens=9)]
    proposer = Eagle3Proposer(drafter, draft_tokens=3)
    seen = []
    original = proposer.propose

    def spy(first, k, rows):
        drafts, q = original(first, k, rows)
        seen.append(q)
        return drafts, q

    proposer.propose = spy
    got = decode_rows(SpeculativeBatch(target, proposer), prompts, options)
    assert len(got[0]) == 9 and got[1] == _alone(target, prompts[1:], options[1:])[0]
    q = next(x for x in seen if x is not None)  # (B, k, V)
    assert q.shape[-1] == 100 and torch.allclose(q.sum(-1), torch.ones(q.shape[:2], dtype=q.dtype))
    outside = torch.ones(100, dtype=torch.bool)
    outside[drafter.draft_ids] = False
    assert float(q[0][:, outside].abs().sum()) == 0.0
