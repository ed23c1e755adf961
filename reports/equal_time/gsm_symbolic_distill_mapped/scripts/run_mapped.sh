#!/usr/bin/env bash
# Issue 39: distilled rows with the mapped student (--distill-init mapped, the default since 5214695), seed 0, with
# the steps a 10-minute budget gave the distilled row on the bfloat16 CPU the headline rows ran on (its calibrations:
# gsm_symbolic 21.00 s a step -> 29 steps, grid 7; family_relationships 6.1475 s -> 98 steps, grid 24), this CPU
# being about 2x slower. The budget passed is those steps times this CPU's calibration.
# Resumable: rerun the same script (finished units are reused per work dir).
cd /work/wt-report
export PYTHONPATH=/work/wt-report PATH=/work/main/.venv/bin:$PATH LLM_MODULES_CACHE=/work/main/.cache/llm-modules HF_HUB_OFFLINE=1
COMMON="--large qwen2.5-coder-1.5b-instruct --small smollm2-135m-instruct --accuracy-at 1.0 --seeds 0 --rows small_zero_shot distilled"
GSM="--task gsm_symbolic --train-size 64 --test-size 32 --max-new-tokens 160 --work /work/runs/distill/gsm_mapped"
FAM="--task family_relationships --train-size 160 --test-size 48 --max-new-tokens 32 --work /work/runs/distill/fam_mapped"
# gsm_symbolic: this CPU's calibration 41.7875 s; its grid ran at 265 s (6 steps, one fewer than there) before the
# steps were matched
python benchmarks/transfer_report.py $COMMON $GSM --budget-seconds 1211.8 --grid-seconds 265 --out reports/equal_time/gsm_symbolic_distill_mapped; echo "gsm10 rc=$?"
CAL=$(python /work/runs/distill/calib_one.py family_relationships distilled /work/runs/distill/fam_mapped | tail -1)
BUDGET=$(python -c "print(round(98 * $CAL, 2))"); GRID=$(python -c "print(round(24.5 * $CAL, 2))")
echo "family calibration $CAL s/step: budget $BUDGET s, grid $GRID s"
python benchmarks/transfer_report.py $COMMON $FAM --budget-seconds $BUDGET --grid-seconds $GRID --out reports/equal_time/family_relationships_distill_mapped; echo "fam10 rc=$?"
