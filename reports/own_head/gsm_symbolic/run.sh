#!/bin/bash
# Issue 39, a first fixed-step measurement (not timed): the own head (xattn, prompt only) against the small model
# alone zero-shot, on gsm_symbolic's equal-time data; held-out test bits per byte.
cd /work/main
export PATH=/work/main/.venv/bin:$PATH PYTHONPATH=/work/main HF_HUB_OFFLINE=1 LLM_MODULES_CACHE=/work/main/.cache/llm-modules
OUT=/work/runs/own
mkdir -p $OUT
TEST='reasoning-gym:gsm_symbolic?size=32&seed=10000'
date
llm-modules eval --model smollm2-135m-instruct --data "$TEST" --split all --template chat --max-length 512 --no-generate \
  --output $OUT/small_zero_shot.json > $OUT/small_zero_shot.log 2>&1
for seed in 0; do
  llm-modules train --method composed --large qwen2.5-coder-1.5b-instruct --small smollm2-135m-instruct \
    --data 'reasoning-gym:gsm_symbolic?size=64&seed=0' --template chat --max-length 512 --batch-size 4 \
    --head own --large-reads prompt --bridge xattn --max-steps 132 --lr-small 1e-4 --lr-bridge 6e-4 --seed $seed \
    --eval-every 33 --save-every 33 --no-progress --output $OUT/own-xattn-seed$seed > $OUT/own-xattn-seed$seed.log 2>&1
  llm-modules eval --model $OUT/own-xattn-seed$seed/last --data "$TEST" --split all --template chat --max-length 512 \
    --no-generate --output $OUT/own-xattn-seed$seed.test.json > $OUT/own-xattn-seed$seed.test.log 2>&1
  date
done
