"""Where records come from: local files, hub datasets, reasoning-gym generators, in three formats.

Sources (:func:`load_records`): a local ``.json`` (list or JSON lines), ``.jsonl`` or
``.parquet`` file; a hub dataset ``name`` or ``name:split`` (through ``datasets``); or
``reasoning-gym:TASK?size=N&seed=S&key=value`` (generated offline). Each record may be in
Bespoke-Stratos/ShareGPT (``system`` + ``conversations``), OpenAI ``messages`` or
``prompt``/``completion`` form; all become a :class:`Record`.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl

from llm_modules.errors import LLMModulesError

RG_PREFIX = "reasoning-gym:"
RG_DEFAULT_SIZE = 1000

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "system": "system"}


@dataclass
class Record:
    """One conversation: user/assistant turns alternating, starting with user, ending with assistant.

    ``scorer`` (optional) maps an already-extracted final answer to a score in [0, 1]; it is
    not part of equality.
    """

    system: str | None
    messages: list[dict[str, str]]
    reference: str | None = None
    source: str = ""
    scorer: Callable[[str], float] | None = field(default=None, compare=False, repr=False)

    def content_key(self) -> str:
        """Canonical JSON of what the record says (not where it came from)."""
        return json.dumps([self.system, self.messages, self.reference], sort_keys=True,
                          ensure_ascii=False)


# ----------------------------------------------------------------------------- loading
def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise LLMModulesError(f"{where}: field '{what}' must be a string, got {type(value).__name__}")
    return value


def _field(obj: Any, name: str, where: str) -> Any:
    if not isinstance(obj, dict) or name not in obj or obj[name] is None:
        raise LLMModulesError(f"{where}: missing field '{name}'")
    return obj[name]


def to_record(raw: Any, where: str) -> Record:
    """Convert one raw record (any supported format, detected from its keys) to a :class:`Record`."""
    if not isinstance(raw, dict):
        raise LLMModulesError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    system = raw.get("system")
    turns: list[tuple[str, str]] = []
    if raw.get("conversations") is not None or raw.get("messages") is not None:
        key, role_key, text_key = (("conversations", "from", "value") if raw.get("conversations")
                                   is not None else ("messages", "role", "content"))
        items = raw[key]
        if not isinstance(items, list):
            raise LLMModulesError(f"{where}: field '{key}' must be a list")
        for j, turn in enumerate(items):
            at = f"{where}: {key}[{j}]"
            role = _text(_field(turn, role_key, at), role_key, at)
            if role.lower() not in _ROLES:
                raise LLMModulesError(f"{at}: unknown {role_key} '{role}' (expected user/assistant/human/gpt/system)")
            turns.append((_ROLES[role.lower()], _text(_field(turn, text_key, at), text_key, at)))
    elif "prompt" in raw or "completion" in raw:
        turns = [("user", _text(_field(raw, "prompt", where), "prompt", where)),
                 ("assistant", _text(_field(raw, "completion", where), "completion", where))]
    else:
        raise LLMModulesError(f"{where}: missing field 'conversations', 'messages' or "
                              f"'prompt'/'completion' (record has: {', '.join(map(str, raw)) or 'nothing'})")
    if turns and turns[0][0] == "system":
        if system is not None:
            raise LLMModulesError(f"{where}: system prompt given twice (field and first turn)")
        system = turns.pop(0)[1]
    if system is not None:
        system = _text(system, "system", where)
    if not turns:
        raise LLMModulesError(f"{where}: no conversation turns")
    for j, (role, text) in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if role != want:
            raise LLMModulesError(f"{where}: turn {j} is '{role}' but '{want}' was expected "
                                  "(turns must alternate user/assistant, starting with user)")
        if role == "assistant" and not text.strip():
            raise LLMModulesError(f"{where}: turn {j} (assistant) is empty")
    if turns[-1][0] != "assistant":
        raise LLMModulesError(f"{where}: the last turn must be the assistant's answer")
    ref = raw.get("reference", raw.get("answer"))
    return Record(system=system, messages=[{"role": r, "content": t} for r, t in turns],
                  reference=None if ref is None else str(ref), source=where)


def _read_json_file(path: str) -> list[tuple[Any, str]]:
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LLMModulesError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    if path.endswith(".json") and text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip()[:1] == "[":
                raise LLMModulesError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        else:  # a list of records, or one record
            return [(rec, f"{name}[{i}]") for i, rec in enumerate(data if isinstance(data, list) else [data])]
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit in strings
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{name}:{lineno}"))
        except json.JSONDecodeError as e:
            raise LLMModulesError(f"{path}:{lineno}: invalid JSON line ({e.msg}, column {e.colno})") from None
    return out


def _read_parquet(path: str) -> list[tuple[Any, str]]:
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except ImportError:
        import datasets

        rows = list(datasets.Dataset.from_parquet(path))
    except Exception as e:  # corrupt file
        raise LLMModulesError(f"{path}: cannot read parquet file ({e})") from None
    name = os.path.basename(path)
    return [(row, f"{name}[{i}]") for i, row in enumerate(rows)]


def _load_hub(spec: str) -> list[tuple[Any, str]]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise LLMModulesError(f"data '{spec}': the 'datasets' package is needed for hub datasets "
                              "(pip install llm-modules[data])") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise LLMModulesError(f"data '{spec}': not a local file and cannot load it from the "
                              f"Hugging Face hub ({type(e).__name__}: {str(e)[:300]})") from None
    return [(row, f"{name}:{split or 'train'}[{i}]") for i, row in enumerate(ds)]


def parse_reasoning_gym_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``reasoning-gym:TASK?size=N&seed=S&k=v`` -> (TASK, kwargs); numbers/booleans are converted."""
    task, _, query = spec[len(RG_PREFIX):].partition("?")
    params: dict[str, Any] = {"size": RG_DEFAULT_SIZE, "seed": 0}
    for key, value in parse_qsl(query, keep_blank_values=True):
        conv: Any = value
        if value.lower() in ("true", "false"):
            conv = value.lower() == "true"
        else:
            for typ in (int, float):
                try:
                    conv = typ(value)
                    break
                except ValueError:
                    pass
        params[key] = conv
    return task.strip(), params


def _load_reasoning_gym(spec: str) -> list[Record]:
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise LLMModulesError(f"data '{spec}': the 'reasoning-gym' package is not installed") from None
    task, params = parse_reasoning_gym_spec(spec)
    if task not in DATASETS:
        near = difflib.get_close_matches(task, list(DATASETS), n=5) or sorted(DATASETS)[:8]
        raise LLMModulesError(f"data '{spec}': unknown reasoning-gym task '{task}'; did you mean "
                              f"{', '.join(near)}? ({len(DATASETS)} tasks exist)")
    try:
        ds = reasoning_gym.create_dataset(task, **params)
    except Exception as e:
        raise LLMModulesError(f"data '{spec}': bad reasoning-gym parameters {params} ({e})") from None
    records = []
    for i in range(len(ds)):
        item = ds[i]
        answer = str(item["answer"])
        worked = (item.get("metadata") or {}).get("answer_cot") or answer

        def scorer(text: str, _item=item) -> float:
            return float(ds.score_answer(text, entry=_item))

        records.append(Record(system=None, messages=[{"role": "user", "content": item["question"]},
                                                     {"role": "assistant", "content": worked}],
                              reference=answer, source=f"{RG_PREFIX}{task}#{i}", scorer=scorer))
    return records


def load_records(spec: str) -> list[Record]:
    """Load every record named by ``spec`` (see module docstring); errors name file and line."""
    if spec.startswith("self-prompts:"):
        raise LLMModulesError(f"data '{spec}': self-prompts are written by the large model while a drafter trains "
                              "(train --method drafter); no other command can load them")
    if spec.startswith(RG_PREFIX):
        records = _load_reasoning_gym(spec)
    else:
        if os.path.isdir(spec):
            raise LLMModulesError(f"data '{spec}' is a directory; name a .json, .jsonl or .parquet file")
        if os.path.exists(spec):
            if spec.endswith(".parquet"):
                raw = _read_parquet(spec)
            elif spec.endswith((".json", ".jsonl")):
                raw = _read_json_file(spec)
            else:
                raise LLMModulesError(f"data '{spec}': unsupported file type (use .json, .jsonl or .parquet)")
        elif spec.endswith((".json", ".jsonl", ".parquet")) or spec.startswith(("/", ".", "~")):
            raise LLMModulesError(f"data file not found: {spec}")
        else:
            raw = _load_hub(spec)
        records = [to_record(rec, where) for rec, where in raw]
    if not records:
        raise LLMModulesError(f"data '{spec}' contains no records")
    return records
