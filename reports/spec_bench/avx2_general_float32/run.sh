#!/usr/bin/env bash
# Spec-Bench, 2 per category + 2 HumanEval, float32, our kernel: the tenth session's target and lookup rows reused
# (its questions.jsonl copied here), the general drafter's two rows timed by the first invocation, transformers'
# rows by the second; each alone.
OUT=reports/spec_bench/avx2_general_float32
[ -f $OUT/questions.jsonl ] || cp reports/spec_bench/avx2_lookup_float32_ours_2/questions.jsonl $OUT/questions.jsonl
python benchmarks/speculative.py --threads 2 --dtype float32 --spec-bench 2 --humaneval 2 --lookup-tokens 10 \
  --adaptive --drafter runs/drafter-general/last --only-default --no-chains --policy stand_aside=0 \
  --no-transformers --assistant '' --output $OUT
# then, after the batch sweep, transformers' rows (assisted generation, its prompt lookup): the rest is skipped
python benchmarks/speculative.py --threads 2 --dtype float32 --spec-bench 2 --humaneval 2 --lookup-tokens 10 \
  --adaptive --drafter runs/drafter-general/last --only-default --no-chains --policy stand_aside=0 \
  --output $OUT
