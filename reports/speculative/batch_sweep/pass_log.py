"""Per-pass log of the default drafter at a batch size: rows, columns N, drafted, accepted, seconds."""
import sys, time, json
import os; ROOT = os.environ["CODE"]; sys.path.insert(0, ROOT + "/benchmarks"); sys.path.insert(0, ROOT)
import torch
torch.set_num_threads(2)
import speculative as S
from llm_modules.models.specs import resolve_model
from llm_modules.decoding.speculative import policy as P

size = int(sys.argv[1]); n = int(sys.argv[2]); out = sys.argv[3]
loaded = resolve_model("qwen2.5-coder-1.5b-instruct", dtype=torch.bfloat16)
target, tok = loaded.model.eval(), loaded.tokenizer
eos = target.generation_config.eos_token_id; eos = [eos] if isinstance(eos, int) else list(eos)
pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
model = S.load_network("runs/drafter-ladder-gen/last", loaded, torch.bfloat16)
vocab = S.saved_vocabulary(S.Path("runs/drafter-ladder-gen/last"))
prompts = S.prompts_of("reasoning-gym:gsm_symbolic?size=16&seed=999", tok, n)
log = []
orig = P.DraftPolicy.observe
def observe(self, rows, trees, paths, verify_seconds, draft_seconds, next_tokens=None):
    log.append({"B": len(rows), "N": max(len(t) for t in trees), "nodes": [len(t) - 1 for t in trees],
                "acc": [len(p) - 1 for p in paths], "v": round(verify_seconds, 4), "d": round(draft_seconds, 4)})
    return orig(self, rows, trees, paths, verify_seconds, draft_seconds, next_tokens)
P.DraftPolicy.observe = observe
res = {}
for name, make in [("target", lambda: None), ("spec", lambda: S.our_drafter(model, 4, pad, vocab, True, 5, adaptive=True))]:
    S.run_ours(target, prompts[:2], size, 8, pad, eos, drafter=make())  # warm-up
    log.clear()
    outs, secs, stats = S.run_ours(target, prompts, size, 64, pad, eos, drafter=make())
    res[name] = {"seconds": secs, "tokens": sum(len(o) for o in outs), "stats": stats, "log": list(log)}
    print(name, secs, sum(len(o) for o in outs), flush=True)
json.dump(res, open(out, "w"))
