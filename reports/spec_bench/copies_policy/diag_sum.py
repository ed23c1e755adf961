"""Verify passes and accepted drafts (no timing) of prompt lookup alone and of draft trees with and without 1-token
matches, the drafter and the policy, on Spec-Bench questions: run from a checkout with runs/drafter-general,
`python diag_sum.py summarization,humaneval` (PYTHONPATH=<checkout>). Its output from branch s6 (before the
1-token copies): diag_sum.log."""
import sys, json, torch
sys.path[:0] = ["benchmarks", "."]
torch.set_num_threads(2)
import speculative as S, spec_bench
from llm_modules.data.prompting import prompt_ids
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.decoding.speculative.tree_proposer import TreeProposer
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.policy import DraftPolicy
from llm_modules.models.specs import resolve_model
loaded = resolve_model("qwen2.5-coder-1.5b-instruct", dtype=torch.bfloat16)
target, tok = loaded.model.eval(), loaded.tokenizer
eos = target.generation_config.eos_token_id; eos = [eos] if isinstance(eos, int) else list(eos)
pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
model = S.load_network("runs/drafter-general/last", loaded, torch.bfloat16)
vocab = S.saved_vocabulary(S.Path("runs/drafter-general/last"))
qs = [q for q in spec_bench.select(spec_bench.load_questions(), 1) if q["category"] in sys.argv[1].split(",")]
qs += spec_bench.load_humaneval(1) if "humaneval" in sys.argv[1] else []
V = target.config.vocab_size
def tree(lookup_k=10, drafter=True, width=5, min_match=2, policy=False):
    d = ComposedProposer(model, draft_tokens=4, pad_id=pad, vocab=vocab) if drafter else None
    t = TreeProposer(d, PromptLookup(V, draft_tokens=lookup_k) if lookup_k else None, width=width, min_match=min_match)
    t.policy = DraftPolicy() if policy else None
    return t
variants = {"lookup alone": lambda: PromptLookup(V, draft_tokens=10),
            "tree lookup only mm2": lambda: tree(drafter=False, width=1),
            "tree lookup only mm1": lambda: tree(drafter=False, width=1, min_match=1),
            "tree drafter+lookup": lambda: tree(),
            "tree drafter+lookup mm1": lambda: tree(min_match=1),
            "tree drafter+lookup policy": lambda: tree(policy=True)}
for q in qs:
    p = prompt_ids([{"role": "user", "content": q["prompt"]}], tok, "chat")
    for name, make in variants.items():
        (out,), sec, st = S.run_ours(target, [p], 1, 128, pad, eos, drafter=make())
        print(json.dumps({"q": q["category"], "v": name, "tokens": len(out), "passes": st["passes"], "acc": st["accepted"], "s": round(sec, 1)}), flush=True)
