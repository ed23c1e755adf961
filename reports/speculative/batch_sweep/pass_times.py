"""Per-step wall time of the target alone (DecodeBatch.step) and of the speculative batch (SpeculativeBatch.step),
plus prefill, at one batch size."""
import sys, time, json, os
ROOT = os.environ["CODE"]; sys.path.insert(0, ROOT + "/benchmarks"); sys.path.insert(0, ROOT)
import torch
torch.set_num_threads(2)
import speculative as S
from llm_modules.models.specs import resolve_model
from llm_modules.decoding import engine as E
from llm_modules.decoding.speculative import batch as SB
from llm_modules.decoding import rows as R
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
def wrap(cls, name, tag):
    orig = getattr(cls, name)
    def f(self, *a, **k):
        t = time.perf_counter(); r = orig(self, *a, **k)
        log.append((tag, len(self.rows), time.perf_counter() - t)); return r
    setattr(cls, name, f)
wrap(E.DecodeBatch, "step", "plain"); wrap(SB.SpeculativeBatch, "step", "spec"); wrap(R.RowBatch, "add", "add")
Ns = []
orig_prune = P.DraftPolicy.prune
def prune(self, rows, trees):
    o = orig_prune(self, rows, trees); Ns.append(max(len(t) for t in o)); return o
P.DraftPolicy.prune = prune
import functools
if os.environ.get("PRIOR"):
    S.DraftPolicy = functools.partial(P.DraftPolicy, prior_rate=float(os.environ["PRIOR"]))
res = {}
for name, make in [("target", lambda: None), ("spec", lambda: S.our_drafter(model, 4, pad, vocab, True, 5, adaptive=True))]:
    S.run_ours(target, prompts[:2], size, 8, pad, eos, drafter=make())
    log.clear(); Ns.clear()
    outs, secs, stats = S.run_ours(target, prompts, size, 64, pad, eos, drafter=make())
    res[name] = {"seconds": secs, "log": list(log), "N": list(Ns)}
    steps = [x for x in log if x[0] != "add"]; adds = [x for x in log if x[0] == "add"]
    print(name, round(secs, 2), "steps", len(steps), "step s", round(sum(x[2] for x in steps), 2), "add s", round(sum(x[2] for x in adds), 2), flush=True)
json.dump(res, open(out, "w"))
