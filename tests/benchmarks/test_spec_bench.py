"""benchmarks/spec_bench.py: the committed Spec-Bench file, the per-category selection and Spec-Bench's arithmetic."""

from __future__ import annotations

import hashlib

import pytest

from ..helpers import load_benchmark


def load_script():
    return load_benchmark("spec_bench")


def test_the_committed_file_is_spec_bench_unchanged_with_its_six_categories():
    sb = load_script()
    digest = hashlib.sha256(sb.QUESTIONS.read_bytes()).hexdigest()
    assert digest == "4b6d33e79484f9841c487ee87d1cf6aa8c6066f61d5d482ff09e5a007fafdf04"
    questions = sb.load_questions()
    assert len(questions) == 480
    counts = {c: sum(q["category"] == c for q in questions) for c in sb.CATEGORIES}
    assert counts == {c: 80 for c in sb.CATEGORIES}
    assert (sb.QUESTIONS.parent / "LICENSE").read_text().startswith("Apache License") or \
        "Apache License" in (sb.QUESTIONS.parent / "LICENSE").read_text()


def test_selection_spreads_over_each_category_and_mt_bench_takes_one_of_each_subcategory():
    sb = load_script()
    questions = sb.load_questions()
    chosen = sb.select(questions, 8)
    assert len(chosen) == 48
    mt = [q for q in chosen if q["category"] == "mt_bench"]
    assert sorted(q["subcategory"] for q in mt) == sorted(sb.MT_BENCH)
    rag = [q["id"] for q in chosen if q["category"] == "rag"]
    all_rag = [q["id"] for q in questions if q["category"] == "rag"]
    assert rag == all_rag[::10]  # evenly spread, not the first 8
    assert sb.select(questions, 8) == chosen  # the same questions every run
    with pytest.raises(ValueError):
        sb.select(questions, 0)


def test_a_malformed_line_names_its_file_and_line(tmp_path):
    sb = load_script()
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["a?"]}\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl:2"):
        sb.load_questions(path)


def test_leaked_finds_a_question_inside_a_training_prompt():
    sb = load_script()
    questions = [{"id": 7, "prompt": "Summarize  the text\nbelow."}, {"id": 8, "prompt": "Other question"}]
    assert sb.leaked(["System: hi. summarize the text below. Thanks"], questions) == [7]
    assert sb.leaked(["nothing here"], questions) == []


def test_speedup_is_a_ratio_of_mean_per_question_speeds_and_accepted_length_counts_the_targets_token():
    sb = load_script()
    rows = [
        {"method": "target", "category": "qa", "tokens": 10, "seconds": 1.0, "passes": None, "accepted": None},
        {"method": "target", "category": "qa", "tokens": 20, "seconds": 4.0, "passes": None, "accepted": None},
        {"method": "ours", "category": "qa", "tokens": 10, "seconds": 0.5, "passes": 4, "accepted": 6},
        {"method": "ours", "category": "qa", "tokens": 20, "seconds": 4.0, "passes": 6, "accepted": 4},
    ]
    summary = sb.summarize(rows, baseline="target")
    # target: mean(10, 5) = 7.5 tok/s; ours: mean(20, 5) = 12.5 -> 1.667x (a ratio of sums would say 1.111x)
    assert summary["target"]["qa"]["tokens_per_s"] == 7.5
    assert summary["ours"]["qa"]["speedup"] == 1.667
    assert summary["ours"]["qa"]["mean_accepted"] == 2.0  # 1 + 10 kept / 10 passes
    assert summary["target"]["qa"]["mean_accepted"] is None
    assert summary["ours"]["overall"]["n"] == 2
    lines = sb.table(summary)
    assert lines[0].startswith("| method | qa | overall |") and "1.67x (2.00)" in lines[3]


def test_humaneval_is_the_committed_file_spread_and_kept_out_of_the_overall():
    sb = load_script()
    digest = hashlib.sha256(sb.HUMANEVAL.read_bytes()).hexdigest()
    assert digest == "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
    assert "MIT License" in (sb.HUMANEVAL.parent / "LICENSE").read_text()
    code = sb.load_humaneval(4)
    assert [q["id"] for q in code] == ["HumanEval/0", "HumanEval/41", "HumanEval/82", "HumanEval/123"]
    assert all(q["category"] == "humaneval" and "def " in q["prompt"] and q["prompt"].startswith("Complete")
               for q in code)
    rows = [{"method": m, "category": c, "tokens": 10, "seconds": s, "passes": None, "accepted": None}
            for m, s in (("base", 2.0), ("fast", 1.0)) for c in ("qa", "humaneval")]
    rows[-1]["seconds"] = 0.25  # fast on code: 4x, which must not reach the overall
    summary = sb.summarize(rows, "base")
    assert summary["fast"]["overall"]["speedup"] == 2.0 and summary["fast"]["humaneval"]["speedup"] == 8.0
    assert summary["fast"]["overall"]["n"] == 1
    assert sb.table(summary)[0] == "| method | qa | overall | humaneval |"
