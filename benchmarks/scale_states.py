"""State-building throughput with 1, 2 and 4 processes (gloo on CPU, or one GPU each), and the speed-up.

    python benchmarks/scale_states.py                          # packaged Qwen2.5-Coder-0.5B, 64 gsm_symbolic examples
    python benchmarks/scale_states.py --processes 1 2 4 --out reports/scale_states/results.json
    python benchmarks/scale_states.py --large qwen2.5-coder-1.5b-instruct --data "reasoning-gym:gsm_symbolic?size=32&seed=0"

Each process count builds the same examples' large-model states into an empty folder, the processes
sharing the work as training does (`StateCache.open_or_build`); the clock runs from a barrier after
every process loaded the models and ran one untimed warm-up batch, to the folder's index being in
place. The machine's cores are split
evenly: with C cores each of P processes gets C // P threads (`--threads` fixes it), so the
comparison is of the same hardware, not of more of it. On a CPU the speed-up is bounded by the
cores (and memory bandwidth); on GPUs (one process per GPU, `--device cuda`) by the GPUs.

It also prints the per-token cost at one process and the large model's effective FLOP/s
(2 x body parameters per token: embeddings are a lookup, and the head does not run), the inputs of
the cost estimate in docs/scaling.md. Time it on a quiet machine: other load skews every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def body_parameters(large: torch.nn.Module) -> int:
    """Parameters a token's forward multiplies by: the decoder without its token embedding."""
    body = large.base_model
    embedding = body.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in body.parameters()) - embedding


def worker(rank: int, world: int, port: int, args: argparse.Namespace, examples: list, folder: str,
           result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    from llm_modules import LLMModulesModel
    from llm_modules.states.store import StateCache, state_cache_key
    from llm_modules.tensors import positions_from_mask

    torch.manual_seed(0)  # config: specs draw their weights here: every process the same
    model = LLMModulesModel.compose(large=args.large, small=args.small, head=args.head,
                                    large_dtype=getattr(torch, args.large_dtype), device=device).eval()
    key = state_cache_key(model, f"scale-states-{len(examples)}", args.state_cache_dtype)
    # one batch of the shortest examples first, untimed: kernels set themselves up on their first call
    warm = sorted(examples, key=lambda e: len(e.input_ids))[: args.batch_size]
    width = max(len(e.input_ids) for e in warm)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in warm], device=device)
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in warm], device=device)
    model.encode_large(ids, mask, positions_from_mask(mask))
    torch.distributed.barrier()
    start = time.perf_counter()
    cache = StateCache.open_or_build(folder, key, model, examples, dtype=args.state_cache_dtype,
                                     batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - start  # the build ends with a barrier: the same on every process
    if rank == 0:
        Path(result).write_text(json.dumps({"seconds": seconds, "bytes": cache.size_bytes,
                                            "body_parameters": body_parameters(model.large),
                                            "threads": torch.get_num_threads()}))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--small", default="smollm2-135m-instruct")
    parser.add_argument("--head", default="residual")
    parser.add_argument("--data", default="reasoning-gym:gsm_symbolic?size=64&seed=0")
    parser.add_argument("--template", default="chat")
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=0, help="threads per process (0: cores // processes)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per process")
    parser.add_argument("--large-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--state-cache-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args()
    if 1 not in args.processes:
        parser.error("--processes must include 1: the speed-up is against one process")

    from llm_modules.data.prepare import DataConfig, prepare_data
    from llm_modules.models.specs import resolve_tokenizer

    data = prepare_data(DataConfig(spec=args.data, template=args.template, max_length=args.max_length,
                                   val_fraction=0.0), resolve_tokenizer(args.large), None)
    # the records' task scorers (closures) cannot travel to spawned processes, and building states needs none
    examples = [dataclasses.replace(e, record=dataclasses.replace(e.record, scorer=None))
                for e in data.train + data.val]
    tokens = sum(len(e.input_ids) for e in examples)
    work = Path(tempfile.mkdtemp(prefix="llm-modules-scale-"))
    rows = []
    try:
        for world in sorted(args.processes):
            folder, result = work / f"states-{world}", work / f"result-{world}.json"
            mp.start_processes(worker, args=(world, free_port(), args, examples, str(folder), str(result)),
                               nprocs=world, start_method="spawn")
            measured = json.loads(result.read_text())
            rows.append({"processes": world, "threads_per_process": measured["threads"],
                         "seconds": round(measured["seconds"], 2),
                         "tokens_per_second": round(tokens / measured["seconds"], 1), "cache_bytes": measured["bytes"],
                         "body_parameters": measured["body_parameters"]})
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = next(r for r in rows if r["processes"] == 1)
    for r in rows:
        r["speed_up"] = round(one["seconds"] / r["seconds"], 2)
    flops = 2 * one["body_parameters"] * tokens / one["seconds"]
    report = {"large": args.large, "data": args.data, "examples": len(examples), "tokens": tokens,
              "device": args.device, "cores": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "large_dtype": args.large_dtype, "state_cache_dtype": args.state_cache_dtype,
              "ms_per_token_one_process": round(1000 * one["seconds"] / tokens, 3),
              "effective_gflops_one_process": round(flops / 1e9, 2), "rows": rows}
    print(f"{args.large}: {len(examples)} examples, {tokens} tokens, {args.device}, {os.cpu_count()} cores")
    print(f"{'processes':>9} {'threads':>8} {'seconds':>9} {'tokens/s':>10} {'speed-up':>9}")
    for r in rows:
        print(f"{r['processes']:>9} {r['threads_per_process']:>8} {r['seconds']:>9} {r['tokens_per_second']:>10} "
              f"{r['speed_up']:>8}x")
    print(f"one process: {report['ms_per_token_one_process']} ms per token, "
          f"{report['effective_gflops_one_process']} GFLOP/s effective (2 x {one['body_parameters']:,} FLOPs a token)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
