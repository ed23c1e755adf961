"""The `llm-modules` command line: generate, info (and train, eval, chat as they land).

User errors (LLMModulesError) print one line `error: ...` and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

import torch

from .errors import LLMModulesError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


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


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop_strings=args.stop, use_cache=not args.no_cache,
        generator=torch.Generator().manual_seed(args.seed),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-modules",
        description="Compose a frozen large causal LM with a small trainable one through Enhanced Cross-Attention.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="stream a completion from a saved composed model")
    gen.add_argument("--model", required=True, help="folder written by save_pretrained / train")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--template", choices=["auto", "chat", "raw"], default="auto",
                     help="auto: the tokenizer's chat template when it has one, else the raw prompt")
    add_sampling_flags(gen)

    train = sub.add_parser(
        "train", help="train a composed model (no options: the embedded demo)",
        description="Train the bridge and the small model. With no options, runs the embedded demo: packaged "
                    "Qwen2.5-Coder-0.5B-Instruct -> SmolLM2-135M-Instruct on reasoning-gym gsm_symbolic.",
    )
    train.add_argument("--config", help="YAML or JSON file of options (command-line options win)")
    train.add_argument("--demo", action="store_true", help="start from the demo's options, then apply the others")
    add_train_flags(train)

    info = sub.add_parser("info", help="frozen and trainable parameter counts per part")
    info.add_argument("--model", help="a saved composed model folder")
    info.add_argument("--large", help="large model spec (with --small, instead of --model)")
    info.add_argument("--small", help="small model spec")
    info.add_argument("--head", default="new", help="head kind when composing from specs")
    return parser


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults stay None so only given flags override."""
    from .train_config import TrainConfig

    for name, field in TrainConfig.fields().items():
        flag = "--" + name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            parser.add_argument(flag, type=kind, default=None, metavar=name.upper())


def train_config_from_args(args: argparse.Namespace):
    from .train_config import DEMO, TrainConfig

    given = {name: getattr(args, name) for name in TrainConfig.fields() if getattr(args, name) is not None}
    if args.config:
        return TrainConfig.from_file(args.config, overrides=given)
    if args.demo or not given:
        return TrainConfig(**{**DEMO, **given})
    missing = [f"--{n}" for n in ("large", "small", "data", "output") if n not in given]
    if missing:
        raise LLMModulesError(f"train needs {', '.join(missing)} (or --config FILE, or no options for the demo)")
    return TrainConfig(**given)


def format_prompt(tokenizer: Any, prompt: str, template: str) -> list[int]:
    if template == "chat" or (template == "auto" and getattr(tokenizer, "chat_template", None)):
        if not getattr(tokenizer, "chat_template", None):
            raise LLMModulesError("--template chat: this model's tokenizer has no chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    return tokenizer(prompt)["input_ids"]


def load_composed(directory: str):
    from .model import LLMModulesModel

    model = LLMModulesModel.from_pretrained(directory).eval()
    if model.tokenizer is None:
        raise LLMModulesError(f"the large model of {directory} ({model.config.large}) has no tokenizer files")
    return model


@command("generate")
def run_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    model = load_composed(args.model)
    ids = torch.tensor([format_prompt(model.tokenizer, args.prompt, args.template)])
    streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(ids, streamer=streamer, **sampling_options(args))
    return 0


@command("train")
def run_train(args: argparse.Namespace) -> int:
    from .train import train

    config = train_config_from_args(args)
    summary = train(config)
    if summary is not None:
        print(f"\ndone: {summary['steps']} steps in {summary['train_seconds']} s, best validation loss "
              f"{summary['best_val_loss']}; model in {config.output}/best (last: {config.output}/last)")
    return 0


@command("info")
def run_info(args: argparse.Namespace) -> int:
    from .model import LLMModulesModel

    if args.model:
        model = LLMModulesModel.from_pretrained(args.model)
    elif args.large and args.small:
        model = LLMModulesModel.compose(large=args.large, small=args.small, head=args.head)
    else:
        raise LLMModulesError("info needs --model DIR, or --large SPEC and --small SPEC")
    counts = model.parameter_counts()
    print(f"large: {model.config.large}\nsmall: {model.config.small}\nhead:  {model.config.head}")
    print(f"{'part':<8}{'trainable':>16}{'frozen':>16}")
    for part, entry in counts.items():
        print(f"{part:<8}{entry['trainable']:>16,}{entry['frozen']:>16,}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except LLMModulesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
