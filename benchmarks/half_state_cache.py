"""What a half-precision state cache changes for the residual head: rounded states in training,
float32 states in generation.

    python benchmarks/half_state_cache.py                  # the demo's large model and data
    python benchmarks/half_state_cache.py --large SPEC --data SPEC --examples N

The `residual` (and `projected`) head computes the large model's own logits from the large states.
Training from a `--state-cache-dtype float16|bfloat16` cache gives it the stored, rounded states;
generation gives it the large model's float32 states. Over the answer tokens of the first N
examples this prints, per storage dtype, how far the head's base logits move (max and mean
|difference|), how much the per-token loss moves, and how often the arg-max token changes. It
writes the table to reports/half_state_cache/results.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_modules.data.prepare import DataConfig, prepare_data
from llm_modules.models.specs import resolve_model
from llm_modules.training.config import DEMO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", default=DEMO["large"])
    parser.add_argument("--data", default=DEMO["data"])
    parser.add_argument("--template", default=DEMO["template"])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--output", default="reports/half_state_cache/results.md")
    args = parser.parse_args()
    started = time.perf_counter()
    loaded = resolve_model(args.large)
    model, head = loaded.model, loaded.model.get_output_embeddings()
    data = prepare_data(DataConfig(spec=args.data, template=args.template, max_length=DEMO["max_length"],
                                   val_fraction=0.0), loaded.tokenizer)
    rows = {dtype: {"max": 0.0, "sum": 0.0, "n": 0, "loss": 0.0, "loss32": 0.0, "flips": 0}
            for dtype in ("float16", "bfloat16")}
    with torch.no_grad():
        for example in data.train[: args.examples]:
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor(example.labels[1:])
            keep = labels != -100  # answer positions (predicting the next token)
            h = model.base_model(input_ids=ids).last_hidden_state[0, :-1][keep]  # (N, dL) float32
            exact = head(h)  # (N, V): what generation's head starts from
            for dtype, row in rows.items():
                rounded = head(h.to(getattr(torch, dtype)).float())  # what training's head starts from
                diff = (rounded - exact).abs()
                row["max"] = max(row["max"], diff.max().item())
                row["sum"] += diff.mean(-1).sum().item()
                row["n"] += h.shape[0]
                row["loss"] += F.cross_entropy(rounded, labels[keep], reduction="sum").item()
                row["loss32"] += F.cross_entropy(exact, labels[keep], reduction="sum").item()
                row["flips"] += int((rounded.argmax(-1) != exact.argmax(-1)).sum())
    lines = [
        "# Half-precision state cache: the residual head's base logits, rounded vs float32 states",
        "",
        f"`python benchmarks/half_state_cache.py --large {args.large} --data '{args.data}' --examples "
        f"{args.examples}` ({platform.machine()}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s). "
        f"{rows['float16']['n']} answer tokens of {min(args.examples, len(data.train))} examples.",
        "",
        "| storage | max abs logit diff | mean abs logit diff | loss per token (rounded - float32) | arg-max changed |",
        "|---|---|---|---|---|",
    ]
    for dtype, row in rows.items():
        n = row["n"]
        lines.append(f"| {dtype} | {row['max']:.4f} | {row['sum'] / n:.5f} | {(row['loss'] - row['loss32']) / n:+.6f} "
                     f"| {row['flips']} of {n} ({100 * row['flips'] / n:.2f}%) |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
