#!/usr/bin/env bash
# The drafters of reports/speculative (issue 25), trained one after another with nothing else running:
#   bash benchmarks/train_drafters.sh [a b c d e f]    (default: a to e; each writes runs/drafter-*)
# a-e: target Qwen2.5-Coder-1.5B-Instruct (read in bfloat16 to build the state cache: 2.6x faster than
# float32 here), SmolLM2-135M's first N layers, K = 4, 300 gsm_symbolic problems (seed 1; the benchmark's
# prompts are seed 999), draft vocabulary: the most frequent answer tokens (at most 8192; gsm_symbolic's
# answers hold 1,000 distinct ones), AdamW 1e-3 (bridge 2e-3), batch 8.
#   a  the paper's bridge (eca), N=2, KL, 300 steps           (its own state cache)
#   b  the ladder (taps 14, 21, 28), N=2, KL, 300 steps        (its own state cache)
#   c  as b with cross-entropy on the target's arg-max         (reuses b's cache)
#   d  as b with N=4                                           (reuses b's cache)
#   e  as b for 500 steps                                      (reuses b's cache)
#   f  as b, trained on the target's own greedy chat answers (--drafter-targets generated) to 96 prompts,
#      each cut at 256 tokens in all (prompts are about 100; the benchmark decodes 128), so that generation,
#      the state cache and training fit the 20-minute budget; its own state cache (flags given twice: the
#      later wins)
set -euo pipefail
cd "$(dirname "$0")/.."
LLM=${LLM:-.venv/bin/llm-modules}
common=(train --method drafter --large qwen2.5-coder-1.5b-instruct --small smollm2-135m-instruct
        --draft-tokens 4 --draft-vocab 8192 --data 'reasoning-gym:gsm_symbolic?size=300&seed=1' --template chat
        --max-length 512 --val-fraction 0.05 --large-dtype bfloat16 --batch-size 8 --eval-every 100
        --save-every 100 --num-samples 0 --lr-small 1e-3 --lr-bridge 2e-3 --drafter-targets logits)
ladder=(--bridge ladder --large-layers 14,21,28 --state-cache-dir runs/states-ladder)
for which in "${@:-a b c d e}"; do
  for w in $which; do
    case $w in
      a) "$LLM" "${common[@]}" --bridge eca --state-cache-dir runs/states-eca --small-layers 2 --drafter-loss kl \
           --max-steps 300 --output runs/drafter-eca ;;
      b) "$LLM" "${common[@]}" "${ladder[@]}" --small-layers 2 --drafter-loss kl --max-steps 300 --output runs/drafter-ladder ;;
      c) "$LLM" "${common[@]}" "${ladder[@]}" --small-layers 2 --drafter-loss ce --max-steps 300 --output runs/drafter-ladder-ce ;;
      d) "$LLM" "${common[@]}" "${ladder[@]}" --small-layers 4 --drafter-loss kl --max-steps 300 --output runs/drafter-ladder-n4 ;;
      e) "$LLM" "${common[@]}" "${ladder[@]}" --small-layers 2 --drafter-loss kl --max-steps 500 --output runs/drafter-ladder-500 ;;
      f) "$LLM" "${common[@]}" --data 'reasoning-gym:gsm_symbolic?size=96&seed=1' --max-length 256 \
           --bridge ladder --large-layers 14,21,28 \
           --state-cache-dir runs/states-ladder-gen --drafter-targets generated --small-layers 2 --drafter-loss kl \
           --max-steps 300 --output runs/drafter-ladder-gen ;;
      *) echo "unknown drafter $w (a b c d e f)" >&2; exit 2 ;;
    esac
  done
done
