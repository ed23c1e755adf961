"""Prompts the large model writes itself (`--data self-prompts:N`): a drafter's training prompts with no data set.

A drafter should help on whatever users ask the target, so it trains on the target's own answers to prompts
like theirs. With no prompt set at hand, the target writes them (Magpie, Xu et al. 2024): an aligned chat
model given only its chat template's opening of a user turn (the system prompt its template adds, then the
user-turn marker) continues with a user's request, which it ends with its end-of-turn token. Each of N rows
is sampled (temperature 1, top-p 1 unless given: Magpie's) up to `max_tokens` tokens, its first
end-of-sequence token ending it; rows that are not empty and not repeated become the prompts (a row cut at
`max_tokens` too: a drafter needs prompts the target answers, not well-formed ones; Magpie's quality filters are
for training the model itself), answered later like any data set's (`--drafter-targets generated`). What they hold is whatever the target tends to be asked: a code model
writes mostly code requests (the run prints counts; the prompts are kept as JSON beside the answers).

The spec: ``self-prompts:N?seed=S&max_tokens=M&temperature=T&top_p=P``. Rows are sampled in batches with
one generator per batch seeded from (seed, batch), kept batch by batch (`generated.kept_batches`), so a
killed run resumes and draws the same prompts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch

from llm_modules.data.sources import Record
from llm_modules.decoding.engine import model_eos_ids
from llm_modules.decoding.generation import generate
from llm_modules.errors import LLMModulesError
from llm_modules.models.cpu_linear import decoding_linears
from llm_modules.training.generated import GENERATE_BATCH, kept_batches, token_list

SELF_PROMPTS = "self-prompts:"
_OPTIONS = {"seed": int, "max_tokens": int, "temperature": float, "top_p": float}
_DEFAULTS = {"seed": 0, "max_tokens": 64, "temperature": 1.0, "top_p": 1.0}
_SENTINEL = "\u2063SELF-PROMPT\u2063"
_FORMAT = 1


def is_self_prompts(spec: str) -> bool:
    return spec.startswith(SELF_PROMPTS)


def parse_spec(spec: str) -> tuple[int, dict[str, Any]]:
    """`self-prompts:N?key=value&...` -> (N, options); one clear error naming the bad part."""
    count, _, query = spec[len(SELF_PROMPTS):].partition("?")
    if not count.isdigit() or int(count) < 1:
        raise LLMModulesError(f"data '{spec}': self-prompts needs a count of prompts >= 1, like self-prompts:256")
    options = dict(_DEFAULTS)
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in _OPTIONS:
            raise LLMModulesError(f"data '{spec}': unknown option '{key}' (known: {', '.join(_OPTIONS)})")
        try:
            options[key] = _OPTIONS[key](value)
        except ValueError:
            raise LLMModulesError(f"data '{spec}': option '{key}' must be {_OPTIONS[key].__name__}, got {value!r}") \
                from None
    if options["max_tokens"] < 1 or not options["temperature"] > 0 or not 0 < options["top_p"] <= 1:
        raise LLMModulesError(f"data '{spec}': needs max_tokens >= 1, temperature > 0 and 0 < top_p <= 1")
    return int(count), options


def user_turn_opening(tokenizer: Any) -> list[int]:
    """The token ids of the tokenizer's chat template up to where a first user message's text starts (the system
    prompt the template adds by itself included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise LLMModulesError("self-prompts: the large model's tokenizer has no chat template to open a user turn with")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    if _SENTINEL not in text:
        raise LLMModulesError("self-prompts: the chat template does not place the user's text verbatim")
    return tokenizer(text[: text.index(_SENTINEL)], add_special_tokens=False)["input_ids"]


def prompts_key(large: torch.nn.Module, spec: str, count: int, options: dict[str, Any], opening: list[int],
                eos: list[int]) -> str:
    """Hex digest of everything that decides the sampled prompts."""
    import transformers

    from llm_modules.states.store import large_weights_digest
    from llm_modules.version import __version__

    payload = {"format": _FORMAT, "large": spec, "weights": large_weights_digest(large), "count": count,
               "options": options, "opening": opening, "eos": eos, "batch": GENERATE_BATCH,
               "dtype": str(next(large.parameters()).dtype), "torch": torch.__version__,
               "transformers": transformers.__version__, "llm_modules": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def sample_batch(large: torch.nn.Module, opening: list[int], rows: int, options: dict[str, Any], eos: list[int],
                 seed: int) -> list[list[int]]:
    """`rows` continuations of the user-turn opening, sampled with one generator seeded by `seed`; each ends
    with its first end-of-sequence token, or is cut at max_tokens (then it has none)."""
    device = next(large.parameters()).device
    ids = torch.tensor([opening] * rows, dtype=torch.long, device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = generate(large, ids, torch.ones_like(ids), max_new_tokens=options["max_tokens"], do_sample=True,
                   temperature=options["temperature"], top_p=options["top_p"], eos_token_id=eos,
                   pad_token_id=eos[0], generator=generator)
    written = []
    for row in out[:, len(opening):].tolist():
        end = next((n + 1 for n, t in enumerate(row) if t in eos), len(row))
        written.append(row[:end])
    return written


def self_prompt_records(large: torch.nn.Module, tokenizer: Any, large_spec: str, spec: str, root: Path,
                        is_main: bool = True, wait: Any = None, progress: bool = False
                        ) -> tuple[list[Record], dict[str, Any]]:
    """The records of `spec` (each a user prompt the large model wrote and an empty answer, answered later) and
    a report: asked, kept, why the others went (empty, repeated), how many were cut at max_tokens, the file. The main process samples (or reads) them; the others
    wait (`wait()`: a barrier) and read them."""
    count, options = parse_spec(spec)
    opening = user_turn_opening(tokenizer)
    eos = model_eos_ids(large, tokenizer)
    if not eos:
        raise LLMModulesError("self-prompts: the large model has no end-of-sequence token to end a prompt with")
    key = prompts_key(large, large_spec, count, options, opening, eos)
    path = root / f"{key}.json"
    batches = [list(range(start, min(start + GENERATE_BATCH, count))) for start in range(0, count, GENERATE_BATCH)]
    if is_main:
        with decoding_linears(large):  # oneDNN's kernels where torch's are slow (models.cpu_linear)
            kept_batches(path, key, batches,
                         lambda n, rows: sample_batch(large, opening, len(rows), options, eos,
                                                      options["seed"] * 100003 + n),
                         lambda i, out: token_list(out) and len(out) <= options["max_tokens"],
                         "self-prompts" if progress else "")
    if wait is not None:
        wait()
    records, report = records_from_written(json.loads(path.read_text())["answers"], tokenizer, eos)
    report = {"asked": count, **report, "file": str(path)}
    if not records:
        raise LLMModulesError(f"data '{spec}': the large model wrote no usable prompt ({report}); is it a chat model?")
    return records, report


def records_from_written(written: list[list[int]], tokenizer: Any, eos: list[int]) -> tuple[list[Record], dict[str, int]]:
    """The prompts of sampled rows (token ids, each ending at its first end-of-sequence id or cut) as records with
    an empty answer, dropping empty and repeated ones; and the counts: cut_at_max_tokens, empty, repeated, kept."""
    report = {"cut_at_max_tokens": 0, "empty": 0, "repeated": 0}
    seen: set[str] = set()
    records = []
    for i, tokens in enumerate(written):
        ended = bool(tokens) and tokens[-1] in eos
        report["cut_at_max_tokens"] += not ended  # kept: a request cut short is still one the target answers
        text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True).strip()
        if not text:
            report["empty"] += 1
        elif text in seen:
            report["repeated"] += 1
        else:
            seen.add(text)
            records.append(Record(system=None, messages=[{"role": "user", "content": text},
                                                          {"role": "assistant", "content": ""}],
                                  source=f"{SELF_PROMPTS}{i}"))
    report["kept"] = len(records)
    return records, report
