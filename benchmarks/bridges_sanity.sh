#!/bin/bash
# Single-seed sanity check of the bridges (not a benchmark): each bridge x small_inputs trained for
# the same 20 steps on the same data with the same rates; prints validation loss per answer token.
# Usage: benchmarks/bridges_sanity.sh OUT_DIR   (about 10 minutes per row on a 2-core CPU)
set -u
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
for combo in "eca bridge" "eca mapped" "ladder mapped" "xattn mapped" "ladder bridge" "xattn bridge"; do
  set -- $combo
  run="$out/$1-$2"
  rm -rf "$run"
  llm-modules train --large qwen2.5-coder-0.5b-instruct --small smollm2-135m-instruct \
    --data "reasoning-gym:leg_counting?size=80&seed=0" --template chat --max-length 320 \
    --bridge "$1" --small-inputs "$2" --max-steps 20 --batch-size 4 --eval-every 10 --num-samples 0 \
    --lr-bridge 1e-3 --lr-small 5e-4 --state-cache-dtype bfloat16 --no-progress \
    --state-cache-dir "$out/states" --output "$run" > "$run.log" 2>&1 || { echo "$1 $2 failed: see $run.log"; continue; }
  python - "$run" "$1" "$2" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
print(f"{sys.argv[2]:<7} {sys.argv[3]:<7} val loss {s['initial_val_loss']:.4f} -> best {s['best_val_loss']:.4f}  "
      f"({s['steps']} steps, {s['train_seconds']} s training)")
PY
done
