#!/usr/bin/env bash
# Issue 39, fifteenth session: the mapped student's 20-minute distilled rows (seed 0) and the 10-minute rows' second
# seed (1), each with the steps its budget gave the distilled row on the bfloat16 CPU the headline rows ran on
# (gsm_symbolic 21.00 s a step: 29 steps in 600 s, 57 in 1200 s; family_relationships 6.1475 s: 98 and 195), this
# CPU being slower. The budget passed is those steps times this CPU's calibration (taken alone, before any run).
# Learning rates: the 10-minute gsm_symbolic grid's winner (1e-4 body, 1e-3 embeddings), as the 20-minute headline
# rows reuse their 10-minute grid. Resumable: rerun the same script (finished units are reused per work dir).
cd /work/wt-report
export PYTHONPATH=/work/wt-report PATH=/work/main/.venv/bin:$PATH LLM_MODULES_CACHE=/work/main/.cache/llm-modules HF_HUB_OFFLINE=1
COMMON="--large qwen2.5-coder-1.5b-instruct --small smollm2-135m-instruct --accuracy-at 1.0 --rows small_zero_shot distilled --grid distilled=0.0001:0.001"
GSM="--task gsm_symbolic --train-size 64 --test-size 32 --max-new-tokens 160 --work /work/runs/s15/gsm"
FAM="--task family_relationships --train-size 160 --test-size 48 --max-new-tokens 32 --work /work/runs/s15/fam"
GCAL=$(python /work/main/reports/equal_time/gsm_symbolic_distill_mapped/scripts/calib_one.py gsm_symbolic distilled /work/runs/s15/gsm | tail -1)
FCAL=$(python /work/main/reports/equal_time/gsm_symbolic_distill_mapped/scripts/calib_one.py family_relationships distilled /work/runs/s15/fam | tail -1)
echo "calibrations here: gsm_symbolic $GCAL s/step, family_relationships $FCAL s/step"
# (calib_one.py: the fourteenth session's, the same file; this run used a copy of it under /work/runs/s15)
b() { python -c "print(round($1 * $2, 2))"; }
python benchmarks/transfer_report.py $COMMON $GSM --seeds 0 --budget-seconds $(b 57 $GCAL) --out reports/equal_time/gsm_symbolic_20min_distill_mapped; echo "gsm20 rc=$?"
python benchmarks/transfer_report.py $COMMON $FAM --seeds 0 --budget-seconds $(b 195 $FCAL) --out reports/equal_time/family_relationships_20min_distill_mapped; echo "fam20 rc=$?"
python benchmarks/transfer_report.py $COMMON $GSM --seeds 1 --budget-seconds $(b 29 $GCAL) --out reports/equal_time/gsm_symbolic_distill_mapped_seed1; echo "gsm10s1 rc=$?"
python benchmarks/transfer_report.py $COMMON $FAM --seeds 1 --budget-seconds $(b 98 $FCAL) --out reports/equal_time/family_relationships_distill_mapped_seed1; echo "fam10s1 rc=$?"
