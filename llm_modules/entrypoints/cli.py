"""The `llm-modules` command line: train, generate, chat, eval, serve, info, cache and export.

User errors (LLMModulesError) print one line `error: ...` and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from llm_modules.decoding.speculative.tree_proposer import TreeProposer
from llm_modules.errors import LLMModulesError
from llm_modules.models.compose_config import ComposeConfig

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
MODEL_HELP = "a saved model folder, or a training run folder (train --output: its best/, else last/)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: train: argument --head: invalid choice ...`), status 2."""

    def error(self, message: str):
        command = self.prog.split()[-1]
        prefix = f"{command}: " if command != "llm-modules" else ""
        self.exit(2, f"error: {prefix}{message}\n")


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def add_draft_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", metavar="DRAFTER_DIR",
                        help="decode speculatively with this drafter (train --method drafter, or an EAGLE-3 folder: "
                             "ours, speculators' or EAGLE's); --model must be the "
                             "large model it was trained on. The output is the model's own, in fewer passes. "
                             "'prompt-lookup': drafts copied from the prompt and reply so far, no drafter needed "
                             "(a folder of that name: ./prompt-lookup)")
    parser.add_argument("--draft-tokens", type=int,
                        help="tokens drafted per pass (default: the drafter's K; 10 for prompt-lookup)")
    parser.add_argument("--draft-lookup", action=argparse.BooleanOptionalAction,
                        help="with a drafter folder, prompt lookup's copy (where a row's context ends in a repeated "
                             "n-gram of 2 tokens or more) is verified beside the drafter's drafts in the same pass "
                             "(default: on)")
    parser.add_argument("--draft-width", type=int,
                        help="with a drafter folder, each verify pass checks a draft tree: the drafter's chain plus "
                             "its WIDTH - 1 runners-up at every depth (default: %d; 1: the chain alone)" % TreeProposer.DEFAULT_WIDTH)
    parser.add_argument("--draft-adaptive", action=argparse.BooleanOptionalAction,
                        help="per pass and row, draft only what is predicted to pay at the batch's size, from each "
                             "row's acceptance so far and the passes' measured cost (default: on; off: every row "
                             "drafts the whole tree every pass)")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--min-new-tokens", type=int, default=0)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix for each token (slow)")


def check_draft_flags(args: argparse.Namespace) -> None:
    """Refuse --draft-tokens out of bounds, or without --draft, before any model loads (the bound by the
    position limit comes when the drafter loads: it needs the models' limits)."""
    if args.draft_tokens is not None and not args.draft:
        raise LLMModulesError("--draft-tokens needs --draft DRAFTER_DIR (the drafter whose tokens it counts)")
    if args.draft_lookup is not None and not args.draft:
        flag = "--draft-lookup" if args.draft_lookup else "--no-draft-lookup"
        raise LLMModulesError(f"{flag} needs --draft DRAFTER_DIR (the drafter it combines with prompt lookup)")
    if args.draft_width is not None and not args.draft:
        raise LLMModulesError("--draft-width needs --draft DRAFTER_DIR (the drafter whose runners-up it counts)")
    if args.draft_adaptive is not None and not args.draft:
        flag = "--draft-adaptive" if args.draft_adaptive else "--no-draft-adaptive"
        raise LLMModulesError(f"{flag} needs --draft DRAFTER_DIR (the drafting it adapts)")
    draft_options(args)  # bounds, before any model loads


def draft_options(args: argparse.Namespace) -> Any:
    """The `--draft*` flags as `DraftOptions` (None without --draft)."""
    from llm_modules.models.loading import DraftOptions

    if not getattr(args, "draft", None):
        return None
    return DraftOptions(args.draft, args.draft_tokens, args.draft_lookup is not False, args.draft_width,
                        args.draft_adaptive is not False)


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse decoding flags that would generate nothing or overflow, before any model loads."""
    if args.max_new_tokens < 1:
        raise LLMModulesError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise LLMModulesError(f"--min-new-tokens must be between 0 and --max-new-tokens ({args.max_new_tokens}), "
                              f"got {args.min_new_tokens}")
    sampling_options(args)  # its own checks: temperature, top-p, repetition penalty, seed
    check_draft_flags(args)


def sampling_options(args: argparse.Namespace):
    """The sampling flags as the one object the decoding engine takes."""
    from llm_modules.decoding.sampling import SamplingOptions

    return SamplingOptions(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop_strings=args.stop, seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    from llm_modules.version import __version__

    parser = Parser(
        prog="llm-modules",
        description="Compose a frozen large causal LM with a small trainable one through a bridge "
                    "(the paper's Enhanced Cross-Attention by default; also ladder and xattn).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"llm-modules {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="stream a completion from a saved model")
    gen.add_argument("--model", required=True, help=MODEL_HELP + ", or a plain model spec (baseline)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--template", choices=["auto", "stratos", "chat", "raw"], default="auto",
                     help="auto: the training run's template, else the tokenizer's chat template, else raw text")
    add_sampling_flags(gen)
    add_large_mismatch_flag(gen)
    add_device_flags(gen)
    add_draft_flags(gen)

    train = sub.add_parser(
        "train", help="train a composed model (no options: the embedded demo)",
        description="Train the bridge and the small model. With no options, runs the embedded demo: packaged "
                    "Qwen2.5-Coder-0.5B-Instruct -> SmolLM2-135M-Instruct on reasoning-gym gsm_symbolic.",
    )
    train.add_argument("--config", help="YAML or JSON file of options (command-line options win)")
    train.add_argument("--demo", action="store_true", help="start from the demo's options, then apply the others")
    add_train_flags(train)

    ev = sub.add_parser("eval", help="loss, perplexity and answer accuracy on held-out data (last line: JSON)")
    ev.add_argument("--model", required=True, help=MODEL_HELP + ", or a plain model spec (baseline)")
    ev.add_argument("--data", help="data spec (default: the training run's data)")
    ev.add_argument("--split", choices=["val", "all"], default="val",
                    help="val: the fixed validation split of --data; all: every example (fresh held-out data)")
    ev.add_argument("--template", choices=["stratos", "chat"], help="default: the training run's, else stratos")
    ev.add_argument("--max-length", type=int)
    ev.add_argument("--limit", type=int, default=0, help="evaluate at most N examples")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--no-generate", action="store_true", help="loss only, no generation")
    ev.add_argument("--output", help="also write the result (with samples) to this JSON file")
    add_large_mismatch_flag(ev)
    add_device_flags(ev)
    add_draft_flags(ev)

    chat = sub.add_parser("chat", help="interactive chat with a trained model, streamed")
    chat.add_argument("--model", required=True, help=MODEL_HELP + ", or a plain model spec (baseline)")
    chat.add_argument("--template", choices=["stratos", "chat"],
                      help="default: the training run's, else the tokenizer's chat template, else stratos")
    chat.add_argument("--system", help="system prompt (default: the template's)")
    add_sampling_flags(chat)
    add_large_mismatch_flag(chat)
    add_device_flags(chat)
    add_draft_flags(chat)

    cache = sub.add_parser("cache", help="list or prune the large-model state cache")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    for name, text in (("ls", "list cached states, least recently used first"),
                       ("prune", "remove dead builds, then the least recently used caches beyond the size cap")):
        action = cache_sub.add_parser(name, help=text)
        action.add_argument("--dir", help="state cache folder (default: <LLM_MODULES_CACHE>/states; training's "
                                          "--state-cache-dir)")
        if name == "prune":
            action.add_argument("--max-gb", type=float, help="size cap in GiB (default: $LLM_MODULES_CACHE_MAX_GB, "
                                                            "else 50); 0 removes every cache")

    info = sub.add_parser("info", help="frozen and trainable parameter counts per part")
    info.add_argument("--model", help=MODEL_HELP)
    info.add_argument("--large", help="large model spec (with --small, instead of --model)")
    info.add_argument("--small", help="small model spec")
    info.add_argument("--head", default=ComposeConfig.head, help="head kind when composing from specs")
    info.add_argument("--bridge", default=ComposeConfig.bridge, help="bridge when composing from specs")
    info.add_argument("--small-inputs", default=ComposeConfig.small_inputs, help="bridge or mapped, from specs")

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP API with streaming and batched decoding, "
                                         "and a chat page at /")
    serve.add_argument("--model", required=True, help=MODEL_HELP + ", or a plain model spec (baseline)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (default: 8)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests waiting for a place in the batch at most; more get 429 (default: 64)")
    serve.add_argument("--max-tokens", type=int, default=256,
                       help="new tokens for a request that gives no max_tokens (default: 256)")
    serve.add_argument("--template", choices=["stratos", "chat"],
                       help="chat prompt layout (default: the training run's, else the tokenizer's chat template, "
                            "else stratos)")
    serve.add_argument("--name", help="the model id the API reports (default: the --model folder's name, or the "
                                      "spec as given)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1/* request (default: "
                                         "$LLM_MODULES_API_KEY; none: an open API)")
    serve.add_argument("--max-request-bytes", type=int, default=1 << 20,
                       help="largest request body; larger ones get 413 (default: 1048576)")
    add_large_mismatch_flag(serve)
    add_device_flags(serve)
    add_draft_flags(serve)

    export = sub.add_parser("export", help="write a drafter in another engine's layout (eagle3: the speculators "
                                           "folder vLLM and SGLang load)")
    export.add_argument("drafter", metavar="DRAFTER_DIR", help="an EAGLE-3 drafter (train --drafter-layout eagle3, "
                                                               "or another trainer's folder)")
    export.add_argument("out", metavar="OUT", help="the folder to write (new or empty)")
    export.add_argument("--format", required=True, choices=["eagle3"])
    export.add_argument("--draft-tokens", type=int, help="K the folder names (default: the drafter's)")
    export.add_argument("--verifier", help="the target's path or id on the serving machine (default: the one the "
                                           "drafter was trained for)")
    return parser


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per training option (`train_options`: every group's, every method's, the bridges'); defaults
    stay None so only given flags override.

    The help names the option's default (the composed method's), which applies when neither the flag nor
    --config gives one.
    """
    from llm_modules.training.config import CHOICES, HELP, option_default, train_options
    from llm_modules.training.objectives import METHODS

    for name, (_, field) in train_options().items():
        flag = "--" + name.replace("_", "-")
        text = HELP.get(name, "")
        default = option_default(name)
        if default is not None or name == "large_layers":  # None: the help says what decides it
            text += f" (default: {default if default not in ('', None) else 'empty'})"
        recipes = [f"--method {m}: {o.run_defaults[name]}" for m, (o, _) in METHODS.items() if name in o.run_defaults]
        if recipes:
            text += f" ({'; '.join(recipes)})"
        text = text.replace("%", "%%")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[name], default=None, help=text)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(field.type), str)
            parser.add_argument(flag, type=kind, default=None, metavar=name.upper(), help=text)


def train_config_from_args(args: argparse.Namespace):
    from llm_modules.training.config import DEMO, TrainConfig, train_options

    given = {name: getattr(args, name) for name in train_options() if getattr(args, name) is not None}
    if args.config:
        return TrainConfig.from_file(args.config, overrides=given)
    if args.demo or not given:
        return TrainConfig.from_flags(**{**DEMO, **given})
    from llm_modules.training.objectives import method_classes

    recipe = method_classes(given.get("method", "composed"))[0].run_defaults
    missing = [f"--{n}" for n in ("data", "output") if n not in given and n not in recipe]
    if missing:
        raise LLMModulesError(f"train needs {', '.join(missing)} (or --config FILE, or no options for the demo)")
    return TrainConfig.from_flags(**given)


def format_prompt(model_dir: str, tokenizer: Any, prompt: str, template: str) -> list[int]:
    """auto: the template the model was trained with, else the tokenizer's chat template, else raw text."""
    from llm_modules.data.prompting import choose_template, prompt_ids

    template = choose_template(model_dir, tokenizer, template, fallback="raw")
    if template == "raw":
        return tokenizer(prompt)["input_ids"]
    return prompt_ids([{"role": "user", "content": prompt}], tokenizer, template)


def add_large_mismatch_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-large-mismatch", action="store_true",
                        help="load even when the large model's weights differ from those the model was trained on")


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    from llm_modules.devices import DTYPE_CHOICES
    from llm_modules.models.cpu_linear import CPU_LINEAR_CHOICES

    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps, or auto: the best available (a CUDA GPU, then mps, then the CPU)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="precision of the models; auto: bfloat16 on a CUDA GPU that has it, else float32")
    parser.add_argument("--cpu-linear", choices=CPU_LINEAR_CHOICES, default="auto",
                        help="kernel of a float32 model's linear layers on a CPU: torch's (MKL on x86), oneDNN's, avx2: "
                             "oneDNN's with ours for 2-16 rows (a verify pass; built with the C compiler), or auto: "
                             "avx2 on AMD CPUs, where MKL is slow (a decode step 1.5x faster, an 8-token pass 3x)")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    from llm_modules.devices import pick_device, pick_dtype

    device = pick_device(args.device)
    return device, pick_dtype(args.dtype, device)


def load_for_generation(args: argparse.Namespace):
    """`--model` (composed, plain method or plain spec) with its tokenizer, on `--device` in `--dtype`."""
    from llm_modules.models.loading import load_drafter, load_model

    device, dtype = device_and_dtype(args)
    loaded = load_model(args.model, device=device, dtype=dtype, allow_large_mismatch=args.allow_large_mismatch,
                        cpu_linear=args.cpu_linear)
    if getattr(args, "draft", None):
        loaded.drafter = load_drafter(draft_options(args), loaded, args.model, args.allow_large_mismatch)
    return loaded


def stream_reply(loaded: Any, ids: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """Decode after the prompt `ids` (1, T) as the sampling flags say, printing the text as it comes."""
    from transformers import TextStreamer

    from llm_modules.decoding.generation import generate

    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate(loaded.model, ids, None, sampling_options(args), tokenizer=loaded.tokenizer, streamer=streamer,
                    use_cache=not args.no_cache, drafter=loaded.drafter)


@command("generate")
def run_generate(args: argparse.Namespace) -> int:
    check_sampling_flags(args)
    loaded = load_for_generation(args)
    ids = torch.tensor([format_prompt(args.model, loaded.tokenizer, args.prompt, args.template)])
    stream_reply(loaded, ids, args)
    return 0


@command("train")
def run_train(args: argparse.Namespace) -> int:
    from llm_modules.training.loop import train

    config = train_config_from_args(args)
    summary = train(config)
    if summary is not None:
        best = summary["best_val_loss"]
        print(f"\ndone: {summary['steps']} steps in {summary['train_seconds']} s; validation loss per answer token "
              f"{summary['initial_val_loss']} before training, best {best if best is None else round(best, 5)}; "
              f"model in {config.output}/best (last: {config.output}/last)")
    return 0


@command("eval")
def run_eval(args: argparse.Namespace) -> int:
    import json

    from llm_modules.data.prepare import DataConfig
    from llm_modules.evaluation.harness import (
        EvalOptions,
        evaluate,
        held_out_examples,
        load_scorer,
    )
    from llm_modules.models.saved import run_defaults

    if not args.no_generate and args.max_new_tokens < 1:
        raise LLMModulesError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_draft_flags(args)
    defaults = run_defaults(args.model)
    given = {"spec": args.data, "template": args.template, "max_length": args.max_length}
    options = {**{("spec" if k == "data" else k): v for k, v in defaults.items()},
               **{k: v for k, v in given.items() if v is not None}}
    if "spec" not in options:
        raise LLMModulesError("eval needs --data SPEC (the model folder has no training run to take it from)")
    output = Path(args.output) if args.output else None
    if output is not None:  # a place for the file before the evaluation runs, not after
        if output.is_dir():
            raise LLMModulesError(f"--output {output} is a folder; give a file name, e.g. {output / 'eval.json'}")
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LLMModulesError(f"--output {output}: cannot create its folder ({err.strerror})") from None
    device, dtype = device_and_dtype(args)
    scorer = load_scorer(args.model, device=device, allow_large_mismatch=args.allow_large_mismatch, dtype=dtype,
                         draft=draft_options(args), cpu_linear=args.cpu_linear)
    examples = held_out_examples(DataConfig(**options), scorer.tokenizer, scorer.max_positions, args.split)
    result = evaluate(scorer, examples, EvalOptions(
        split=args.split, limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        generate=not args.no_generate,
    ))
    result = {"model": args.model, "data": options["spec"], "split": args.split, **result}
    for sample in result.get("samples", [])[:3]:
        print(f"Q: {sample['question'][:300]}\nA: {sample['model_answer'].strip()[:300]}\n"
              f"   extracted {sample['extracted']!r}, reference {sample['reference']!r}\n", file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}), flush=True)  # first: never lost
    if output is not None:
        try:
            output.write_text(json.dumps(result, indent=1))
        except OSError as err:
            raise LLMModulesError(f"could not write --output {output} ({err.strerror}); the result is printed "
                                  "above") from None
    return 0


@command("chat")
def run_chat(args: argparse.Namespace) -> int:
    from llm_modules.data.prompting import choose_template
    from llm_modules.entrypoints.chat import chat

    check_sampling_flags(args)
    loaded = load_for_generation(args)
    template = choose_template(args.model, loaded.tokenizer, args.template)
    print(f"chatting with {args.model} (template {template}); empty line or Ctrl-D to quit", file=sys.stderr)
    chat(loaded, template, args.system, sampling_options(args), use_cache=not args.no_cache)
    return 0


@command("cache")
def run_cache(args: argparse.Namespace) -> int:
    from llm_modules.states.admin import (
        default_root,
        enforce_size_cap,
        format_listing,
        list_caches,
    )

    root = args.dir or default_root()
    if args.cache_command == "ls":
        print("\n".join(format_listing(list_caches(root))))
        return 0
    if args.max_gb is not None and args.max_gb < 0:
        raise LLMModulesError(f"--max-gb must be >= 0, got {args.max_gb}")
    removed = enforce_size_cap(root, None if args.max_gb is None else int(args.max_gb * 2**30))
    busy = sum(1 for e in list_caches(root) if e.readers)
    print(f"removed {len(removed)} caches from {root}" + (f"; kept {busy} that running jobs read" if busy else ""))
    return 0


@command("info")
def run_info(args: argparse.Namespace) -> int:
    from llm_modules.models.composed import LLMModulesModel

    if args.model:
        model = LLMModulesModel.from_pretrained(args.model)
    elif args.large and args.small:
        model = LLMModulesModel.compose(large=args.large, small=args.small, head=args.head, bridge=args.bridge,
                                        small_inputs=args.small_inputs)
    else:
        raise LLMModulesError("info needs --model DIR, or --large SPEC and --small SPEC")
    counts = model.parameter_counts()
    print(f"large: {model.config.large}\nsmall: {model.config.small}\nhead:  {model.config.head}\n"
          f"bridge: {model.config.bridge} {model.config.bridge_options} (small inputs: {model.config.small_inputs})")
    print(f"{'part':<8}{'trainable':>16}{'frozen':>16}")
    for part, entry in counts.items():
        print(f"{part:<8}{entry['trainable']:>16,}{entry['frozen']:>16,}")
    return 0


def check_listen_address(host: str, port: int) -> None:
    """Resolve `host` and bind `host:port` once, so that a bad address is one line before the model loads."""
    import socket

    if not 0 <= port <= 65535:
        raise LLMModulesError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise LLMModulesError(f"--host {host!r} cannot be resolved ({err})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise LLMModulesError(f"cannot listen on {host}:{port} ({err.strerror})") from None


@command("export")
def run_export(args: argparse.Namespace) -> int:
    from llm_modules.models.eagle3_folder import export_eagle3, shared_embeddings

    if args.draft_tokens is not None:
        from llm_modules.models.drafter import check_draft_tokens

        check_draft_tokens(args.draft_tokens)
    out = export_eagle3(args.drafter, args.out, args.draft_tokens, args.verifier, shared_embeddings(args.drafter))
    print(f"wrote {out} (speculators eagle3 format; serve: --speculative-config "
          f"'{{\"method\": \"eagle3\", \"model\": \"{out}\"}}')")
    return 0


@command("serve")
def run_serve(args: argparse.Namespace) -> int:
    from llm_modules.decoding.engine import check_batch_limits

    try:
        from llm_modules.entrypoints.openai import serve
    except ImportError as err:
        raise LLMModulesError(f"serve needs FastAPI and uvicorn ({err}): pip install 'llm-modules[serve]'") from None
    check_batch_limits(args.max_batch, args.max_queue, ("--max-batch", "--max-queue"))  # before the model loads
    check_draft_flags(args)
    device, dtype = device_and_dtype(args)
    check_listen_address(args.host, args.port)  # before the model loads
    serve(args.model, args.host, args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          max_tokens=args.max_tokens, template=args.template, name=args.name, api_key=args.api_key,
          max_request_bytes=args.max_request_bytes, draft=draft_options(args),
          allow_large_mismatch=args.allow_large_mismatch, device=device, dtype=dtype, cpu_linear=args.cpu_linear)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:  # keep the terminal for our own progress bars and results
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except LLMModulesError as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)  # one line, as promised
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
