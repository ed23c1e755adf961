"""The drafter method: the composed model trained to draft the large model's next tokens (speculative decoding).

While drafting, the large model's states exist only up to the last verified token: the drafter writes
K tokens after it reading nothing newer. Training shows it exactly that (EAGLE, Tandem): the positions of
each example fall in blocks of K (`tensors.draft_source`), every position of a block reading the large
states up to the position just before the block, the first block starting at a random offset in [0, K)
drawn per example and step, so each position is trained at every lag 1..K over the steps. The offsets are
a pure function of (seed, step, example), hence the same on resume, on any number of processes and with
any gradient accumulation.

The target is the large model's own next-token distribution, not the data set's text: its logits
large_head(final hidden state), the final state cached beside the bridge's taps (no extra large-model
pass; the cache key covers the taps). The loss is KL(target || drafter) (`kl`) or cross-entropy on the
target's arg-max (`ce`), over the answer positions, the vocabulary projection chunked like the composed
model's training loss. Validation reports that loss and the top-1 agreement (val_agreement: the fraction
of answer positions where the drafter's arg-max is the target's), the acceptance rate of greedy drafting.
With `--drafter-targets generated` the training text is the large model's own greedy answers
(`training.generated`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_modules.bridges import LargeRead
from llm_modules.decoding.speculative.composed_proposer import draft_vocabulary
from llm_modules.models.drafter import DrafterRecord, save_draft_vocab
from llm_modules.tensors import IGNORE_INDEX, draft_source
from llm_modules.training.objectives.composed import ComposedObjective, TrainedParts

logger = logging.getLogger(__name__)


def draft_loss(model: Any, s: torch.Tensor, h: torch.Tensor, kind: str, rows: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, top-1 agreements) of the drafter's head on N positions against the large model's logits.

    s (N, dS) the small model's output, h (N, dL) the large model's final states at the same positions.
    `kind` "kl": sum of KL(p_large || p_drafter); "ce": cross-entropy on the large model's arg-max. With a
    draft vocabulary `rows` (n,) both distributions are over those tokens only (the target's renormalised
    there, as the drafter can propose nothing else), so the head costs n rows instead of |V|; an agreement
    still needs the target's arg-max over its whole vocabulary, computed when no gradient is (validation).
    The head runs `model.loss_chunk_tokens` positions at a time and, with gradients on, recomputes each chunk
    in the backward pass, so memory holds one chunk's (chunk, |V|) logits rather than N x |V|.
    """
    large_head = model.large_head
    precision = torch.promote_types(s.dtype, torch.float32)  # half-precision logits are summed in float32
    weight = large_head.weight
    sub = None if rows is None else weight.detach()[rows.to(weight.device)]  # (n, dL)
    exact = not torch.is_grad_enabled()

    def chunk(s_i: torch.Tensor, h_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model.head(s_i, None, large_head, rows=rows).to(precision)  # (n_i, V or n)
        with torch.no_grad():
            h_i = h_i.to(weight.device, weight.dtype)
            target = (large_head(h_i) if sub is None else F.linear(h_i, sub)).to(logits.device, precision)
            best = target.argmax(-1)  # (n_i,) in the drafter's vocabulary
            mine = logits.detach().argmax(-1)
            if sub is not None and exact:  # against the whole vocabulary's arg-max
                agree = rows.to(mine.device)[mine] == large_head(h_i).argmax(-1).to(mine.device)
            else:
                agree = mine == best
        if kind == "kl":
            loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="sum")
        else:
            loss = F.cross_entropy(logits, best, reduction="sum")
        return loss, agree.sum()

    size = model.loss_chunk_tokens
    run = partial(checkpoint, chunk, use_reentrant=False) if torch.is_grad_enabled() else chunk
    parts = [run(s[i : i + size], h[i : i + size]) for i in range(0, s.shape[0], size)] or [chunk(s, h)]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def answer_vocabulary(examples: list[Any], size: int, always: list[int], vocab_size: int = 0) -> torch.Tensor:
    """The `size` most frequent answer tokens (labelled positions) of `examples`, filled to `size` with the lowest
    ids below `vocab_size` when they hold fewer (`draft_vocabulary`), plus `always`, sorted."""
    return draft_vocabulary([[t for t in e.labels if t != IGNORE_INDEX] for e in examples], size, always, vocab_size)


SEEN_PROMPTS_FILE = "self_prompts.jsonl"  # in the run folder: the prompts a self-prompts drafter trained on


def read_seen_prompts(folder: Path) -> list[str] | None:
    """The prompts a self-prompts drafter trained on, from the SEEN_PROMPTS_FILE in its folder or the run folder
    above it (a run's best/ or last/); None where neither holds one."""
    for where in (folder, folder.parent):
        if (where / SEEN_PROMPTS_FILE).is_file():
            return [json.loads(line)["prompt"] for line in (where / SEEN_PROMPTS_FILE).read_text().splitlines()]
    return None


def seen_prompts_text(records: list[Any]) -> str:
    """The prompts the large model wrote for this run, one {"prompt": text} per line: what the drafter saw (its
    answers are the target's, in the drafter_targets cache), for its users and for benchmarks' leak checks."""
    return "".join(json.dumps({"prompt": r.messages[0]["content"]}, ensure_ascii=False) + "\n" for r in records)


class DrafterParts(TrainedParts):
    """What DDP or FSDP wraps for the drafter: the composed model's trained parts, whose forward runs the
    model under the drafting view and returns (summed drafter loss, top-1 agreements) over the answer
    positions; the head runs inside it, so FSDP has its weights gathered."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__(model)
        self.kind = kind
        self.vocab: torch.Tensor | None = None  # the draft vocabulary (None: the whole one)

    def forward(self, target_states: torch.Tensor, labels: torch.Tensor, **batch: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        read = LargeRead(source=batch.pop("large_source"))  # lagged: the states a drafter has while drafting
        hidden = self.composed.forward_read(read, hidden=True, **batch).hidden  # (B, T, dS)
        targets = labels[:, 1:].to(hidden.device)  # position t predicts token t + 1
        keep = targets != IGNORE_INDEX  # (B, T-1)
        s = hidden[:, :-1][keep]  # (N, dS)
        h = target_states[:, :-1].to(hidden.device)[keep]  # (N, dL)
        vocab = None if self.vocab is None else self.vocab.to(hidden.device)
        return draft_loss(self.composed, s, h, self.kind, vocab)


class StateTaps:
    """The composed model as the state cache sees it: reading `taps` (the bridge's and the final state)
    instead of its own `large_taps`, which are part of the cache key."""

    def __init__(self, model: Any, taps: list[int]):
        self.model, self.large_taps = model, taps
        self.config, self.large = model.config, model.large

    def encode_large(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                     ) -> tuple[torch.Tensor, Any]:
        return self.model.encode_large(input_ids, attention_mask, position_ids, taps=self.large_taps)


def draft_offsets(seed: int, split: str, step: int, indices: list[int], block: int) -> torch.Tensor:
    """(B,) offsets in [0, block) of examples `indices`: a hash of (seed, split, step, example), so a
    resumed run, another process count or another gradient accumulation draws the same ones. Validation
    examples keep theirs at every evaluation (step is ignored for them)."""
    step = step if split == "train" else -1
    return torch.tensor([int.from_bytes(hashlib.blake2b(f"{seed}:{split}:{step}:{i}".encode(), digest_size=8)
                                        .digest(), "little") % block for i in indices], dtype=torch.long)


class DrafterObjective(ComposedObjective):
    """The composed model as a drafter: lagged reads of the cached large states, the large model's logits as
    targets. Saves as a composed model plus a `DrafterRecord`."""

    method = "drafter"
    keep_large_head = True  # the targets are large_head(final state), whatever the drafter's own head
    loss_is_answer_nll = False
    seen_prompts: str | None = None  # SEEN_PROMPTS_FILE's text, when the run writes its own prompts (both layouts)

    def __init__(self, config: Any, device: Any = "cpu", processes: int = 1):
        super().__init__(config, device, processes)
        model = self.model
        options = config.method_options
        self.module = DrafterParts(model, options.drafter_loss)
        self._drafter_setup(config, model.large_taps, model.num_large_layers)
        if config.compose.small_inputs == "bridge":
            logger.warning("--small-inputs bridge: the drafter reads no token of its own, only the bridge's view of "
                           "the large states before each block, so every position of a block starts from the same "
                           "input; --small-inputs mapped (the drafter's default) lets it read the tokens it drafts")

    def _drafter_setup(self, config: Any, taps: list[int], final: int) -> None:
        """What both layouts keep (this one and `Eagle3Objective`, whose own __init__ builds no composed model):
        the record, the draft vocabulary's size, the step counter, the cached taps (the bridge's or the draft
        layer's `taps`, and the final state: forward reads `taps` only), the generation and self-prompt reports."""
        options = config.method_options
        self.record = DrafterRecord(options.draft_tokens, options.drafter_loss, options.drafter_targets)
        self.draft_vocab_size = options.draft_vocab
        self.seed, self.step = config.train.seed, 0
        self.cache_taps = sorted(set(taps) | {final})
        self._bridge = [self.cache_taps.index(t) for t in taps]
        self._final = self.cache_taps.index(final)
        self.generation: dict[str, Any] = {}
        self.self_prompts: dict[str, Any] = {}
        self.generation_seconds = 0.0

    def cached_model(self) -> Any:
        return StateTaps(self.model, self.cache_taps)

    def _written_root(self, config: Any) -> Path:
        """Where what the large model writes for training is kept (beside the state cache)."""
        from llm_modules.models.specs import cache_dir

        cache = config.hardware.state_cache_dir
        return (Path(cache) if cache else cache_dir() / "states").parent

    def written_records(self, config: Any, accelerator: Any) -> list[Any] | None:
        from llm_modules.training.self_prompts import is_self_prompts, self_prompt_records

        if not is_self_prompts(config.data.spec):
            return None
        started = time.perf_counter()
        records, report = self_prompt_records(
            self.model.large, self.tokenizer, config.large, config.data.spec,
            self._written_root(config) / "self_prompts", accelerator.is_main_process, accelerator.wait_for_everyone,
            config.eval.progress and accelerator.is_main_process)
        self.self_prompts = {**report, "seconds": round(time.perf_counter() - started, 2)}
        if accelerator.is_main_process:
            print(f"self-prompts: {json.dumps(self.self_prompts)}")
        self.seen_prompts = seen_prompts_text(records)
        return records

    def run_files(self) -> dict[str, str]:
        return {SEEN_PROMPTS_FILE: self.seen_prompts} if self.seen_prompts is not None else {}

    def attach_data(self, config: Any, data: Any, accelerator: Any) -> None:
        if config.method_options.drafter_targets == "generated":
            from llm_modules.states.store import HeldStates
            from llm_modules.training.generated import generated_data

            started = time.perf_counter()
            capture = self._state_capture(config, accelerator)
            self.generation = generated_data(
                data, self.model.large, config.large, self.tokenizer, config.data.template, config.data.max_length,
                self._written_root(config) / "drafter_targets", accelerator.is_main_process,
                accelerator.wait_for_everyone, config.eval.progress and accelerator.is_main_process, capture)
            self.generation_seconds = round(time.perf_counter() - started, 2) if self.generation["generated"] else 0.0
            if capture is not None:
                self.held_states = HeldStates(self.generation["states"], capture.model_key, capture.dtype)
            if accelerator.is_main_process:
                print(f"drafter targets: the large model's greedy answers ({self.generation['answer_tokens']} "
                      f"tokens, {'generated' if self.generation['generated'] else 'reused'}) in "
                      f"{self.generation['file']}" + (f"; their states kept for {len(self.held_states)} examples"
                                                       if self.held_states is not None else ""))
        super().attach_data(config, data, accelerator)
        if self.held_states is not None:  # the state caches hold them now (or held them already)
            import shutil

            shutil.rmtree(self.held_states.folder, ignore_errors=True)
            self.held_states = None
        if self.draft_vocab_size:
            self.module.vocab = answer_vocabulary(data.train, self.draft_vocab_size, self._end_ids(),
                                                  self.model.vocab_size)
            self.record.vocab = int(self.module.vocab.numel())
            if accelerator.is_main_process:
                print(f"draft vocabulary: the {self.draft_vocab_size} most frequent answer tokens of the training "
                      f"data (filled with the lowest ids where they hold fewer) and the end-of-sequence ids "
                      f"({self.record.vocab} of {self.model.vocab_size})")

    def _state_capture(self, config: Any, accelerator: Any) -> Any:
        """What generating the answers keeps for the state cache (`generated.StateCapture`): the cached taps'
        states, when this run caches states and runs as one process (others would not hold them); else None."""
        if not config.hardware.state_cache or accelerator.num_processes > 1:
            return None
        from llm_modules.states.store import model_state_key
        from llm_modules.training.generated import StateCapture

        dtype = config.hardware.state_cache_dtype
        return StateCapture(self.cache_taps, dtype, model_state_key(self.cached_model(), dtype))

    def _end_ids(self) -> list[int]:
        """The large model's end-of-sequence ids (its generation config's) and its tokenizer's."""
        from llm_modules.decoding.engine import model_eos_ids

        ends = set(model_eos_ids(self.model, self.tokenizer)) | {self.tokenizer.eos_token_id}
        return sorted(e for e in ends if e is not None)

    def begin_step(self, step: int) -> None:
        self.step = step

    def batch_extras(self, split: str, indices: list[int], width: int) -> dict[str, torch.Tensor]:
        states = self.states[split].batch(indices, pad_to=width)  # (B, W, Kc, dL)
        offsets = draft_offsets(self.seed, split, self.step, indices, self.record.draft_tokens)  # (B,)
        return {"large_states": states[:, :, self._bridge], "target_states": states[:, :, self._final],
                "large_source": draft_source(offsets, self.record.draft_tokens, len(indices), width)}

    def loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return wrapped(**batch)[0]

    def eval_loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return wrapped(**batch)[0]

    def eval_sums(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss, agreement = wrapped(**batch)
        return {"loss": loss, "agreement": agreement}

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        folder = super().save_pretrained(directory, state)
        self.record.save(folder)
        if self.module.vocab is not None:
            save_draft_vocab(folder, self.module.vocab)
        return folder

    def summary_extras(self) -> dict[str, Any]:
        return {"drafter": self.record.to_dict(), "self_prompts": self.self_prompts or None,
                "target_generation": self.generation or None,
                "target_generation_seconds": self.generation_seconds}
