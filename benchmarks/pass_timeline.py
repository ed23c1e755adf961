"""Pass by pass at B rows: the plain engine's step against a speculative pass (the drafter's default decoding: its
width-5 tree, prompt lookup's copy, the drafting policy), with each pass's columns and its draft / verify /
rollback milliseconds, and the pass costs the policy has seen (a prefill among them). Where a batch loses against
the target alone, this shows which passes lose.

    python benchmarks/pass_timeline.py --drafter runs/drafter-general/last --batch 16 --steps 30

Single runs on a quiet machine; the numbers of the twelfth session's notes (reports/speculative/
batch_sweep_avx2_plain_pass/NOTES.md) came from this script's two parts, then separate scripts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import speculative as S  # noqa: E402  (benchmarks/speculative.py: its loaders)

from llm_modules.decoding.engine import DecodeBatch, Sequence  # noqa: E402
from llm_modules.decoding.sampling import SamplingOptions  # noqa: E402
from llm_modules.decoding.speculative.batch import SpeculativeBatch  # noqa: E402
from llm_modules.models.cpu_linear import use_cpu_linear  # noqa: E402
from llm_modules.models.specs import resolve_model  # noqa: E402
from llm_modules.tensors import DTYPES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--drafter", required=True, help="a drafter folder (train --method drafter)")
    parser.add_argument("--data", default="reasoning-gym:gsm_symbolic?size=16&seed=999")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = resolve_model(args.target, dtype=DTYPES[args.dtype])
    target, tokenizer = loaded.model.eval(), loaded.tokenizer
    use_cpu_linear(target, "auto")
    eos = target.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    prompts = S.prompts_of(args.data, tokenizer, args.batch)
    folder = Path(args.drafter)
    network = S.load_network(str(folder), loaded, DTYPES[args.dtype])
    vocab = S.saved_vocabulary(folder)

    def rows():  # never finishing: every pass has every row
        return [Sequence(p, SamplingOptions(max_new_tokens=10**6), []) for p in prompts]

    with torch.no_grad():
        plain = DecodeBatch(target, pad)
        plain.add(rows())
        steps = []
        for _ in range(args.steps):
            start = time.perf_counter()
            plain.step()
            steps.append(1000 * (time.perf_counter() - start))
        print(f"plain step at {args.batch} rows: median {statistics.median(steps[2:]):.1f} ms", flush=True)

        proposer = S.our_drafter(network, 4, pad, vocab, True, 5, adaptive=True)
        spec = SpeculativeBatch(target, proposer, pad)
        run_tree, run = spec.stepper.run_tree, spec.stepper.run
        widths = []
        spec.stepper.run_tree = lambda ids, *a, **k: widths.append(ids.shape[1]) or run_tree(ids, *a, **k)
        spec.stepper.run = lambda ids, *a, **k: widths.append(ids.shape[1]) or run(ids, *a, **k)
        spec.add(rows())
        print("costs seen after the prefill (columns: seconds):", proposer.policy.passes.seen, flush=True)
        stats = spec.stats
        for i in range(args.steps):
            before = (stats.draft_seconds, stats.verify_seconds, stats.rollback_seconds, stats.accepted)
            start = time.perf_counter()
            spec.step()
            total = 1000 * (time.perf_counter() - start)
            parts = [1000 * (now - then) for now, then in zip(
                (stats.draft_seconds, stats.verify_seconds, stats.rollback_seconds), before[:3])]
            print(f"pass {i}: {args.batch} x {widths[-1]} columns, {total:.0f} ms (draft {parts[0]:.0f}, verify "
                  f"{parts[1]:.0f}, rollback {parts[2]:.0f}), kept {stats.accepted - before[3]}, "
                  f"drafter drafting {proposer.policy.drafting}", flush=True)
        print("costs seen (columns: seconds):", proposer.policy.passes.seen, flush=True)


if __name__ == "__main__":
    main()
