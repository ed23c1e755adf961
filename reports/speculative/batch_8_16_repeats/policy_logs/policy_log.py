"""Batch-16 per-pass log of the policy's predictions against what each pass cost and kept."""
import json, sys, os, time
sys.path[:0] = [os.getcwd() + "/benchmarks", os.getcwd()]
import torch
torch.set_num_threads(2)
import speculative as S
from llm_modules.decoding.speculative import policy as P
from llm_modules.models.specs import resolve_model
loaded = resolve_model("qwen2.5-coder-1.5b-instruct", dtype=torch.bfloat16)
target, tok = loaded.model.eval(), loaded.tokenizer
eos = target.generation_config.eos_token_id; eos = [eos] if isinstance(eos, int) else list(eos)
pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
model = S.load_network("runs/drafter-ladder-gen/last", loaded, torch.bfloat16)
vocab = S.saved_vocabulary(S.Path("runs/drafter-ladder-gen/last"))
size = int(sys.argv[1])
prompts = S.prompts_of("reasoning-gym:gsm_symbolic?size=16&seed=999", tok, 16)
log = []
prune, observe = P.DraftPolicy.prune, P.DraftPolicy.observe
def lprune(self, rows, trees, draft_seconds=0.0):
    out = prune(self, rows, trees, draft_seconds)
    b, n = len(rows), max(len(t) for t in out)
    exp = sum(sum(self.chances(r, t)[1:]) for r, t in zip(rows, out))
    log.append({"B": b, "N": n, "timing": self.timing, "d": round(draft_seconds, 4), "pred_cost": round(self.cost(b, n, draft_seconds), 3),
                "pred_gain": round(exp, 2), "seen": {k: round(v, 3) for k, v in sorted(self.passes.seen.items())},
                "k": self.depth})
    return out
def lobserve(self, rows, trees, paths, verify_seconds, next_tokens=None):
    log[-1].update({"v": round(verify_seconds, 4), "acc": sum(len(p) - 1 for p in paths)})
    return observe(self, rows, trees, paths, verify_seconds, next_tokens)
P.DraftPolicy.prune, P.DraftPolicy.observe = lprune, lobserve
S.run_ours(target, prompts[:size], size, 8, pad, eos)
t = S.run_ours(target, prompts, size, 64, pad, eos)[1]
S.run_ours(target, prompts[:size], size, 8, pad, eos, drafter=S.our_drafter(model, 4, pad, vocab, True, 5, adaptive=True))
log.clear()
r = S.run_ours(target, prompts, size, 64, pad, eos, drafter=S.our_drafter(model, 4, pad, vocab, True, 5, adaptive=True)); s = r[1]; print("stats", r[2])
print("target", round(t, 2), "spec", round(s, 2), "ratio", round(t / s, 3))
for e in log:
    if e["N"] > 1 or e["timing"]:
        print({k: v for k, v in e.items() if k != "seen"}, e["seen"] if e["N"] > 1 else "")
json.dump(log, open(sys.argv[2], "w"))
