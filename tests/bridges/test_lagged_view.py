"""A lagged (or otherwise restricted) view of the large model: position t reads the large states up to its
source only, for every bridge; no leak through the mask, and the default source changes nothing."""

from __future__ import annotations

import pytest
import torch

from llm_modules.bridges import LargeRead
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import draft_source, lagged_source

from ..helpers import COMBOS
from ..helpers import compose_pair as compose
from ..helpers import nudge_gates as nudge


def read(model, source, **inputs):
    """The model's forward with lagged reads: position t reads the large states up to source[:, t]."""
    return model.forward_read(LargeRead(source=source), **inputs)


def _model(pair, bridge, inputs):
    model = compose(pair, bridge, inputs, head="projected")
    nudge(model)
    return model.double()


def _inputs(model, batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    states, _ = model.encode_large(ids, mask, torch.arange(length)[None].expand(batch, -1))
    return ids, mask, states  # states (B, T, K, dL)


@pytest.mark.parametrize("bridge, inputs", COMBOS)
def test_the_own_position_as_source_changes_nothing(mapped_pair, bridge, inputs):
    model = _model(mapped_pair, bridge, inputs)
    ids, mask, states = _inputs(model)
    plain = model(input_ids=ids, attention_mask=mask, large_states=states).logits
    own = read(model, lagged_source(0, *ids.shape), input_ids=ids, attention_mask=mask, large_states=states).logits
    torch.testing.assert_close(own, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lag", [1, 3])
@pytest.mark.parametrize("bridge, inputs", COMBOS)
def test_a_lag_of_j_reads_nothing_of_the_last_j_states(mapped_pair, bridge, inputs, lag):
    """Position t under lag j equals a model that was never shown states after t - j (they are noise)."""
    model = _model(mapped_pair, bridge, inputs)
    ids, mask, states = _inputs(model)
    source = lagged_source(lag, *ids.shape)
    lagged = read(model, source, input_ids=ids, attention_mask=mask, large_states=states).logits
    g = torch.Generator().manual_seed(5)
    for t in range(ids.shape[1]):
        hidden = states.clone()
        hidden[:, max(t - lag + 1, 0):] = torch.randn(hidden[:, max(t - lag + 1, 0):].shape, generator=g,
                                                       dtype=hidden.dtype) * 3
        blind = read(model, source, input_ids=ids, attention_mask=mask, large_states=hidden).logits
        torch.testing.assert_close(blind[:, t], lagged[:, t], rtol=0, atol=1e-10)
    # and the lag is real: reading the states up to t differs from reading them up to t - j
    own = model(input_ids=ids, attention_mask=mask, large_states=states).logits
    assert (own[:, lag:] - lagged[:, lag:]).abs().max() > 1e-4


@pytest.mark.parametrize("bridge, inputs", COMBOS)
def test_drafting_blocks_read_nothing_after_their_frontier(mapped_pair, bridge, inputs):
    """The drafter's training pattern (`draft_source`): in each block of K positions every position reads
    the states up to the block's frontier only; noise after the frontier changes nothing in the block."""
    model = _model(mapped_pair, bridge, inputs)
    ids, mask, states = _inputs(model, length=11)
    source = draft_source(torch.tensor([0, 2]), 3, *ids.shape)
    assert source[0].tolist() == [-1, 0, 0, 0, 3, 3, 3, 6, 6, 6, 9]
    assert source[1].tolist() == [-1, -1, -1, 2, 2, 2, 5, 5, 5, 8, 8]
    out = read(model, source, input_ids=ids, attention_mask=mask, large_states=states).logits
    g = torch.Generator().manual_seed(5)
    for t in range(ids.shape[1]):
        for row in range(2):
            frontier = int(source[row, : t + 1].max())  # what position t reads, through itself and those before it
            hidden = states.clone()
            hidden[row, frontier + 1:] = torch.randn(hidden[row, frontier + 1:].shape, generator=g,
                                                     dtype=hidden.dtype) * 3
            blind = read(model, source, input_ids=ids, attention_mask=mask, large_states=hidden).logits
            torch.testing.assert_close(blind[row, t], out[row, t], rtol=0, atol=1e-10)


def test_left_padding_is_never_a_source(mapped_pair):
    model = _model(mapped_pair, "xattn", "mapped")
    ids, mask, states = _inputs(model, batch=1, length=8)
    padded_ids = torch.cat([torch.full((1, 3), 0), ids], 1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), mask], 1)
    padded_states = torch.cat([torch.randn(1, 3, *states.shape[2:], dtype=states.dtype) * 5, states], 1)
    alone = read(model, lagged_source(2, *ids.shape), input_ids=ids, attention_mask=mask, large_states=states).logits
    padded = read(model, lagged_source(2, *padded_ids.shape), input_ids=padded_ids, attention_mask=padded_mask,
                  large_states=padded_states).logits
    torch.testing.assert_close(padded[:, 3:], alone, rtol=0, atol=1e-10)


def test_the_residual_head_cannot_read_a_lagged_view(mapped_pair):
    model = compose(mapped_pair, "eca", "mapped", head="residual")
    ids, mask, states = _inputs(model)
    with pytest.raises(LLMModulesError, match="residual head"):
        read(model, lagged_source(1, *ids.shape), input_ids=ids, attention_mask=mask, large_states=states)
