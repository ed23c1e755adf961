#!/usr/bin/env bash
# Spec-Bench, 2 per category + 2 HumanEval (the same 14 questions as ../avx2_general_first_read), float32, our
# kernel, one run alone: the target alone, our prompt lookup (chain, and with the drafting policy), and two
# one-command general drafters trained on this CPU with their states kept from the answers' generation
# (reports/drafter_recipe/avx2_state_reuse/run.sh): the default 256 self-prompts (40 min 43 s) and 160 (the only change).
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1  # with the package installed (make install)
OUT=reports/spec_bench/avx2_recipe_160
python benchmarks/speculative.py --threads 2 --dtype float32 --spec-bench 2 --humaneval 2 --lookup-tokens 10 \
  --adaptive --drafter runs/drafter-general-s16/last --drafter runs/drafter-general-160/last --only-default \
  --no-chains --no-transformers --assistant '' --output $OUT
