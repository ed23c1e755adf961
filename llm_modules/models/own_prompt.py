"""The own head's prompt (`head="own"`): the small side is in its own tokenizer's ids, the large model reads the
prompt's text re-tokenized by its own tokenizer (a sequence of its own length and positions), and every small
position reads the large states of its row's whole prompt, as a decoder reads its encoder's output.

The same functions serve training (from the model's own large pass or from cached states) and decoding
(`composed_stepper.OwnHeadStepper`), so the large model reads the same ids in both.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.bridges import LargeRead, LargeView
from llm_modules.errors import LLMModulesError
from llm_modules.models.composed_stepper import last_real
from llm_modules.tensors import answer_start as first_label
from llm_modules.tensors import positions_from_mask, right_pad


def retokenize(ids: list[int], source: Any, target: Any) -> list[int]:
    """The text of `ids` (the `source` tokenizer's) in the `target` tokenizer's ids.

    The source's own leading ids (its BOS, if it puts one before every text) are dropped; other special
    tokens stay in the text (a chat template's markers); the target adds its own leading ids, if any."""
    lead = _leading_ids(source)
    if lead and ids[: len(lead)] == lead:
        ids = ids[len(lead):]
    text = source.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return list(target(text, add_special_tokens=True)["input_ids"])


def _leading_ids(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts before any text (e.g. Llama's BOS); usually none."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    n = len(with_special) - len(plain)
    return with_special[:n] if n > 0 and with_special[n:] == plain else []


def large_prompt_ids(model: Any, prompt: list[int]) -> list[int]:
    """One prompt in the small tokenizer's ids -> in the large tokenizer's (the same text)."""
    ids = retokenize(prompt, model.small_tokenizer, model.large_tokenizer)
    if not ids:
        raise LLMModulesError("head 'own': a prompt whose text is empty leaves the large model nothing to read")
    if model.large_max_positions is not None and len(ids) > model.large_max_positions:
        raise LLMModulesError(f"a prompt of {len(ids)} large-model tokens is longer than the large model can "
                              f"position ({model.large_max_positions}); shorten the input")
    return ids


def large_prompt(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 answer_start: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt (its real tokens before `answer_start` in input_ids (B, T), mask (B, T) or more columns,
    the last T taken) in the large tokenizer's ids, right-padded: (B, P) ids and 0/1 mask."""
    batch, length = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -length:]
    starts = torch.as_tensor(answer_start).reshape(-1).expand(batch).tolist()
    rows = [large_prompt_ids(model, [i for i, keep in zip(ids[:start], real[:start]) if keep])
            for ids, real, start in zip(input_ids.tolist(), mask.tolist(), starts)]
    return right_pad(rows, 0, model.device)  # the pad id is never read: masked


def read(model: Any, large_read: LargeRead, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
         labels: torch.Tensor | None, large_states: torch.Tensor | None, length: int
         ) -> tuple[torch.Tensor, torch.Tensor, LargeView]:
    """What the bridge reads for T new small positions: (the bridge states (B, P, Kb, dL) this call adds as keys,
    their key mask (B, P), the view of the T positions: each its row's last prompt position, so every prompt key).

    Without `large_read.mask` the prompts (the tokens before `answer_start`, else before the first label) are
    re-tokenized: the large model reads them, or `large_states` are theirs, right-padded (training from cached
    states; another width is refused). Decoding after a prefill passes `large_read.view` and `.mask` (the
    prompt's keys are in the bridge's cache) with large_states (B, 0, K, dL)."""
    if input_ids is None:
        raise LLMModulesError("head 'own': pass input_ids (the small tokenizer's ids)")
    if large_read.source is not None:
        raise LLMModulesError("head 'own' reads its prompt's large states whole; a lagged source does not apply")
    key_mask = large_read.mask
    if key_mask is None:
        if large_read.view is not None:
            raise LLMModulesError("a view after a cache needs LargeRead.mask, the cached prompt keys' mask")
        if large_read.answer_start is None and labels is None:
            raise LLMModulesError("this model reads the large model's states of the prompt only (head 'own'): pass "
                                  "labels, or forward_read(LargeRead(answer_start=...)) with where each row's "
                                  "answer starts")
        start = large_read.answer_start if large_read.answer_start is not None else first_label(labels)
        large_ids, key_mask = large_prompt(model, input_ids, attention_mask, start)  # (B, P) each
        if large_states is None:
            large_states, _ = model.encode_large(large_ids, key_mask, positions_from_mask(key_mask))  # (B, P, K, dL)
        elif large_states.shape[1] != key_mask.shape[1]:
            raise LLMModulesError(f"large_states cover {large_states.shape[1]} positions, but the longest prompt "
                                  f"re-tokenized for the large model has {key_mask.shape[1]}")
    elif large_states is None:
        raise LLMModulesError("LargeRead.mask says which of the given large_states are real: pass them ((B, 0, K, "
                              "dL) after a cache)")
    if large_states.dim() == 3:  # one tap
        large_states = large_states[:, :, None]  # (B, P, 1, dL)
    if large_states.shape[2] != len(model.large_taps):
        raise LLMModulesError(f"large_states hold {large_states.shape[2]} layers; this model reads "
                              f"{len(model.large_taps)} (hidden states {model.large_taps})")
    key_mask = key_mask.to(model.device)
    states = large_states[:, :, model.bridge_taps].to(model.device, model.small.dtype)  # (B, P, Kb, dL)
    if large_read.view is not None:
        view = large_read.view
        return states, key_mask, LargeView(view.source.to(model.device), view.states.to(model.device, states.dtype))
    if key_mask.shape != states.shape[:2]:
        raise LLMModulesError(f"the large prompt's mask has shape {tuple(key_mask.shape)}; its states "
                              f"{tuple(states.shape[:2])}")
    batch = states.shape[0]
    last = last_real(key_mask)  # (B,) each row's last prompt position
    picked = states[torch.arange(batch, device=model.device), last]  # (B, Kb, dL)
    return states, key_mask, LargeView(last[:, None].expand(batch, length),  # (B, T)
                                       picked[:, None].expand(batch, length, -1, -1))  # (B, T, Kb, dL)
