"""The large model's own greedy answers to the training prompts (`--drafter-targets generated`).

A drafter is judged on the text the target itself writes, so Medusa-2 and EAGLE-3 train on the
target's answers rather than the data set's. Each example's prompt (its tokens before the first
answer token, as the template rendered them) is answered once by the large model, greedily, and the
example becomes prompt + answer (the answer ending at the target's end-of-sequence token, or at
--max-length), the answer its loss span. Answers are cached as JSON under `root/<key>.json`, the key
covering the target (spec, weights, dtype), the prompts, the length limit and the library versions.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from llm_modules.data.prepare import TokenizedExample, pad_id, render
from llm_modules.decoding.engine import model_eos_ids
from llm_modules.decoding.generation import generate
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import IGNORE_INDEX, left_pad
from llm_modules.version import __version__

GENERATE_BATCH = 8  # prompts answered together (similar lengths: they are sorted first); on a 2-core CPU a
# bf16 1.5B model decoded 8 rows at 25 tokens/s and 16 at 21 (0.32 and 0.75 s a step)
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


@torch.no_grad()
def greedy_answers(large: torch.nn.Module, prompts: Sequence[list[int]], max_length: int, eos: list[int],
                   pad: int, progress: bool = False) -> list[list[int]]:
    """Each prompt's greedy continuation by `large` (a Hugging Face causal LM), ending with its first EOS
    token or at `max_length` tokens in all; batches of similar lengths, left-padded."""
    device = next(large.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), GENERATE_BATCH):
        rows = order[start : start + GENERATE_BATCH]
        ids, mask = left_pad([prompts[i] for i in rows], pad, device)  # (B, W)
        budget = max_length - min(len(prompts[i]) for i in rows)
        out = generate(large, ids, mask, max_new_tokens=budget, eos_token_id=eos, pad_token_id=pad)
        for r, i in enumerate(rows):
            new = out[r, ids.shape[1]:].tolist()[: max_length - len(prompts[i])]
            end = next((n + 1 for n, t in enumerate(new) if t in eos), len(new))  # through the first EOS
            answers[i] = new[:end]
        if progress:
            print(f"target answers: {min(start + GENERATE_BATCH, len(order))}/{len(order)}", flush=True)
    return answers


def load_or_generate(path: Path, key: str, large: torch.nn.Module, prompts: Sequence[list[int]], max_length: int,
                     eos: list[int], pad: int, progress: bool = False) -> tuple[list[list[int]], bool]:
    """(answers, whether they were generated now rather than read from `path`)."""
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key and len(saved["answers"]) == len(prompts):
                return saved["answers"], False
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: generated again and replaced
    answers = greedy_answers(large, prompts, max_length, eos, pad, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "answers": answers}))
    os.replace(tmp, path)  # whole or not at all
    return answers, True


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
                   root: Path, is_main: bool = True, wait: Any = None, progress: bool = False) -> dict[str, Any]:
    """Replace `data.train` and `data.val` by the large model's greedy answers to their prompts (in place).

    The main process generates (or reads) the answers, the others wait (`wait()`: a barrier) and read
    them. Returns a report: examples, answer tokens, answers ending in EOS, whether generated now.
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
    generated = False
    if is_main:
        _, generated = load_or_generate(path, key, large, prompts, max_length, eos, pad_id(tokenizer), progress)
    if wait is not None:
        wait()
    answers = json.loads(path.read_text())["answers"]
    rows = with_generated_answers(examples, answers, lengths)
    data.train, data.val = rows[: len(splits["train"])], rows[len(splits["train"]):]
    return {"examples": len(rows), "answer_tokens": sum(map(len, answers)),
            "ended_with_eos": sum(bool(a) and a[-1] in eos for a in answers), "generated": generated,
            "file": str(path)}
