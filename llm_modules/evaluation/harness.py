"""One evaluation harness for composed models AND plain Hugging Face models.

Scores, on held-out examples: bits per byte of the answer text (the unit every tokenizer shares,
see `data.bits_per_byte`), mean cross-entropy per answer token (and perplexity), and, where
the data has checkable answers, accuracy of greedy generations (final answer extracted by
`answers.extract_final_answer`, checked by the task's own scorer when it has one, else
`answers.answers_match`). Keeps the generations as samples.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from llm_modules.data.answers import answers_match, extract_final_answer
from llm_modules.data.prepare import (
    DataConfig,
    TokenizedExample,
    answer_bytes,
    bits_per_byte,
    collate,
    pad_id,
    prepare_data,
    prompt_length,
)
from llm_modules.decoding.generation import decoding_limits, generate
from llm_modules.decoding.limits import describe_limit
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.errors import LLMModulesError
from llm_modules.losses import next_token_loss
from llm_modules.models.loading import DraftOptions, load_model
from llm_modules.tensors import IGNORE_INDEX, left_pad

logger = logging.getLogger(__name__)


class ComposedScorer:
    """Adapter: a trained `LLMModulesModel`."""

    def __init__(self, model: Any):
        self.model, self.tokenizer = model.eval(), model.tokenizer
        self.max_positions = model.max_positions
        self.device = model.device
        self.drafter = None  # composed models decode alone (--draft drafts for a plain model)

    def decode_limits(self) -> tuple[int | None, int | None]:
        """(positions a prompt and its generation may fill, the model's own limit): `decoding_limits`."""
        return decoding_limits(self.model)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> float:
        return float(self.model(**batch, loss="sum").loss)

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        return self.model.generate(ids, mask, SamplingOptions(max_new_tokens=max_new_tokens),
                                   pad_token_id=self.tokenizer.pad_token_id, fit_to_limit=True)


class PlainScorer:
    """Adapter: any Hugging Face causal LM with its tokenizer (the baselines)."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.drafter = None  # a speculative proposer: generate speculatively (the same tokens)

    def decode_limits(self) -> tuple[int | None, int | None]:
        """(positions a prompt and its generation may fill, less what the drafter reserves; the model's own)."""
        return decoding_limits(self.model, self.drafter)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> float:
        labels = batch.pop("labels")
        logits = self.model(**batch).logits  # (B, T, V)
        return float(next_token_loss(logits, labels, reduction="sum"))

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        return generate(self.model, ids, mask, SamplingOptions(max_new_tokens=max_new_tokens),
                        pad_token_id=pad_id(self.tokenizer), tokenizer=self.tokenizer, drafter=self.drafter,
                        fit_to_limit=True)


def load_scorer(spec: str, device: Any = None, allow_large_mismatch: bool = False,
                dtype: torch.dtype = torch.float32, draft: DraftOptions | None = None,
                cpu_linear: str = "auto") -> ComposedScorer | PlainScorer:
    """The model `spec` names, loaded by `models.loading.load_model` (composed, plain method or plain
    spec), as a scorer; with `draft` (`models.loading.DraftOptions`: a drafter folder or prompt lookup) a plain
    model generates speculatively; `cpu_linear` the kernel of its linear layers on a CPU (`load_model`)."""
    from llm_modules.models.loading import load_drafter

    loaded = load_model(spec, device=device, dtype=dtype, allow_large_mismatch=allow_large_mismatch,
                        cpu_linear=cpu_linear)
    drafter = load_drafter(draft, loaded, spec, allow_large_mismatch) if draft else None  # refuses a composed model
    if loaded.composed:  # a composed --model (as `generate` does)
        return ComposedScorer(loaded.model)
    scorer = PlainScorer(loaded.model, loaded.tokenizer)
    scorer.drafter = drafter
    return scorer


@dataclass
class EvalOptions:
    split: str = "val"  # "val": the fixed validation split; "all": every example (fresh held-out data)
    limit: int = 0  # at most this many examples (0: all)
    max_new_tokens: int = 256
    batch_size: int = 8
    generate: bool = True
    num_samples: int = 5  # generations kept in the result; -1: every one (so accuracy can be re-counted)


def held_out_examples(data: DataConfig, tokenizer: Any, max_positions: int | None, split: str) -> list[TokenizedExample]:
    if split not in ("val", "all"):
        raise LLMModulesError(f"--split must be 'val' or 'all', got {split!r}")
    if split == "all":
        data = DataConfig(**{**data.__dict__, "val_fraction": 0.0})
    prepared = prepare_data(data, tokenizer, max_positions)
    return prepared.val if split == "val" else prepared.train


def prompt_of(example: TokenizedExample) -> list[int]:
    """The example's tokens before its first answer token (the prompt, template included)."""
    return example.input_ids[:prompt_length(example)]


def is_correct(example: TokenizedExample, predicted: str | None, text: str | None = None) -> bool | None:
    """Whether `predicted` (the extracted final answer) is right; None when the example has no answer.

    A task's own scorer decides where there is one; when it rejects the extracted answer, the whole
    stripped generation `text` gets the same scorer (a task whose answer is a short string with
    numbers in it is judged as the task defines). Otherwise `answers_match` against the reference.
    """
    record = example.record
    if record.scorer is not None:
        candidates = [c for c in dict.fromkeys([predicted, text.strip() if text else None]) if c]
        return any(record.scorer(c) >= 1.0 for c in candidates)
    if record.reference is None:
        return None
    return answers_match(predicted, record.reference)


def warn_if_capped(scorer: ComposedScorer | PlainScorer, examples: list[TokenizedExample], new_tokens: int) -> int:
    """Log one line when some prompts leave fewer than `new_tokens` positions: their generations stop at the
    limit (less what a drafter reserves) instead of failing the evaluation. Returns how many (0 for a scorer
    that states no `decode_limits`)."""
    limits = getattr(scorer, "decode_limits", None)
    usable, own = limits() if limits is not None else (None, None)
    if usable is None:
        return 0
    capped = sum(1 for e in examples if len(prompt_of(e)) + new_tokens > usable)
    if capped:
        logger.warning("eval: %d of %d prompts leave fewer than --max-new-tokens %d positions in %s; their "
                       "generations stop at that limit", capped, len(examples), new_tokens,
                       describe_limit(usable, own))
    return capped


@torch.no_grad()
def evaluate(scorer: ComposedScorer | PlainScorer, examples: list[TokenizedExample], options: EvalOptions) -> dict:
    """Loss/perplexity over answer tokens, and generation accuracy where answers are checkable."""
    if options.limit:
        examples = examples[: options.limit]
    if not examples:
        raise LLMModulesError("no held-out examples to evaluate (try --split all or more data)")
    started = time.perf_counter()
    tok = scorer.tokenizer
    pad = pad_id(tok)
    total, count, n_bytes = 0.0, 0, 0
    for start in range(0, len(examples), options.batch_size):
        chunk = examples[start : start + options.batch_size]
        batch = {k: v.to(scorer.device) for k, v in collate(chunk, pad).items()}
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        n_bytes += sum(answer_bytes(e.record) for e in chunk)
        total += scorer.loss_sum(batch)
    loss = total / count
    result: dict[str, Any] = {"examples": len(examples), "answer_tokens": count, "answer_bytes": n_bytes,
                              "bits_per_byte": round(bits_per_byte(total, n_bytes), 5), "loss": round(loss, 5),
                              "perplexity": round(math.exp(min(loss, 50.0)), 3)}
    if options.generate:
        warn_if_capped(scorer, examples, options.max_new_tokens)
        checked, right, samples = 0, 0, []
        for start in range(0, len(examples), options.batch_size):
            chunk = examples[start : start + options.batch_size]
            ids, mask = left_pad([prompt_of(e) for e in chunk], pad, scorer.device)
            out = scorer.generate(ids, mask, options.max_new_tokens)
            for example, row in zip(chunk, out[:, ids.shape[1]:]):
                text = tok.decode(row, skip_special_tokens=True)
                predicted = extract_final_answer(text)
                verdict = is_correct(example, predicted, text)
                if verdict is not None:
                    checked, right = checked + 1, right + int(verdict)
                if options.num_samples < 0 or len(samples) < options.num_samples:
                    question = next(m["content"] for m in example.record.messages if m["role"] == "user")
                    samples.append({"question": question, "reference": example.record.reference,
                                    "model_answer": text, "extracted": predicted, "correct": verdict})
        if checked:
            result.update(accuracy=round(right / checked, 4), correct=right, checked=checked)
        result["samples"] = samples
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
