"""The large model's own greedy answers to the training prompts (`--drafter-targets generated`).

A drafter is judged on the text the target itself writes, so Medusa-2 and EAGLE-3 train on the
target's answers rather than the data set's. Each example's prompt (its tokens before the first
answer token, as the template rendered them) is answered once by the large model, greedily, and the
example becomes prompt + answer (the answer ending at the target's end-of-sequence token, or at
--max-length), the answer its loss span. Answers are cached as JSON under `root/<key>.json`, the key
covering the target (spec, weights, dtype), the prompts, the length limit and the library versions.
While they are generated, each batch's answers are kept in `root/<key>.parts/`, so a killed run's
rerun generates only the batches it had not finished, in the same batches, so the same answers.

With a `StateCapture`, the pass that generates the answers also keeps the large model's hidden states at the
state cache's taps for every token it reads (`models.large.TappedStepper`; each row reads its last token too,
one step more), batch by batch in `root/<key>.states/` (`states.store.HeldStates`): the state cache then copies
them instead of running the large model a second time over the same prompts and answers. They equal a fresh
forward over prompt + answer up to floating-point rounding (the KV cache's order of sums, and left padding).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from llm_modules.data.prepare import TokenizedExample, pad_id, render
from llm_modules.decoding.engine import DecodeBatch, Sequence as Row, model_eos_ids
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.errors import LLMModulesError
from llm_modules.models.cpu_linear import decoding_linears
from llm_modules.models.large import TappedStepper
from llm_modules.states.fence import host_name
from llm_modules.states.leases import holder_gone
from llm_modules.states.store import ids_hash, write_held
from llm_modules.tensors import DTYPES, IGNORE_INDEX
from llm_modules.version import __version__

GENERATE_BATCH = 32  # prompts answered together (similar lengths: they are sorted first). Measured here (2-core
# CPU, bf16 Qwen2.5-Coder-1.5B, 64-token prompts, 24 new tokens, our generate; transformers' gave the same):
# batch 8 27 tokens/s, 16 49, 32 72, 64 71
_FORMAT = 1


def prompt_length(example: TokenizedExample, tokenizer: Any, template: str) -> int:
    """Tokens before the example's first answer token (rendered with the loss on the answer, whatever
    --loss-on says, so the prompt ends where the assistant's answer starts)."""
    _, labels = render(example.record, tokenizer, template, "assistant")
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def generation_key(large: torch.nn.Module, spec: str, prompts: Sequence[list[int]], max_length: int,
                   eos: list[int]) -> str:
    """Hex digest of everything that decides the greedy answers."""
    import transformers

    from llm_modules.states.store import large_weights_digest

    h = hashlib.sha256()
    for p in prompts:
        h.update(len(p).to_bytes(8, "little") + torch.as_tensor(p, dtype=torch.int64).numpy().tobytes())
    payload = {"format": _FORMAT, "large": spec, "weights": large_weights_digest(large), "prompts": h.hexdigest(),
               "max_length": max_length, "eos": eos, "dtype": str(next(large.parameters()).dtype),
               "torch": torch.__version__, "transformers": transformers.__version__, "llm_modules": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def answer_batches(prompts: Sequence[list[int]]) -> list[list[int]]:
    """The prompts' indices as they are answered: sorted by length, GENERATE_BATCH at a time. The same
    batches on every run, so a resumed generation pads (and so computes) each row as an uninterrupted one."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start : start + GENERATE_BATCH] for start in range(0, len(order), GENERATE_BATCH)]


@dataclass
class StateCapture:
    """What generating the answers keeps beside them: the large model's hidden states at `taps` (indices as in
    `models.large.tapped_states`) of every prompt and answer token, in `dtype`, for the state cache whose model
    key is `model_key` (`states.store.model_state_key`)."""

    taps: list[int]
    dtype: str
    model_key: str


class _ReadsItsLastToken(Row):
    """A row that stays one step after it ends, so that the model reads its last token too (the state cache
    needs that token's states); the token chosen after it is not kept."""

    ending: str | None = None

    def finish(self, reason: str, error: str | None = None) -> None:
        if reason in ("stop", "length") and self.finish_reason is None and self.ending is None:
            self.ending = reason  # ends at the next token, once its last one has been read
            return
        super().finish(reason, error)

    def append(self, token: int) -> None:
        if self.ending is not None:
            super().finish(self.ending)
            return
        super().append(token)


class _KeepsStates(DecodeBatch):
    """The decoding batch with a `TappedStepper`: each row that ends takes its states with it (`row.states`,
    (T, K, dL) on the CPU: its prompt and tokens, the padding left out) before it leaves the cache."""

    def _keep(self, index: list[int]) -> None:
        if self.cache is not None:
            for i in sorted(set(range(len(self.rows))) - set(index)):
                row = self.rows[i]
                if row.finish_reason in ("stop", "length"):
                    row.states = self.cache.states[i][:, self.mask[i].bool()].transpose(0, 1).contiguous().cpu()
        super()._keep(index)


@torch.no_grad()
def answer_batch(large: torch.nn.Module, prompts: Sequence[list[int]], rows: list[int], max_length: int,
                 eos: list[int], pad: int, capture: StateCapture | None = None
                 ) -> tuple[list[list[int]], list[torch.Tensor] | None]:
    """The greedy continuations of prompts `rows`, together (left-padded; a row leaves the batch when it ends),
    each ending with its first EOS token or at `max_length` tokens in all; with `capture`, also each row's
    states (T, K, dL) over its prompt and answer (else None)."""
    if capture is None:
        batch, kind = DecodeBatch(large, pad), Row
    else:
        batch, kind = _KeepsStates(large, pad, stepper=TappedStepper(large, capture.taps, DTYPES[capture.dtype])), \
            _ReadsItsLastToken
    seqs = [kind(prompts[i], SamplingOptions(max_new_tokens=max_length - len(prompts[i])), eos) for i in rows]
    batch.add(seqs)
    while batch.rows:
        batch.step()
    for seq in seqs:
        if seq.finish_reason == "error":
            raise LLMModulesError(f"--drafter-targets generated: the large model failed on a prompt: {seq.error}") \
                from seq.exception
    return [seq.tokens for seq in seqs], [seq.states for seq in seqs] if capture is not None else None


def parts_folder(path: Path) -> Path:
    """Where the answers of `root/<key>.json` are kept batch by batch until they are all generated."""
    return path.with_name(f"{path.stem}.parts")


def states_folder(path: Path) -> Path:
    """Where the states the generation of `root/<key>.json` kept are (`HeldStates`), until a state cache has them."""
    return path.with_name(f"{path.stem}.states")


def _part(parts: Path, n: int) -> Path:
    return parts / f"batch-{n:06d}.json"


def _read_part(path: Path, key: str, rows: list[int], valid: Callable[[int, Any], bool]) -> list[Any] | None:
    """The outputs kept in `path` when it is whole and holds batch `rows` of this key (each passing `valid(row,
    output)`); else None."""
    try:
        saved = json.loads(path.read_text())
        outputs = saved["answers"]
        ok = (saved["key"] == key and saved["rows"] == rows and len(outputs) == len(rows)
              and all(valid(i, a) for i, a in zip(rows, outputs)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return outputs if ok else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Whole or not at all (a reader never sees half a file); on disk before it is renamed into place."""
    tmp = path.with_name(f"{path.name}.tmp-{host_name()}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def token_list(output: Any) -> bool:
    return isinstance(output, list) and all(type(t) is int for t in output)


def kept_batches(path: Path, key: str, batches: list[list[int]], produce: Callable[[int, list[int]], list[Any]],
                 valid: Callable[[int, Any], bool], progress: str = "") -> tuple[list[Any], dict[str, Any]]:
    """(outputs by row, {"generated": whether produced now rather than read from `path`, "resumed": how many
    outputs an interrupted run had kept}): `produce(n, rows)` makes batch n's outputs (rows: indices).

    While producing, each batch's outputs are kept in `parts_folder(path)` (one JSON file per batch, written
    atomically, naming the key and the batch's rows), so a killed run loses at most the batch it was in: a
    rerun with the same key reads the kept batches and produces the others. When all are there, `path` is
    written whole and the parts go. `progress`: what to print progress as ("" prints nothing).
    """
    total = sum(map(len, batches))
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key and len(saved["answers"]) == total:
                return saved["answers"], {"generated": False, "resumed": 0}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: produced again and replaced
    parts = parts_folder(path)
    outputs: list[Any] = [None] * total
    missing = []
    for n, rows in enumerate(batches):
        kept = _read_part(_part(parts, n), key, rows, valid)
        if kept is None:
            missing.append(n)
        for i, output in zip(rows, kept or []):
            outputs[i] = output
    resumed = total - sum(len(batches[n]) for n in missing)
    if progress and resumed:
        print(f"{progress}: {resumed} of {total} kept from an interrupted run in {parts}", flush=True)
    done = resumed
    for n in missing:
        rows = batches[n]
        new = produce(n, rows)
        parts.mkdir(parents=True, exist_ok=True)  # each time: a run that finished the same key may have removed it
        _write_json_atomic(_part(parts, n), {"key": key, "rows": rows, "answers": new})
        for i, output in zip(rows, new):
            outputs[i] = output
        done += len(rows)
        if progress:
            print(f"{progress}: {done}/{total}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, {"key": key, "answers": outputs})
    for n in range(len(batches)):  # file by file: another run's part being written stays, and so does the folder
        _part(parts, n).unlink(missing_ok=True)
    for tmp in parts.glob("*.tmp-*"):  # a part whose writer was killed mid-write
        host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
        if pid.isdigit() and holder_gone(host, int(pid), tmp, time.time()):
            tmp.unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:
        pass
    return outputs, {"generated": True, "resumed": resumed}


def load_or_generate(path: Path, key: str, large: torch.nn.Module, prompts: Sequence[list[int]], max_length: int,
                     eos: list[int], pad: int, progress: bool = False, capture: StateCapture | None = None
                     ) -> tuple[list[list[int]], dict[str, Any]]:
    """The large model's greedy answers to `prompts` (`answer_batches` of them), kept as `kept_batches` keeps
    them: (answers, {"generated", "resumed"}). With `capture`, each batch generated now also writes its states
    to `states_folder(path)/batch-<n>.safetensors` (before its answers are kept), named by example hash."""
    def valid(i: int, answer: Any) -> bool:
        return token_list(answer) and len(prompts[i]) + len(answer) <= max_length

    def produce(n: int, rows: list[int]) -> list[list[int]]:
        answers, states = answer_batch(large, prompts, rows, max_length, eos, pad, capture)
        if capture is not None:
            folder = states_folder(path)
            folder.mkdir(parents=True, exist_ok=True)
            write_held(folder / f"batch-{n:06d}.safetensors",
                       {ids_hash(prompts[i] + a): s for i, a, s in zip(rows, answers, states)},
                       capture.model_key, capture.dtype)
        return answers

    return kept_batches(path, key, answer_batches(prompts), produce, valid, "target answers" if progress else "")


def with_generated_answers(examples: list[TokenizedExample], answers: list[list[int]], prompt_lengths: list[int]
                           ) -> list[TokenizedExample]:
    """Each example cut to its prompt and continued by its answer, the answer its loss span (the
    prompt keeps its labels: with --loss-on all it counts too); an empty answer keeps the example."""
    out = []
    for example, answer, p in zip(examples, answers, prompt_lengths):
        if not answer:
            out.append(example)
            continue
        out.append(TokenizedExample(example.input_ids[:p] + answer, example.labels[:p] + answer, example.record))
    return out


def generated_data(data: Any, large: torch.nn.Module, spec: str, tokenizer: Any, template: str, max_length: int,
                   root: Path, is_main: bool = True, wait: Any = None, progress: bool = False,
                   capture: StateCapture | None = None) -> dict[str, Any]:
    """Replace `data.train` and `data.val` by the large model's greedy answers to their prompts (in place).

    The main process generates (or reads) the answers, the others wait (`wait()`: a barrier) and read
    them. Returns a report: examples, answer tokens, answers ending in EOS, whether generated now, how many
    answers an interrupted generation had kept, the file, and with `capture` the folder of the states the
    generation kept (`states`; for `states.store.HeldStates`).
    """
    splits = {name: getattr(data, name) for name in ("train", "val")}
    examples = [e for name in ("train", "val") for e in splits[name]]
    lengths = [prompt_length(e, tokenizer, template) for e in examples]
    prompts = [e.input_ids[:p] for e, p in zip(examples, lengths)]
    if any(p >= max_length for p in lengths):
        raise LLMModulesError(f"--drafter-targets generated: {sum(p >= max_length for p in lengths)} prompt(s) "
                              f"leave no room for an answer within --max-length {max_length}; raise it")
    eos = model_eos_ids(large, tokenizer)
    if not eos:
        raise LLMModulesError("--drafter-targets generated: the large model has no end-of-sequence token to stop at")
    key = generation_key(large, spec, prompts, max_length, eos)
    path = root / f"{key}.json"
    info = {"generated": False, "resumed": 0}
    if is_main:
        with decoding_linears(large):  # oneDNN's kernels where torch's are slow (models.cpu_linear)
            _, info = load_or_generate(path, key, large, prompts, max_length, eos, pad_id(tokenizer), progress,
                                       capture)
    if wait is not None:
        wait()
    answers = json.loads(path.read_text())["answers"]
    rows = with_generated_answers(examples, answers, lengths)
    data.train, data.val = rows[: len(splits["train"])], rows[len(splits["train"]):]
    return {"examples": len(rows), "answer_tokens": sum(map(len, answers)),
            "ended_with_eos": sum(bool(a) and a[-1] in eos for a in answers), **info, "file": str(path),
            **({"states": str(states_folder(path))} if capture is not None else {})}
