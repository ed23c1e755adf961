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

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from llm_modules.decoding.limits import (  # one check for every caller
    check_room,
    model_positions,
)
from llm_modules.decoding.rows import RowBatch, choose
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.steppers import Stepper, stepper_for
from llm_modules.errors import LLMModulesError

logger = logging.getLogger(__name__)


STOP_TAIL_MARGIN = 8  # characters decoded beyond the longest stop string when looking for one


class Sequence:
    """One row: its prompt, the tokens generated so far, and why it ended (None while it runs).

    finish_reason: "stop" (an end-of-sequence token or a stop string), "length" (max_new_tokens),
    "cancelled" (`cancel()`, e.g. the client went away) or "error" (`error` says what, `exception`
    is what was raised; only this row's own computation failed, or the whole batch's).
    `on_update(seq)` is called on the decoding thread after each new token and once at the end.
    `request_id` names the row in the engine's log.
    """

    def __init__(self, prompt: list[int], options: SamplingOptions, eos_ids: list[int], tokenizer: Any = None,
                 generator: torch.Generator | None = None, on_update: Callable[["Sequence"], None] | None = None,
                 request_id: str | None = None):
        if not prompt:
            raise LLMModulesError("a prompt needs at least one token")
        if options.max_new_tokens < 1:
            raise LLMModulesError(f"a decoding row needs max_new_tokens >= 1, got {options.max_new_tokens}")
        if options.stop_strings and tokenizer is None:
            raise LLMModulesError("stop strings need a tokenizer; this model has none (pass tokenizer=...)")
        self.prompt, self.options, self.eos_ids = list(prompt), options, list(eos_ids)
        self.tokenizer, self.generator, self.on_update = tokenizer, generator, on_update
        self.request_id = request_id
        self.processors = options.processors(len(prompt), self.eos_ids)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.exception: BaseException | None = None
        self._cancelled = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Ask the engine to drop this row at its next step (safe from any thread)."""
        self._cancelled = True

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            if self.on_update is not None:
                self.on_update(self)

    def fail(self, err: BaseException) -> None:
        """End this row with `err` (its own computation raised); never raises itself."""
        if self.finish_reason is None:
            self.exception = err
            try:
                self.finish("error", f"{type(err).__name__}: {err}")
            except Exception:  # its listener failed as well: the row has ended all the same
                pass

    def choose(self, scores: torch.Tensor) -> int:
        """scores (V,) float logits -> this row's next token (its processors, then argmax or a draw)."""
        return choose(self, scores)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if self.on_update is not None:
            self.on_update(self)
        if token in self.eos_ids or self._hit_stop_string():
            self.finish("stop")
        elif len(self.tokens) >= self.options.max_new_tokens:
            self.finish("length")

    def _hit_stop_string(self) -> bool:
        """Whether the reply now holds a stop string. Checked after every token, so a new one ends in the last
        token: only a tail of the reply is decoded (decoding it whole made long replies ~55% slower), at
        least the longest stop string's length plus STOP_TAIL_MARGIN characters (a token cut off at the tail's
        start, half of a character, decodes to a replacement character there)."""
        if not self.options.stop_strings:
            return False
        need = max(len(s) for s in self.options.stop_strings) + STOP_TAIL_MARGIN
        n = need  # tokens: most decode to one character or more; a tail that decodes shorter doubles
        while True:
            tail = self.tokens[-n:]
            text = self.tokenizer.batch_decode([tail], skip_special_tokens=False)[0]
            if len(text) >= need or len(tail) == len(self.tokens):
                return any(s in text for s in self.options.stop_strings)
            n *= 2


def model_eos_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """The end-of-sequence ids of the model's generation config (a composed model's: that of the model whose
    vocabulary it predicts), else of its tokenizer."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if found is None and tokenizer is not None:
        found = tokenizer.eos_token_id
    if found is None:
        return []
    return [found] if isinstance(found, int) else list(found)


# ---------------------------------------------------------------------------------------- the batch
class DecodeBatch(RowBatch):
    """Rows that decode together, one token each per `step()`; rows join with `add` and leave when done.

    Kept per row (`RowBatch`): the token ids and 0/1 mask of every position so far (B, S), right-aligned,
    and here the next-token logits (B, V). With `use_cache=False` every step recomputes the whole prefix
    (slow; it checks the cached path); a stepper may still keep per-row state then (a model that reads the
    prompt only keeps where each row's prompt ends), moved row by row like a cache.

    A failure ends only the rows whose own computation fails (`Sequence.fail`): a row's choice of
    token, its stop strings and its listener are each guarded; when the model's forward raises, each
    row is run alone (its prompt and tokens prefilled afresh) and the rows that fail alone end with
    their error while the others go on. Only a failure no row causes alone ends every row.
    """

    ROW_STATE = ("scores",)

    def __init__(self, model: Any, pad_id: int = 0, use_cache: bool = True, stepper: Stepper | None = None):
        super().__init__(stepper or stepper_for(model), model.device, pad_id)  # stepper: another view of model
        self.use_cache = use_cache

    def _prefill(self, rows, ids, mask):
        scores, cache = self.stepper.forward(ids, mask, None, self.use_cache)
        return cache, {"scores": scores}

    def step(self) -> list[tuple[Sequence, int]]:
        """Drop cancelled rows, give every other row its next token, drop the rows that finished,
        and run the model one position ahead on the rest. Returns (row, token) for this step."""
        self._drop_cancelled()
        if not self.rows:
            return []
        scores = self.scores.float()  # (B, V)
        greedy = None
        if all(not s.processors and not s.options.do_sample for s in self.rows):
            greedy = scores.argmax(dim=-1).tolist()  # (B,): greedy rows need no per-row work
        else:
            scores = scores.cpu()  # per-row processors and generators live on the CPU
        emitted: list[tuple[Sequence, int]] = []
        for i, seq in enumerate(self.rows):
            try:  # this row's own work: its processors and draw (its stop strings and listener: `_emit`)
                token = greedy[i] if greedy is not None else seq.choose(scores[i])
            except Exception as err:
                seq.fail(err)
                continue
            self._emit(seq, token, emitted)
        self._drop_finished()  # before the new column: the cache has not seen it yet
        if self.rows:
            next_ids = torch.tensor([s.tokens[-1] for s in self.rows], device=self.device)[:, None]  # (B, 1)
            ids = torch.cat([self.ids, next_ids], 1)
            mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
            try:
                self.scores, self.cache = self.stepper.forward(next_ids if self.use_cache else ids, mask, self.cache,
                                                               self.use_cache)
                self.ids, self.mask = ids, mask
            except Exception as err:  # the cache may be half-updated: start again from the rows' tokens
                self._rebuild(err)
        return emitted


# ---------------------------------------------------------------------------------------- the engine
class EngineFull(LLMModulesError):
    """The engine's queue of waiting requests is full; try again later."""


@dataclass
class EngineStats:
    """What the engine is doing (read by the server's /health): rows decoding (or being admitted),
    requests waiting, totals, and the failed requests: `failed` counts them all, `errors` keeps the
    last ERRORS_KEPT (request id, error type, message, time)."""

    ERRORS_KEPT = 100

    running: int = 0
    queued: int = 0
    finished: int = 0
    generated_tokens: int = 0
    max_batch: int = 0
    max_queue: int = 0
    failed: int = 0
    errors: deque = field(default_factory=lambda: deque(maxlen=EngineStats.ERRORS_KEPT))


def check_batch_limits(max_batch: int, max_queue: int, names: tuple[str, str] = ("max_batch", "max_queue")) -> None:
    """At least one row decodes, and no fewer than zero wait; `names`: how the caller calls the two."""
    if max_batch < 1 or max_queue < 0:
        raise LLMModulesError(f"{names[0]} must be >= 1 and {names[1]} >= 0, got {max_batch} and {max_queue}")


class Engine:
    """Continuous batching on a background thread: `submit` from any thread; a request joins the
    running batch at the next step (up to `max_batch` rows) or waits in a queue of `max_queue`;
    with `max_batch + max_queue` requests in hand (decoding, being admitted or waiting) `submit`
    raises EngineFull. `Sequence.cancel()` frees a row (or a place in the queue) at the next step.
    A request that fails is logged once (its id and error type) and counted in `stats`."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 8, max_queue: int = 64, drafter: Any = None):
        check_batch_limits(max_batch, max_queue)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos_ids = model_eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.batch = DecodeBatch(model, pad) if drafter is None else SpeculativeBatch(model, drafter, pad)
        self.max_positions = self.batch.max_positions
        self._waiting: list[Sequence] = []
        self._held = 0  # rows in the batch or admitted to it (prefilling), under _wake; the queue is apart
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = EngineStats(max_batch=max_batch, max_queue=max_queue)

    def sequence(self, prompt: list[int], options: SamplingOptions,
                 on_update: Callable[[Sequence], None] | None = None, request_id: str | None = None) -> Sequence:
        """A request for this engine: the model's EOS unless `options` names others; `options.seed` fixes
        sampling (none: a fresh generator)."""
        check_room(len(prompt), options.max_new_tokens, self.max_positions, model_positions(self.model))
        generator = options.generator()
        if options.do_sample and generator is None:
            generator = torch.Generator(device="cpu")
            generator.seed()
        eos = options.eos_token_ids if options.eos_token_ids is not None else self.eos_ids
        return Sequence(prompt, options, eos, self.tokenizer, generator, on_update, request_id)

    def submit(self, seq: Sequence) -> Sequence:
        with self._wake:
            self._drop_cancelled_waiting()
            if self._held + len(self._waiting) >= self.max_batch + self.max_queue:
                raise EngineFull(f"the server is busy: {self._held} requests decoding (max {self.max_batch}) "
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
        """Take what fits from the queue; the admitted rows count as held until they leave the batch."""
        with self._wake:
            while not self._stop and not self._waiting and not self.batch.rows:
                self._wake.wait()
            self._drop_cancelled_waiting()
            room = self.max_batch - len(self.batch.rows)
            admitted, self._waiting = self._waiting[:room], self._waiting[room:]
            self._held = len(self.batch.rows) + len(admitted)
            self.stats.queued, self.stats.running = len(self._waiting), self._held
        return admitted

    def _drop_cancelled_waiting(self) -> None:
        for seq in self._waiting:
            if seq.cancelled:
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
                self.batch.add(admitted)  # a prompt the model refuses ends that request alone
            except Exception as err:  # beyond the batch's own guards: end those requests, keep the others
                for seq in admitted:
                    seq.fail(err)
            self.stats.running = len(self.batch.rows)
            before = list(self.batch.rows)
            try:
                self.stats.generated_tokens += len(self.batch.step())
            except Exception as err:  # beyond the batch's own guards: end its rows, keep serving
                self.batch.fail(f"{type(err).__name__}: {err}", err)
            ended = [s for s in dict.fromkeys(admitted + before) if s.finished]
            self.stats.finished += len(ended)
            for seq in ended:
                if seq.finish_reason == "error":
                    self._record_failure(seq)
            with self._wake:
                self._held = len(self.batch.rows)
                self.stats.running = self._held

    def _record_failure(self, seq: Sequence) -> None:
        """Log a failed request once (its id and error type; the message at debug level) and count it."""
        kind = type(seq.exception).__name__ if seq.exception is not None else "Error"
        self.stats.failed += 1
        self.stats.errors.append({"request_id": seq.request_id, "type": kind, "message": seq.error,
                                  "time": time.time()})
        logger.error("request %s failed in the engine: %s", seq.request_id or "(no id)", seq.error,
                     exc_info=seq.exception if logger.isEnabledFor(logging.DEBUG) else None)
