#!/usr/bin/env bash
# Spec-Bench, 2 per category + 2 HumanEval, float32, our kernel, after the plain-pass work and the first-proposal read: target alone, our lookup
# with the policy, the general drafter's default decoding (the same questions as reports/spec_bench/avx2_general_float32).
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1  # with the package installed (make install); runs/drafter-general/last: the one-command general drafter
OUT=reports/spec_bench/avx2_general_first_read
python benchmarks/speculative.py --threads 2 --dtype float32 --spec-bench 2 --humaneval 2 --lookup-tokens 10 \
  --adaptive --drafter runs/drafter-general/last --only-default --no-chains \
  --no-transformers --assistant '' --output $OUT
