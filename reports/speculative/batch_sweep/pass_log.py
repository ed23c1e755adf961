"""Per-pass and per-step log of the target alone and of the default drafter (tree w5 + lookup + policy) at one
batch size: `CODE=<checkout> python pass_log.py BATCH PROMPTS OUT.json` (from the checkout, with its
runs/drafter-ladder-gen; PRIOR=0.3 sets the policy's prior chance a node).

Per method: seconds, tokens, the benchmark's stats; `passes` (the policy's view of each verify pass: rows B,
columns a row N, nodes and accepted per row, verify + rollback seconds v, drafting seconds d); `steps` (wall
seconds of every DecodeBatch/SpeculativeBatch step and every join, tagged plain/spec/add, with the rows held);
`N` (the columns each pruned pass kept). pass_log_b8.json and pass_times_b16.json were written by the two
scripts this one replaced (commit 52a3020: pass_log.py gave `log` = passes, pass_times.py `log` = steps and N).
Since the policy takes a pass's proposal time at `prune` (not `observe`), `d` is read there."""
import functools
import json
import os
import sys
import time

ROOT = os.environ["CODE"]
sys.path[:0] = [ROOT + "/benchmarks", ROOT]
import torch  # noqa: E402

torch.set_num_threads(2)
import speculative as S  # noqa: E402
from llm_modules.decoding import engine as E, rows as R  # noqa: E402
from llm_modules.decoding.speculative import batch as SB, policy as P  # noqa: E402
from llm_modules.models.specs import resolve_model  # noqa: E402

size, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
loaded = resolve_model("qwen2.5-coder-1.5b-instruct", dtype=torch.bfloat16)
target, tok = loaded.model.eval(), loaded.tokenizer
eos = target.generation_config.eos_token_id
eos = [eos] if isinstance(eos, int) else list(eos)
pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
model = S.load_network("runs/drafter-ladder-gen/last", loaded, torch.bfloat16)
vocab = S.saved_vocabulary(S.Path("runs/drafter-ladder-gen/last"))
prompts = S.prompts_of("reasoning-gym:gsm_symbolic?size=16&seed=999", tok, n)
passes, steps, kept, drafts = [], [], [], []


def timed(cls, name, tag):
    orig = getattr(cls, name)

    def f(self, *a, **k):
        t = time.perf_counter()
        r = orig(self, *a, **k)
        steps.append((tag, len(self.rows), time.perf_counter() - t))
        return r
    setattr(cls, name, f)


for cls, tag in ((E.DecodeBatch, "plain"), (SB.SpeculativeBatch, "spec")):
    timed(cls, "step", tag)
timed(R.RowBatch, "add", "add")
observe, prune = P.DraftPolicy.observe, P.DraftPolicy.prune


def logged_observe(self, rows, trees, paths, verify_seconds, next_tokens=None):
    passes.append({"B": len(rows), "N": max(len(t) for t in trees), "nodes": [len(t) - 1 for t in trees],
                   "acc": [len(p) - 1 for p in paths], "v": round(verify_seconds, 4), "d": round(drafts[-1], 4)})
    return observe(self, rows, trees, paths, verify_seconds, next_tokens)


def logged_prune(self, rows, trees, draft_seconds=0.0):
    pruned = prune(self, rows, trees, draft_seconds)
    kept.append(max(len(t) for t in pruned))
    drafts.append(draft_seconds)
    return pruned


P.DraftPolicy.observe, P.DraftPolicy.prune = logged_observe, logged_prune
if os.environ.get("PRIOR"):
    S.DraftPolicy = functools.partial(P.DraftPolicy, prior_rate=float(os.environ["PRIOR"]))
res = {}
for name, make in [("target", lambda: None), ("spec", lambda: S.our_drafter(model, 4, pad, vocab, True, 5, adaptive=True))]:
    S.run_ours(target, prompts[:2], size, 8, pad, eos, drafter=make())  # warm-up
    for log in (passes, steps, kept, drafts):
        log.clear()
    outs, secs, stats = S.run_ours(target, prompts, size, 64, pad, eos, drafter=make())
    tokens = sum(len(o) for o in outs)
    res[name] = {"seconds": secs, "tokens": tokens, "stats": stats, "passes": list(passes), "steps": list(steps),
                 "N": list(kept)}
    step_s = sum(x[2] for x in steps if x[0] != "add")
    add_s = sum(x[2] for x in steps if x[0] == "add")
    print(name, round(secs, 2), tokens, "steps", sum(x[0] != "add" for x in steps), "step s", round(step_s, 2),
          "add s", round(add_s, 2), flush=True)
json.dump(res, open(out, "w"))
