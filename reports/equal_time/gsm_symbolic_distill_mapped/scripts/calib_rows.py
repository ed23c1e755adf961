"""Seconds per step of the headline rows on THIS machine, as transfer_report calibrates them (timed alone), to
compare machine speeds with the headline reports' calibrations (run on another CPU)."""
import argparse, json, sys
sys.path.insert(0, "benchmarks")
import transfer_report as tr

TASKS = {"gsm_symbolic": dict(train_size=64, test_size=32, max_new_tokens=160),
         "family_relationships": dict(train_size=160, test_size=48, max_new_tokens=32)}
out = {}
for task, sizes in TASKS.items():
    args = argparse.Namespace(task=task, task_args=[], large="qwen2.5-coder-1.5b-instruct",
                              small="smollm2-135m-instruct", template="chat", max_length=512, batch_size=4,
                              eval_batch_size=8, work=f"/work/runs/distill/calib_here/{task}", **sizes)
    plan = tr.Plan(args)
    for row in ("lora_large", "small_finetuned"):
        lr = tr.GRIDS[tr.ROWS[row]["method"]][0]
        result = plan.run(plan.unit("calibrate", row, lr_small=lr[0], lr_bridge=lr[1] or None,
                                    warmup_steps=tr.CALIBRATION_WARMUP))
        out[f"{task}/{row}"] = result.get("sec_per_step", result)
        print(task, row, out[f"{task}/{row}"], flush=True)
print(json.dumps(out))
