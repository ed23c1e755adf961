"""Calibrate one row exactly as transfer_report does (the same unit, so the report reuses it); print s/step."""
import argparse, sys
sys.path.insert(0, "benchmarks")
import transfer_report as tr

task, row, work = sys.argv[1], sys.argv[2], sys.argv[3]
sizes = {"gsm_symbolic": dict(train_size=64, test_size=32, max_new_tokens=160),
         "family_relationships": dict(train_size=160, test_size=48, max_new_tokens=32)}[task]
args = argparse.Namespace(task=task, task_args=[], large="qwen2.5-coder-1.5b-instruct", small="smollm2-135m-instruct",
                          template="chat", max_length=512, batch_size=4, eval_batch_size=8, work=work, **sizes)
plan = tr.Plan(args)
lr = tr.GRIDS[tr.ROWS[row]["method"]][0]
result = plan.run(plan.unit("calibrate", row, lr_small=lr[0], lr_bridge=lr[1] or None, warmup_steps=tr.CALIBRATION_WARMUP))
print(result["sec_per_step"])
