#!/usr/bin/env bash
# family_relationships, 10-minute distilled row (mapped student), seed 0: 98 steps (what 600 s gave the distilled row
# on the bfloat16 CPU, 6.1475 s a step), learning rate the gsm_symbolic grid's winner (no grid of its own: time).
while kill -0 4719 2>/dev/null; do sleep 10; done
cd /work/wt-report
export PYTHONPATH=/work/wt-report PATH=/work/main/.venv/bin:$PATH LLM_MODULES_CACHE=/work/main/.cache/llm-modules HF_HUB_OFFLINE=1
LR=$(python -c "import json; d=json.load(open('reports/equal_time/gsm_symbolic_distill_mapped/results.json')); r=[x for x in d['details'] if x['row']=='distilled'][0]; print(f\"{r['lr_small']}:{r['lr_bridge']}\")")
CAL=$(python /work/runs/distill/calib_one.py family_relationships distilled /work/runs/distill/fam_mapped | tail -1)
BUDGET=$(python -c "print(round(98 * $CAL, 2))")
echo "family calibration $CAL s/step: budget $BUDGET s; lr $LR"
python benchmarks/transfer_report.py --large qwen2.5-coder-1.5b-instruct --small smollm2-135m-instruct --accuracy-at 1.0 --seeds 0 --rows small_zero_shot distilled --task family_relationships --train-size 160 --test-size 48 --max-new-tokens 32 --work /work/runs/distill/fam_mapped --budget-seconds $BUDGET --grid distilled=$LR --out reports/equal_time/family_relationships_distill_mapped; echo "fam10 rc=$?"
