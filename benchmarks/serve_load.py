"""Load on `llm-modules serve` over loopback: N concurrent streaming clients against continuous batching.

    python benchmarks/serve_load.py                      # the demo pair (below), clients 1 4 8 16
    python benchmarks/serve_load.py --model DIR_OR_SPEC --clients 1 4 8 16 --requests 200 --max-seconds 600

Starts its own server (`llm-modules serve --max-batch <most clients> --max-queue <requests>`) on a
free port, warms it up, then for each client count runs up to --requests chat requests (greedy,
--max-tokens each, streamed) from that many concurrent clients, starting no new request after
--max-seconds. Requests cycle through a fixed list of prompts. Per client count it reports
requests/s, generated tokens/s, p50/p95 time to first token and total latency, and errors.

Batched against sequential on the same requests: every distinct prompt is first run alone, one
after another (sequential decoding; greedy, so its tokens are the tokens it gets in any batch).
For each client count, the sequential time of exactly the requests it completed is the sum of
their prompts' solo latencies, and `vs_sequential` is (its generated tokens / its wall time) over
(the same tokens / that sequential time).

Model: --model, else the demo's trained model (runs/demo/best or runs/demo/last) when present, else
the demo pair (Qwen2.5-Coder-0.5B-Instruct -> SmolLM2-135M-Instruct, `residual` head) composed
untrained with seed 0 and saved once under $LLM_MODULES_CACHE/serve_load/ (its zero-initialised
head correction makes it answer as the large model; the cost per token is the trained model's).
Writes --out/results.json and --out/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [
    "What is 17 times 23? Show your steps.",
    "Write a Python function that reverses a string.",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
    "Tom has 3 boxes of 12 pencils and gives away 7. How many are left?",
    "What does the SQL keyword JOIN do?",
    "Convert 3/8 to a decimal.",
    "Write a haiku about the sea.",
    "Why is the sky blue? Answer briefly.",
    "What is the derivative of x^3 + 2x?",
    "Name the capital of Australia and one fact about it.",
    "Sort the list [5, 2, 9, 1] in ascending order and explain how.",
    "If a shirt costs $20 after a 20% discount, what was the original price?",
    "Write a one-line bash command that counts lines in all .py files.",
    "What is the difference between a list and a tuple in Python?",
]


def demo_model() -> str:
    from llm_modules.models.saved import CONFIG_FILE
    from llm_modules.models.specs import cache_dir

    for folder in ("runs/demo/best", "runs/demo/last"):
        if (Path(folder) / CONFIG_FILE).is_file():
            return folder
    folder = cache_dir() / "serve_load" / "demo_untrained"
    if not (folder / CONFIG_FILE).is_file():
        import torch

        from llm_modules import LLMModulesModel
        from llm_modules.training.config import DEMO

        print(f"composing the demo pair once into {folder}", file=sys.stderr)
        torch.manual_seed(0)
        LLMModulesModel.compose(large=DEMO["large"], small=DEMO["small"], head=DEMO["head"]).save_pretrained(folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int, max_queue: int, log: Path,
                 name: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "llm_modules.entrypoints.cli", "serve", "--model", model, "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), *(["--name", name] if name else [])]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"no healthy server after 900 s; see {log}")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request: time to first token, total latency, generated tokens, or the error."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = tokens = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"}
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
            if not done or tokens is None:
                return {"error": "the stream ended without [DONE] and usage"}
    except httpx.HTTPError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    total = time.perf_counter() - started
    return {"ttft": first if first is not None else total, "latency": total, "tokens": tokens}


async def run_level(url: str, model: str, clients: int, requests: int, max_seconds: float, max_tokens: int) -> dict:
    """`clients` workers share a counter of `requests`; none starts a request after `max_seconds`."""
    results: list[dict] = []
    issued = 0
    started = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() - started < max_seconds:
            index = issued
            issued += 1
            result = await one_request(client, url, model, PROMPTS[index % len(PROMPTS)], max_tokens)
            results.append({**result, "prompt": index % len(PROMPTS)})

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - started
    return {"results": results, "wall": wall}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarise(clients: int, level: dict, solo: dict[int, dict]) -> dict:
    good = [r for r in level["results"] if "error" not in r]
    errors = [r["error"] for r in level["results"] if "error" in r]
    tokens = sum(r["tokens"] for r in good)
    wall = level["wall"]
    sequential_s = sum(solo[r["prompt"]]["latency"] for r in good)
    batched_rate = tokens / wall if wall else 0.0
    sequential_rate = tokens / sequential_s if sequential_s else 0.0

    def ms(values, q):
        value = percentile(values, q)
        return None if value is None else round(1000 * value)

    return {
        "clients": clients, "requests": len(level["results"]), "completed": len(good), "errors": len(errors),
        "error_samples": errors[:3], "wall_s": round(wall, 1),
        "requests_per_s": round(len(good) / wall, 3), "tokens_per_s": round(batched_rate, 2),
        "ttft_p50_ms": ms([r["ttft"] for r in good], 50), "ttft_p95_ms": ms([r["ttft"] for r in good], 95),
        "latency_p50_ms": ms([r["latency"] for r in good], 50), "latency_p95_ms": ms([r["latency"] for r in good], 95),
        "sequential_tokens_per_s_same_requests": round(sequential_rate, 2),
        "vs_sequential": round(batched_rate / sequential_rate, 2) if sequential_rate else None,
    }


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| clients | completed / requests | errors | requests/s | generated tokens/s | TTFT p50 / p95 ms "
             "| latency p50 / p95 ms | sequential tokens/s (same requests) | batched / sequential |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['completed']} / {r['requests']} | {r['errors']} | {r['requests_per_s']} "
                     f"| {r['tokens_per_s']} | {r['ttft_p50_ms']} / {r['ttft_p95_ms']} "
                     f"| {r['latency_p50_ms']} / {r['latency_p95_ms']} | {r['sequential_tokens_per_s_same_requests']} "
                     f"| {r['vs_sequential']}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="saved model folder or plain spec (default: the demo pair, see above)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=200, help="requests per client count at most")
    parser.add_argument("--max-seconds", type=float, default=600, help="no new request after this, per client count")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--out", default="reports/serve_load")
    args = parser.parse_args()
    if min(args.clients) < 1 or args.requests < 1 or args.max_tokens < 1:
        parser.error("--clients, --requests and --max-tokens must be >= 1")

    model = args.model or demo_model()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model, port, max(args.clients), args.requests, out / "server.log")
    try:
        name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        asyncio.run(run_level(url, name, 1, 1, float("inf"), 4))  # warm-up
        # each distinct prompt alone, one after another: the sequential baseline
        solo_level = asyncio.run(run_level(url, name, 1, len(PROMPTS), float("inf"), args.max_tokens))
        failed = [r["error"] for r in solo_level["results"] if "error" in r]
        if failed:
            raise SystemExit(f"the sequential baseline failed: {failed[0]}")
        solo = {r["prompt"]: r for r in solo_level["results"]}
        rows = []
        for clients in args.clients:
            level = asyncio.run(run_level(url, name, clients, args.requests, args.max_seconds, args.max_tokens))
            rows.append(summarise(clients, level, solo))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, "
               f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    header = (f"`python benchmarks/serve_load.py {' '.join(sys.argv[1:])}`: model {model}, {args.max_tokens} new tokens "
              f"per request (greedy, streamed), at most {args.requests} requests and {args.max_seconds:g} s per "
              f"client count; {machine}.")
    (out / "results.json").write_text(json.dumps({"model": model, "args": vars(args), "machine": machine,
                                                  "solo": solo_level["results"], "rows": rows}, indent=1))
    (out / "results.md").write_text(markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
