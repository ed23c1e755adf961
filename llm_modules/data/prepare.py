"""Data layer: render records with the LARGE model's tokenizer, apply the length policy, split, batch.

Records come from :mod:`llm_modules.data.sources`. Templates (:func:`render`): ``stratos`` (the
paper's text layout, EOS appended to every answer) and ``chat`` (the tokenizer's chat template).
Loss is on the assistant turns by default (``loss_on="all"`` reproduces the paper). The validation
split is decided by a sha256 of each record's content, so it never changes between epochs or runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Any

from llm_modules.data.sources import Record, load_records
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import IGNORE_INDEX, right_pad

TEMPLATES = ("stratos", "chat")
LOSS_ON = ("assistant", "all")
OVERFLOW = ("drop", "truncate")
_FORMAT_VERSION = "data-v1"  # bump when rendering changes, so cached token ids are rebuilt

STRATOS_SYSTEM_PROMPT = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic "
    "long thinking process before providing the final precise and accurate solutions. This "
    "requires engaging in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracing, and iteration to develop well-considered thinking "
    "process. Please structure your response into two main sections: Thought and Solution. In "
    "the Thought section, detail your reasoning process using the specified format: "
    "<|begin_of_thought|> {thought with steps separated with '\n\n'} <|end_of_thought|> Each "
    "step should include detailed considerations such as analisying questions, summarizing "
    "relevant findings, brainstorming new ideas, verifying the accuracy of the current steps, "
    "refining any errors, and revisiting previous steps. In the Solution section, based on "
    "various attempts, explorations, and reflections from the Thought section, systematically "
    "present the final solution that you deem correct. The solution should remain a logical, "
    "accurate, concise expression style and detail necessary step needed to reach the "
    "conclusion, formatted as follows: <|begin_of_solution|> {final formatted, precise, and "
    "clear solution} <|end_of_solution|> Now, try to solve the following question through the "
    "above guidelines:"
)  # verbatim from Bespoke-Stratos-17k (typos included)

# ----------------------------------------------------------------------------- rendering
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text (e.g. Llama's BOS); usually none."""
    with_special, plain = list(tokenizer("a", add_special_tokens=True)["input_ids"]), _encode(tokenizer, "a")
    n = len(with_special) - len(plain)
    return with_special[:n] if n > 0 and with_special[n:] == plain else []


def _segments_to_ids(tokenizer, segments: list[tuple[str | list[int], bool]], loss_on: str):
    """Tokenize (text-or-ids, is_target) segments separately and concatenate with labels."""
    ids: list[int] = []
    labels: list[int] = []
    for piece, target in segments:
        part = piece if isinstance(piece, list) else _encode(tokenizer, piece)
        ids += part
        labels += part if (target or loss_on == "all") else [IGNORE_INDEX] * len(part)
    return ids, labels


def _stratos_segments(record: Record, tokenizer) -> list[tuple[str | list[int], bool]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LLMModulesError("template 'stratos': the tokenizer has no eos_token_id to end answers with")
    system = record.system if record.system is not None else STRATOS_SYSTEM_PROMPT
    segs: list[tuple[str | list[int], bool]] = [(_bos_prefix(tokenizer), False)]
    prompt = f"System:\n\n{system}\n\n"
    for msg in record.messages:
        if msg["role"] == "user":
            prompt += f"User:\n\n{msg['content']}\n\nAssistant:\n\n"
        else:
            segs += [(prompt, False), (msg["content"], True), ([eos], True)]
            prompt = "\n\n"
    segs.append((prompt, False))
    return segs


# A conversation whose template rewrites message text is located one render per assistant turn;
# prompts (one_render) refuse more turns than this rather than render for seconds.
MAX_TURNS_RENDERED_APART = 256
_SPACES = re.compile(" *")


def _content_starts(msgs: list[dict[str, str]], tokenizer, full: str) -> list[int] | None:
    """Where each message's content starts in `full` (the conversation rendered), from ONE more render
    in which each content is a unique marker; None when the template changes the text (the markers
    then cannot stand in for the contents) or the render fails."""
    markers = [f"\ue000{i}\ue001" for i in range(len(msgs))]  # private-use characters: in no template
    try:
        marked = tokenizer.apply_chat_template([{**m, "content": k} for m, k in zip(msgs, markers)], tokenize=False)
    except Exception:
        return None
    found = list(re.finditer("\ue000([0-9]+)\ue001", marked))
    if [m.group(1) for m in found] != [str(i) for i in range(len(msgs))]:  # each once, in order
        return None
    starts, pieces, length, cursor = [], [], 0, 0
    for at, msg in zip(found, msgs):
        length += at.start() - cursor
        starts.append(length)
        length += len(msg["content"])
        pieces += [marked[cursor:at.start()], msg["content"]]
        cursor = at.end()
    pieces.append(marked[cursor:])
    return starts if "".join(pieces) == full else None


def _chat_segments(record: Record, tokenizer, one_render: bool = False) -> list[tuple[str | list[int], bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise LLMModulesError("template 'chat': the tokenizer has no chat template; use --template stratos")
    msgs = ([{"role": "system", "content": record.system}] if record.system is not None else []) \
        + [dict(m) for m in record.messages]
    try:
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as e:
        raise LLMModulesError(f"{record.source}: the chat template failed ({e})") from None
    starts = _content_starts(msgs, tokenizer, full) if one_render else None
    if one_render and starts is None and sum(m["role"] == "assistant" for m in msgs) > MAX_TURNS_RENDERED_APART:
        raise LLMModulesError(f"this chat template rewrites message text, so each assistant turn is rendered apart; "
                              f"send at most {MAX_TURNS_RENDERED_APART} assistant turns")
    specials = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    segs: list[tuple[str | list[int], bool]] = []
    cursor = 0
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        try:  # skip past the prompt as the template renders it, so a quote in the question never matches
            if starts is not None:  # known from the marked render: no render per turn
                start = max(cursor, starts[i])
            else:
                head = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
                start = max(cursor, len(os.path.commonprefix([head, full])))
        except Exception:
            start = cursor
        content = msg["content"]
        pos = full.find(content, start)
        if pos < 0:
            content = content.strip()
            pos = full.find(content, start)
        if pos < 0:
            raise LLMModulesError(f"{record.source}: the chat template changes assistant turn {i}'s "
                                  "text, so its loss span cannot be found; use --template stratos")
        end = pos + len(content)
        gap = _SPACES.match(full, end).end() - end  # the end-of-turn token, maybe after spaces
        closing = next((t for t in sorted(specials, key=len, reverse=True) if full.startswith(t, end + gap)), None)
        if closing:
            end += gap + len(closing)
        segs += [(full[cursor:pos], False), (full[pos:end], True)]
        cursor = end
    segs.append((full[cursor:], False))
    return segs


def render(record: Record, tokenizer, template: str = "stratos", loss_on: str = "assistant",
           one_render: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and aligned labels (same length, IGNORE_INDEX = no loss; the model shifts) for ``record``.

    ``stratos``: "System:\\n\\n{system}\\n\\nUser:\\n\\n{q}\\n\\nAssistant:\\n\\n{a}<eos>\\n\\n"
    (more turns repeat the User/Assistant blocks; system defaults to
    :data:`STRATOS_SYSTEM_PROMPT`). ``chat``: the tokenizer's chat template; the assistant
    content plus the end-of-turn token that follows it are the targets; `one_render` finds the
    assistant turns with two renders of the template instead of one per turn (the same ids unless an
    answer's text also sits between the template's head for that turn and the answer itself).
    """
    if template not in TEMPLATES:
        raise LLMModulesError(f"unknown template '{template}' (choose from {', '.join(TEMPLATES)})")
    if loss_on not in LOSS_ON:
        raise LLMModulesError(f"unknown loss_on '{loss_on}' (choose from {', '.join(LOSS_ON)})")
    segs = _stratos_segments(record, tokenizer) if template == "stratos" else _chat_segments(record, tokenizer,
                                                                                           one_render)
    return _segments_to_ids(tokenizer, segs, loss_on)


# ----------------------------------------------------------------------------- split / subset
def _score(key: str, seed: int, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (content, seed, salt): sha256, no RNG state."""
    digest = hashlib.sha256(f"{salt}\0{seed}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_records(records: list[Record], val_fraction: float, seed: int = 0
                  ) -> tuple[list[Record], list[Record]]:
    """Split into (train, val), keeping input order inside each part.

    A record is in val when sha256(seed, content) maps below ``val_fraction``; position, order
    and epoch play no part, and identical records always land on the same side. When that
    leaves val empty (``val_fraction > 0``, at least 2 records) the record with the smallest
    hash moves to val.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LLMModulesError(f"val_fraction must be in [0, 1), got {val_fraction}")
    scores = [_score(r.content_key(), seed, "val") for r in records]
    is_val = [s < val_fraction for s in scores]
    if val_fraction > 0 and len(records) >= 2 and not any(is_val):
        is_val[min(range(len(records)), key=lambda i: (scores[i], records[i].content_key()))] = True
    if len(records) >= 2 and all(is_val):  # never leave train empty
        is_val[max(range(len(records)), key=lambda i: (scores[i], records[i].content_key()))] = False
    return ([r for r, v in zip(records, is_val) if not v], [r for r, v in zip(records, is_val) if v])


def subset_records(records: list[Record], fraction: float, seed: int = 0) -> list[Record]:
    """Keep ``round(fraction * n)`` records (at least 1): those with the smallest seeded hash.

    Order independent and reproducible, like a seeded random sample; input order is kept.
    """
    if fraction >= 1.0:
        return list(records)
    k = max(1, round(fraction * len(records)))
    ranked = sorted(range(len(records)), key=lambda i: (_score(records[i].content_key(), seed, "subset"), i))
    keep = set(ranked[:k])
    return [r for i, r in enumerate(records) if i in keep]


# ----------------------------------------------------------------------------- top level
@dataclass
class DataConfig:
    """What to load and how to tokenize it; validated on construction."""

    spec: str
    template: str = "stratos"
    loss_on: str = "assistant"
    max_length: int = 1024
    overflow: str = "drop"
    val_fraction: float = 0.1
    seed: int = 0
    subset: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.spec, str) and self.spec.strip() != "", f"data spec must be a non-empty string, got {self.spec!r}"),
            (self.template in TEMPLATES, f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}"),
            (self.loss_on in LOSS_ON, f"--loss-on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}"),
            (isinstance(self.max_length, int) and not isinstance(self.max_length, bool) and self.max_length >= 2,
             f"--max-length must be an integer >= 2, got {self.max_length!r}"),
            (self.overflow in OVERFLOW, f"--overflow must be one of {', '.join(OVERFLOW)}, got {self.overflow!r}"),
            (isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0,
             f"--val-fraction must be in [0, 1), got {self.val_fraction!r}"),
            (isinstance(self.seed, int) and not isinstance(self.seed, bool), f"--seed must be an integer, got {self.seed!r}"),
            (isinstance(self.subset, (int, float)) and 0.0 < self.subset <= 1.0,
             f"--subset must be in (0, 1], got {self.subset!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LLMModulesError(message)


@dataclass
class TokenizedExample:
    """Token ids and aligned labels (IGNORE_INDEX = no loss) of one record."""

    input_ids: list[int]
    labels: list[int]
    record: Record


def prompt_length(example: TokenizedExample) -> int:
    """Tokens before the example's first labelled one: its prompt, template included (every token when
    nothing is labelled)."""
    return next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))


@dataclass
class PreparedData:
    """Train and fixed validation examples plus a report of counts."""

    train: list[TokenizedExample]
    val: list[TokenizedExample]
    report: dict[str, Any]


def check_positions(max_length: int, model_max_positions: int | None) -> None:
    """Refuse a max length the model cannot position (never cut silently)."""
    if model_max_positions is not None and max_length > model_max_positions:
        raise LLMModulesError(f"the model can position {model_max_positions} tokens but "
                              f"--max-length is {max_length}; lower --max-length")


def prepare_data(config: DataConfig, tokenizer, model_max_positions: int | None = None,
                 records: list[Record] | None = None) -> PreparedData:
    """Load, subset, render, apply the length policy, then split into train/val.

    ``drop``: examples over ``max_length`` tokens are dropped. ``truncate``: they keep their
    first ``max_length`` tokens, and are dropped anyway if no loss target survives (the label at
    position 0 never counts, the model shifts). Every case is counted in ``report``. ``records``: the
    spec's records when the caller made them (a source a model writes); else loaded from the spec.
    """
    check_positions(config.max_length, model_max_positions)
    records = load_records(config.spec) if records is None else records
    chosen = subset_records(records, config.subset, config.seed)
    report = {"records": len(records), "subset": len(chosen), "kept": 0, "dropped_too_long": 0,
              "truncated": 0, "dropped_no_loss_tokens": 0, "max_length": config.max_length}
    examples: list[TokenizedExample] = []
    for rec in chosen:
        ids, labels = render(rec, tokenizer, config.template, config.loss_on)
        if len(ids) > config.max_length:
            if config.overflow == "drop":
                report["dropped_too_long"] += 1
                continue
            ids, labels = ids[: config.max_length], labels[: config.max_length]
            report["truncated"] += 1
        if all(x == IGNORE_INDEX for x in labels[1:]):
            report["dropped_no_loss_tokens"] += 1
            continue
        examples.append(TokenizedExample(ids, labels, rec))
    if not examples:
        raise LLMModulesError(f"data '{config.spec}': no example is left after the length policy "
                              f"(max_length {config.max_length}, overflow '{config.overflow}'): {report}")
    train_recs, val_recs = split_records([e.record for e in examples], config.val_fraction, config.seed)
    val_ids = {id(r) for r in val_recs}
    train = [e for e in examples if id(e.record) not in val_ids]
    val = [e for e in examples if id(e.record) in val_ids]
    report.update(kept=len(examples), train=len(train), val=len(val),
                  train_tokens=sum(len(e.input_ids) for e in train),
                  train_loss_tokens=sum(sum(x != IGNORE_INDEX for x in e.labels[1:]) for e in train))
    return PreparedData(train=train, val=val, report=report)


def examples_digest(examples: list[TokenizedExample]) -> str:
    """sha256 of every example's input ids and labels, in order: which examples, tokenized how."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels], separators=(",", ":")).encode())
    return h.hexdigest()


def examples_fingerprint(data: PreparedData) -> str:
    """Digest of the prepared train and validation examples (what a resumed run must see again)."""
    return hashlib.sha256(f"{examples_digest(data.train)}:{examples_digest(data.val)}".encode()).hexdigest()


# ----------------------------------------------------------------------------- units
def answer_text(record: Record) -> str:
    """The text the loss is on by default: the assistant turns' contents, joined."""
    return "".join(m["content"] for m in record.messages if m["role"] == "assistant")


def answer_bytes(record: Record) -> int:
    """UTF-8 bytes of the answer text: the denominator of bits per byte."""
    return len(answer_text(record).encode("utf-8"))


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Summed answer-token negative log-likelihood (nats) / ln 2 / UTF-8 bytes of the answers.

    Unlike loss per token it does not depend on the tokenizer, so models with different
    vocabularies are compared in one unit. The answer-token NLL includes each answer's closing
    token (EOS or end of turn): predicting where the answer stops is part of the answer.
    """
    return nll_sum / math.log(2) / n_bytes if n_bytes else float("nan")


# ----------------------------------------------------------------------------- batching
def pad_id(tokenizer) -> int:
    """The id used to fill padding: the tokenizer's pad token, else its EOS, else 0 (always masked)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


def collate(examples: list, pad_id: int) -> dict:
    """Right-pad a batch into tensors: input_ids (pad_id), attention_mask (0 on pad), labels (IGNORE_INDEX on
    pad). ``examples`` are :class:`TokenizedExample` or mappings with ``input_ids`` and ``labels``.
    """
    if not examples:
        raise LLMModulesError("collate: empty batch")
    rows = [(e["input_ids"], e["labels"]) if isinstance(e, dict) else (e.input_ids, e.labels) for e in examples]
    input_ids, mask = right_pad([ids for ids, _ in rows], pad_id)  # (B, W), (B, W)
    labels, _ = right_pad([lab for _, lab in rows], IGNORE_INDEX)  # (B, W): labels align with the ids
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int = 0, epoch: int = 0,
                           chunk_batches: int = 50) -> list[list[int]]:
    """Indices in batches of similar length, reshuffled per epoch, deterministic for (seed, epoch).

    Shuffle all indices, cut them into mega-chunks of ``chunk_batches * batch_size``, sort each
    chunk by length (longest first), cut into batches, then shuffle the batch order.
    """
    if batch_size < 1:
        raise LLMModulesError(f"batch size must be >= 1, got {batch_size}")
    rng = random.Random(f"length-grouped:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * max(1, chunk_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start: start + chunk], key=lambda i: -lengths[i])
        batches += [part[j: j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches
