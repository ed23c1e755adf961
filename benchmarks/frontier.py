"""Quality against decode time: held-out bits per byte of equal-time report rows against the decode
milliseconds per token of the same kind of model, one point per row (issue 26).

    python benchmarks/frontier.py --report reports/equal_time/gsm_symbolic \\
        --report reports/equal_time/gsm_symbolic_prompt --decode reports/decode_modes_rows/results.json \\
        --out reports/frontier/gsm_symbolic

Quality: each row's held-out test bits per byte at the end of its budget (`benchmarks/transfer_report.py`,
mean over the seeds it has, the seeds listed). Every report must have the same task, models and budget, except
those named by --steps-matched: reports whose rows ran on another CPU with the steps the common budget gave the
same rows where the others ran (their own budget is that CPU's seconds; frontier.md names them). `--report
FOLDER:ROW,ROW` takes only those rows of a report. A (row, seed) given by an earlier report is not taken again.
Speed: decode ms per token of one row at --batch (`benchmarks/decode_modes.py`, after the prefill), looked
up by the row's decode name: the report's zero-shot and fine-tuned rows are the plain models ("large
alone", "small alone", "lora on large ..."), composed rows the decode row of the same name (time them with
`decode_modes.py --compose ROW:options`). A row without a decode time is listed without a point.
Writes frontier.md (the table, which rows are on the frontier: no other row both lower in bits per byte and
faster) and frontier.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

# report row -> the decode row (a prefix: "lora on large (rank 8, ...)")
PLAIN = {"large_zero_shot": "large alone", "small_zero_shot": "small alone", "small_finetuned": "small alone",
         "distilled": "distilled small", "lora_large": "lora on large"}
SMALL, LORA = "small_finetuned", "lora_large"  # the two landmarks


def report_spec(spec: str) -> tuple[Path, set[str] | None]:
    """'FOLDER' or 'FOLDER:ROW,ROW' -> (folder, the rows to take or None for all)."""
    folder, _, rows = spec.partition(":")
    return Path(folder), set(rows.split(",")) if rows else None


def report_rows(specs: list[str], steps_matched: list[str] = ()) -> tuple[dict, dict]:
    """(meta of the first report not steps-matched, row -> list of (seed, final test bits per byte)) over every
    report."""
    folders = [report_spec(s) for s in specs]
    given = {folder.resolve() for folder, _ in folders}
    matched = {Path(f).resolve() for f in steps_matched}
    unknown = [f for f in steps_matched if Path(f).resolve() not in given]
    if unknown:
        raise SystemExit(f"--steps-matched {unknown[0]}: not one of the --report folders")
    common = [f for f, _ in folders if f.resolve() not in matched]
    if not common:
        raise SystemExit("every --report is --steps-matched: give at least one report of the common budget")
    first = json.loads((common[0] / "results.json").read_text())
    meta = {k: first[k] for k in ("task", "large", "small", "budget_seconds")}
    rows, seen = {}, set()
    for folder, take in folders:
        data = json.loads((folder / "results.json").read_text())
        keys = ("task", "large", "small") if folder.resolve() in matched else tuple(meta)
        if any(data[k] != meta[k] for k in keys):
            raise SystemExit(f"{folder}: {({k: data[k] for k in keys})} differs from the first report's {meta}; "
                             "give reports of one task, model pair and budget (--steps-matched for a report "
                             "whose rows got the same steps on another CPU)")
        for r in data["rows"]:
            if (take is not None and r["row"] not in take) or r.get("bits_per_byte") is None or r.get("error") \
                    or (r["row"], r["seed"]) in seen:
                continue
            seen.add((r["row"], r["seed"]))
            rows.setdefault(r["row"], []).append((r["seed"], r["bits_per_byte"]))
    return meta, rows


def decode_times(path: Path, batch: int) -> tuple[dict, dict]:
    data = json.loads(path.read_text())
    return data["meta"], {r["row"]: r["decode_ms_per_token"] for r in data["rows"] if r["batch"] == batch}


def decode_of(row: str, times: dict) -> float | None:
    name = PLAIN.get(row, row)
    return next((ms for n, ms in times.items() if n == name or (row in PLAIN and n.startswith(name))), None)


def points(rows: dict, times: dict) -> list[dict]:
    out = []
    for row, scores in rows.items():
        bpb = [b for _, b in scores]
        out.append({"row": row, "bpb": round(statistics.mean(bpb), 4), "seeds": [s for s, _ in scores],
                    "bpb_per_seed": bpb, "decode_ms": decode_of(row, times)})
    timed = [p for p in out if p["decode_ms"] is not None]
    for p in timed:
        p["on_frontier"] = not any(q is not p and q["bpb"] <= p["bpb"] and q["decode_ms"] <= p["decode_ms"]
                                   and (q["bpb"] < p["bpb"] or q["decode_ms"] < p["decode_ms"]) for q in timed)
    return sorted(out, key=lambda p: (p["decode_ms"] is None, p["decode_ms"] or 0))


def verdicts(pts: list[dict], max_small_ratio: float, min_lora_speedup: float) -> dict:
    """Per composed row: lower bits per byte than the small model fine-tuned alone, at most `max_small_ratio`
    times its decode time, and at least `min_lora_speedup` times faster than LoRA on the large model."""
    by = {p["row"]: p for p in pts}
    small, lora = by.get(SMALL), by.get(LORA)
    small_ms = small and small["decode_ms"]
    lora_ms = lora and lora["decode_ms"]
    out = {}
    for p in pts:
        if not p["row"].startswith("composed") or p["decode_ms"] is None or not small or not small_ms or not lora_ms:
            continue
        checks = {"lower_bpb_than_small": p["bpb"] < small["bpb"],
                  "decode_vs_small": round(p["decode_ms"] / small_ms, 2),
                  "speedup_vs_lora": round(lora_ms / p["decode_ms"], 2)}
        checks["meets"] = (checks["lower_bpb_than_small"] and checks["decode_vs_small"] <= max_small_ratio
                           and checks["speedup_vs_lora"] >= min_lora_speedup)
        out[p["row"]] = checks
    return out


def plot(pts: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in (p for p in pts if p["decode_ms"] is not None):
        ax.scatter(p["decode_ms"], p["bpb"], s=40, marker="o" if p.get("on_frontier") else "x",
                   color="tab:red" if "prompt" in p["row"] else "tab:blue" if p["row"].startswith("composed")
                   else "tab:gray")
        ax.annotate(p["row"], (p["decode_ms"], p["bpb"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("decode ms per token (batch 1, after the prefill)")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="append", required=True,
                        help="a transfer_report.py output folder, or FOLDER:ROW,ROW for those rows only")
    parser.add_argument("--steps-matched", action="append", default=[], metavar="FOLDER",
                        help="a --report folder whose rows got, on another CPU, the steps the common budget gave "
                             "them where the other reports ran (its own budget seconds may differ)")
    parser.add_argument("--decode", required=True, help="a decode_modes.py results.json")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-small-ratio", type=float, default=1.5)
    parser.add_argument("--min-lora-speedup", type=float, default=3.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    meta, rows = report_rows(args.report, args.steps_matched)
    decode_meta, times = decode_times(Path(args.decode), args.batch)
    if not times:
        raise SystemExit(f"{args.decode} has no row at batch {args.batch}")
    pts = points(rows, times)
    checks = verdicts(pts, args.max_small_ratio, args.min_lora_speedup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{meta['task']}: {meta['large']} + {meta['small']}, {meta['budget_seconds']:.0f} s of training per row; "
             f"decode {decode_meta['dtype']}, batch {args.batch}")
    plot(pts, title, out / "frontier.png")
    command = "python benchmarks/frontier.py " + shlex.join(sys.argv[1:])
    lines = [f"# Quality against decode time: {meta['task']}", "", f"Command: `{command}`  ",
             f"Quality: {', '.join(args.report)} (final held-out bits per byte, mean over seeds)."
             + (f" Steps matched on another CPU: {', '.join(args.steps_matched)} (their rows got the steps "
                f"{meta['budget_seconds']:.0f} s gave the same rows where the other reports ran)."
                if args.steps_matched else "") + " Decode: "
             f"{args.decode} ({decode_meta['command']}; {decode_meta['machine']}, {decode_meta['date']}).", "",
             "| row | held-out bits/byte | seeds | decode ms/token | on the frontier |", "|---|---|---|---|---|"]
    for p in pts:
        ms = "not timed" if p["decode_ms"] is None else p["decode_ms"]
        mark = "" if p["decode_ms"] is None else "yes" if p["on_frontier"] else "no"
        lines.append(f"| {p['row']} | {p['bpb']:.3f} | {', '.join(str(s) for s in p['seeds'] if s is not None) or '-'} | {ms} | {mark} |")
    if checks:
        lines += ["", f"Issue 26's test per composed row: lower bits per byte than `{SMALL}`, decode at most "
                      f"{args.max_small_ratio}x the small model's time, at least {args.min_lora_speedup}x faster "
                      f"than `{LORA}`:", "",
                  "| row | lower bpb than small | decode / small's | speed-up over LoRA | meets |", "|---|---|---|---|---|"]
        for row, c in checks.items():
            lines.append(f"| {row} | {'yes' if c['lower_bpb_than_small'] else 'no'} | {c['decode_vs_small']}x "
                         f"| {c['speedup_vs_lora']}x | {'yes' if c['meets'] else 'no'} |")
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    (out / "frontier.json").write_text(json.dumps({"meta": meta, "decode": decode_meta, "points": pts,
                                                   "verdicts": checks}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
