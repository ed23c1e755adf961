"""The decoding engine: continuous batching for the composed model and for plain causal LMs.

Every decode goes through `DecodeBatch`: rows (one per prompt) decode together, one token per
step. A row can join between any two steps: its prompt is prefilled (with the other newcomers of
that step), then its KV caches are left-padded to the running batch's width and concatenated as new
rows; a row leaves as soon as it is finished or cancelled, and the columns that are padding in every
remaining row are cut away. The caches that move row by row are all three stages' (the large
model's, the bridge's cross-attention keys/values, the small model's; no large model's when the
composed model reads the prompt only) or a plain model's own (`llm_modules.decoding.steppers`).
Padding never changes what a row computes: positions count real tokens only and padded keys are
masked, so a greedy row gives the tokens it gives alone (exactly in float64; float32 sums in
another order can flip a near-tie).

`generate()` (llm_modules.decoding.generation) runs a fixed batch to the end on a DecodeBatch; `Engine`
runs one on a background thread and feeds it requests from any thread (the server's), with a
bounded queue. Neither knows anything of HTTP.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llm_modules.decoding.steppers import right_aligned, stepper_for
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import left_pad


@dataclass
class SamplingOptions:
    """How one request decodes. Greedy unless `do_sample`; `eos_token_ids` None: the model's own."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: list[str] | None = None
    eos_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LLMModulesError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise LLMModulesError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise LLMModulesError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LLMModulesError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise LLMModulesError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def processors(self, prompt_length: int, eos_ids: list[int]) -> LogitsProcessorList:
        """transformers' own processors, in the order its generate() applies them."""
        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty=self.repetition_penalty))
        if self.min_new_tokens > 0 and eos_ids:
            processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, self.min_new_tokens, eos_ids))
        if self.do_sample:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors


class Sequence:
    """One row: its prompt, the tokens generated so far, and why it ended (None while it runs).

    finish_reason: "stop" (an end-of-sequence token or a stop string), "length" (max_new_tokens),
    "cancelled" (`cancel()`, e.g. the client went away) or "error" (`error` says what).
    `on_update(seq)` is called on the decoding thread after each new token and once at the end.
    """

    def __init__(self, prompt: list[int], options: SamplingOptions, eos_ids: list[int], tokenizer: Any = None,
                 generator: torch.Generator | None = None, on_update: Callable[["Sequence"], None] | None = None):
        if not prompt:
            raise LLMModulesError("a prompt needs at least one token")
        if options.stop_strings and tokenizer is None:
            raise LLMModulesError("stop strings need a tokenizer; this model has none (pass tokenizer=...)")
        self.prompt, self.options, self.eos_ids = list(prompt), options, list(eos_ids)
        self.tokenizer, self.generator, self.on_update = tokenizer, generator, on_update
        self.processors = options.processors(len(prompt), self.eos_ids)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._cancelled = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the engine to drop this row at its next step (safe from any thread)."""
        self._cancelled = True

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            if self.on_update is not None:
                self.on_update(self)

    def choose(self, scores: torch.Tensor) -> int:
        """scores (V,) float logits -> this row's next token (its processors, then argmax or a draw)."""
        if self.processors:
            ids = torch.tensor([self.prompt + self.tokens], device=scores.device)
            scores = self.processors(ids, scores[None])[0]
        if self.options.do_sample:
            return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator))
        return int(scores.argmax())

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if self.on_update is not None:
            self.on_update(self)
        if token in self.eos_ids or self._hit_stop_string():
            self.finish("stop")
        elif len(self.tokens) >= self.options.max_new_tokens:
            self.finish("length")

    def _hit_stop_string(self) -> bool:
        if not self.options.stop_strings:
            return False
        text = self.tokenizer.batch_decode([self.tokens], skip_special_tokens=False)[0]
        return any(s in text for s in self.options.stop_strings)


def model_eos_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """The end-of-sequence ids of the model's generation config, else of its tokenizer."""
    config_source = model.large if hasattr(model, "large") else model
    found = getattr(getattr(config_source, "generation_config", None), "eos_token_id", None)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if found is None and tokenizer is not None:
        found = tokenizer.eos_token_id
    if found is None:
        return []
    return [found] if isinstance(found, int) else list(found)


# ---------------------------------------------------------------------------------------- the batch
class DecodeBatch:
    """Rows that decode together, one token each per `step()`; rows join with `add` and leave when done.

    Kept per row: the token ids and 0/1 mask of every position so far (B, S), right-aligned, and the
    next-token logits (B, V). With `use_cache=False` every step recomputes the whole prefix (slow;
    it checks the cached path); a stepper may still keep per-row state then (a model that reads the
    prompt only keeps where each row's prompt ends), moved row by row like a cache.
    """

    def __init__(self, model: Any, pad_id: int = 0, use_cache: bool = True):
        self.stepper = stepper_for(model)
        self.device = model.device
        self.pad_id, self.use_cache = pad_id, use_cache
        self.rows: list[Sequence] = []
        self.ids = self.mask = self.scores = None  # (B, S), (B, S), (B, V)
        self.cache: Any = None

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill the newcomers together (left-padded) and join them to the running rows."""
        if not seqs:
            return
        ids, mask = left_pad([s.prompt for s in seqs], self.pad_id, self.device)
        scores, cache = self.stepper.forward(ids, mask, None, self.use_cache)
        if not self.rows:
            self.ids, self.mask, self.scores, self.cache = ids, mask, scores, cache
        else:
            width = max(self.width, ids.shape[1])
            old_ids, old_mask = self._aligned(self.ids, self.mask, self.cache, width)
            ids, mask = self._aligned(ids, mask, cache, width)
            if cache is not None:
                for old, new in zip(self.stepper.slots(self.cache), self.stepper.slots(cache)):
                    old.set(torch.cat([old.get(), new.get()]))
            self.ids, self.mask = torch.cat([old_ids, ids]), torch.cat([old_mask, mask])
            self.scores = torch.cat([self.scores, scores])
        self.rows += seqs

    def _aligned(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any, width: int):
        """Left-pad (or cut leading padding from) ids, mask and cache to `width` positions."""
        have = ids.shape[1]
        if width > have:
            ids = torch.cat([ids.new_full((ids.shape[0], width - have), self.pad_id), ids], 1)
            mask = torch.cat([mask.new_zeros((mask.shape[0], width - have)), mask], 1)
        else:
            ids, mask = ids[:, have - width:], mask[:, have - width:]
        if cache is not None and width != have:
            slots = self.stepper.slots(cache)  # read before the length changes (per-position counts)
            for slot in slots:
                slot.set(right_aligned(slot.get(), slot.cols(width)))
            self.stepper.set_length(cache, width)
        return ids, mask

    def _keep(self, index: list[int]) -> None:
        """Keep only the rows in `index`, then cut the columns that are padding in all of them."""
        self.rows = [self.rows[i] for i in index]
        if not self.rows:
            self.ids = self.mask = self.scores = self.cache = None
            return
        rows = torch.tensor(index, device=self.device)
        self.ids, self.mask, self.scores = self.ids[rows], self.mask[rows], self.scores[rows]
        if self.cache is not None:
            for slot in self.stepper.slots(self.cache):
                slot.set(slot.get().index_select(0, rows))
        real = int(self.mask.sum(1).max())  # the longest remaining row
        if real < self.width:
            self.ids, self.mask = self._aligned(self.ids, self.mask, self.cache, real)

    def step(self) -> list[tuple[Sequence, int]]:
        """Drop cancelled rows, give every other row its next token, drop the rows that finished,
        and run the model one position ahead on the rest. Returns (row, token) for this step."""
        cancelled = [s for s in self.rows if s._cancelled]
        if cancelled:
            for seq in cancelled:
                seq.finish("cancelled")
            self._keep([i for i, s in enumerate(self.rows) if not s.finished])
        if not self.rows:
            return []
        scores = self.scores.float()  # (B, V)
        if all(not s.processors and not s.options.do_sample for s in self.rows):
            tokens = scores.argmax(dim=-1).tolist()  # (B,): greedy rows need no per-row work
        else:
            scores = scores.cpu()  # per-row processors and generators live on the CPU
            tokens = [seq.choose(scores[i]) for i, seq in enumerate(self.rows)]
        emitted = list(zip(self.rows, tokens))
        for seq, token in emitted:
            seq.append(token)
        going = [i for i, s in enumerate(self.rows) if not s.finished]
        if len(going) < len(self.rows):
            self._keep(going)  # before the new column: the cache has not seen it yet
        if self.rows:
            next_ids = torch.tensor([tokens[i] for i in going], device=self.device)[:, None]  # (B, 1)
            self.ids = torch.cat([self.ids, next_ids], 1)
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
            inputs = next_ids if self.use_cache else self.ids
            self.scores, self.cache = self.stepper.forward(inputs, self.mask, self.cache, self.use_cache)
        return emitted

    def fail(self, message: str) -> None:
        """End every row with an error (the model raised): the rows go, the batch is empty again."""
        for seq in self.rows:
            seq.finish("error", message)
        self._keep([])


# ---------------------------------------------------------------------------------------- the engine
class EngineFull(LLMModulesError):
    """The engine's queue of waiting requests is full; try again later."""


@dataclass
class EngineStats:
    """What the engine is doing (read by the server's /health): rows decoding, requests waiting, totals."""

    running: int = 0
    queued: int = 0
    finished: int = 0
    generated_tokens: int = 0
    max_batch: int = 0
    max_queue: int = 0
    errors: list[str] = field(default_factory=list)


class Engine:
    """Continuous batching on a background thread: `submit` from any thread; a request joins the
    running batch at the next step (up to `max_batch` rows) or waits in a queue of `max_queue`;
    with `max_batch + max_queue` requests in hand `submit` raises EngineFull. `Sequence.cancel()`
    frees a row (or a place in the queue) at the next step."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise LLMModulesError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos_ids = model_eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.batch = DecodeBatch(model, pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self.max_positions = self.batch.stepper.max_positions
        self._waiting: list[Sequence] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = EngineStats(max_batch=max_batch, max_queue=max_queue)

    def sequence(self, prompt: list[int], options: SamplingOptions, seed: int | None = None,
                 on_update: Callable[[Sequence], None] | None = None) -> Sequence:
        """A request for this engine: the model's EOS unless `options` names others; `seed` fixes sampling."""
        if self.max_positions is not None and len(prompt) + options.max_new_tokens > self.max_positions:
            raise LLMModulesError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({options.max_new_tokens}) exceeds the "
                f"{self.max_positions} positions the model can place; ask for at most "
                f"{max(self.max_positions - len(prompt), 0)} new tokens"
            )
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        if options.do_sample and generator is None:
            generator = torch.Generator(device="cpu")
            generator.seed()
        eos = options.eos_token_ids if options.eos_token_ids is not None else self.eos_ids
        return Sequence(prompt, options, eos, self.tokenizer, generator, on_update)

    def submit(self, seq: Sequence) -> Sequence:
        with self._wake:
            self._drop_cancelled_waiting()
            if len(self.batch.rows) + len(self._waiting) >= self.max_batch + self.max_queue:
                raise EngineFull(f"the server is busy: {len(self.batch.rows)} requests decoding (max {self.max_batch}) "
                                 f"and {len(self._waiting)} waiting (max {self.max_queue}); retry later")
            self._waiting.append(seq)
            self.stats.queued = len(self._waiting)
            self._wake.notify()
        return seq

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llm-modules-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _admit(self) -> list[Sequence]:
        with self._wake:
            while not self._stop and not self._waiting and not self.batch.rows:
                self._wake.wait()
            self._drop_cancelled_waiting()
            room = self.max_batch - len(self.batch.rows)
            admitted, self._waiting = self._waiting[:room], self._waiting[room:]
            self.stats.queued = len(self._waiting)
        return admitted

    def _drop_cancelled_waiting(self) -> None:
        for seq in self._waiting:
            if seq._cancelled:
                seq.finish("cancelled")
        self._waiting = [s for s in self._waiting if not s.finished]

    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            admitted = self._admit()
            if self._stop:
                for seq in self.batch.rows + admitted + self._waiting:
                    seq.finish("cancelled")
                return
            try:
                self.batch.add(admitted)
            except Exception as err:  # a prompt the model refuses: end those requests, keep the others
                self._failed(admitted, err)
            self.stats.running = len(self.batch.rows)
            before = list(self.batch.rows)
            try:
                self.stats.generated_tokens += len(self.batch.step())
            except Exception as err:  # the model failed mid-batch: end its rows with the error, keep serving
                self._failed(self.batch.rows, err)
                self.batch.fail(str(err))
            self.stats.finished += sum(s.finished for s in before)
            self.stats.running = len(self.batch.rows)

    def _failed(self, seqs: list[Sequence], err: Exception) -> None:
        message = f"{type(err).__name__}: {err}"
        self.stats.errors.append(message)
        for seq in seqs:
            seq.finish("error", message)
