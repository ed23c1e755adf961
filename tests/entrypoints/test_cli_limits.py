"""Position limits, drafting options and drafter files, checked before decoding: one line and exit 2, never a
traceback (issue 35, defects 2, 3, 6, 7, 8 and 9). The target is a GPT-2-shaped model of 96 positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llm_modules import LLMModulesModel
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.entrypoints.cli import main
from llm_modules.errors import LLMModulesError
from llm_modules.models.drafter import (
    DRAFT_VOCAB_FILE,
    MAX_DRAFT_TOKENS,
    DrafterRecord,
    save_draft_vocab,
)
from llm_modules.models.loading import DraftOptions
from llm_modules.models.saved import DRAFTER_FILE

from ..helpers import CHAT_TEMPLATE, gpt2_tokenizer

PROMPT_88 = "a" + " a" * 87  # 88 tokens of GPT-2's BPE


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def refuse_to_load(monkeypatch) -> None:
    def loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("llm_modules.models.loading.load_model", loading)
    monkeypatch.setattr("llm_modules.evaluation.harness.load_model", loading)
    monkeypatch.setattr(LLMModulesModel, "from_pretrained", loading)


def save_target(folder: Path, positions: int) -> str:
    """A tiny GPT-2 of `positions` learned positions with GPT-2's tokenizer (and a short chat template)."""
    torch.manual_seed(5)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=positions, vocab_size=50257)
                    ).save_pretrained(folder)
    tokenizer = gpt2_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


def save_drafter(target: str, small: str, folder: Path, draft_tokens: int = 4) -> str:
    """An untrained drafter for `target` (a composed model over it plus a drafter record)."""
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=target, small=small, head="projected", small_inputs="bridge")
    model.save_pretrained(folder)
    DrafterRecord(draft_tokens).save(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("limits")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                 intermediate_size=64, vocab_size=90, max_position_embeddings=1024)
                     ).save_pretrained(root / "small")
    small = str(root / "small")
    target = save_target(root / "target", 96)
    torch.manual_seed(0)
    LLMModulesModel.compose(large=target, small=small, head="new").save_pretrained(root / "composed")
    short = save_target(root / "target48", 48)
    return {"target": target, "small": small, "drafter": save_drafter(target, small, root / "drafter"),
            "composed": str(root / "composed"), "target48": short,
            "drafter48": save_drafter(short, small, root / "drafter48")}


def generate(model: str, prompt: str, *extra: str) -> int:
    return main(["generate", "--model", model, "--prompt", prompt, "--template", "raw", *extra])


# ----------------------------------------------------------------------------- 2: --draft keeps K + 1 positions
def test_generate_with_a_drafter_refuses_what_the_verify_pass_cannot_place(models, capsys):
    """88 + 8 fills the 96 positions exactly: fine alone; with a drafter of K = 4 a verify pass would read 5
    past the last kept token, so it is one line naming the model's limit and what drafting reserves."""
    assert generate(models["target"], PROMPT_88, "--max-new-tokens", "8") == 0
    capsys.readouterr()
    chain = ("--draft", models["drafter"], "--no-draft-lookup")
    assert generate(models["target"], PROMPT_88, "--max-new-tokens", "8", *chain) == 2
    line = one_error_line(capsys)
    assert "96 positions the model can place" in line and "less the 5" in line and "at most 3 new tokens" in line
    assert generate(models["target"], PROMPT_88, "--max-new-tokens", "3", *chain) == 0
    # prompt lookup's copy in the same tree reaches its own K (10) past the last kept token
    assert generate(models["target"], PROMPT_88, "--max-new-tokens", "3", "--draft", models["drafter"]) == 2
    assert f"less the {PromptLookup.DEFAULT_TOKENS + 1}" in one_error_line(capsys)


def test_chat_with_a_drafter_keeps_the_verify_pass_in_the_context(models, capsys, monkeypatch):
    """A message that fits the model alone but not with the drafter's reserve is not sent (one line); the chat
    goes on and ends normally."""
    said = iter(["a" + " a" * 73, "hi", ""])  # 86 tokens with the template: 86 + 8 fits 96, not 91
    monkeypatch.setattr("builtins.input", lambda prompt="": next(said))
    assert main(["chat", "--model", models["target"], "--max-new-tokens", "8", "--draft", models["drafter"],
                 "--no-draft-lookup", "--template", "chat"]) == 0
    err = capsys.readouterr().err
    assert "message not sent" in err and "Traceback" not in err


def test_the_servers_refusal_names_the_models_limit_and_the_drafters_reserve(models):
    from llm_modules.decoding.sampling import SamplingOptions
    from llm_modules.entrypoints.openai import build_app
    from llm_modules.entrypoints.openai.app import ApiError, sampling_options
    from llm_modules.entrypoints.openai.protocol import CompletionRequest

    served = build_app(models["target"], draft=DraftOptions(models["drafter"], lookup=False)).state.served
    with pytest.raises(LLMModulesError) as err:
        served.engine.sequence(list(range(88)), SamplingOptions(max_new_tokens=8))
    assert "96 positions the model can place less the 5" in str(err.value) and "91" not in str(err.value)
    for prompt, said in ((88, "ask for at most 3"), (91, "shorten it")):
        with pytest.raises(ApiError) as refused:
            sampling_options(served, CompletionRequest(prompt="x", max_tokens=8), list(range(prompt)))
        message = refused.value.body["error"]["message"]
        assert "96 positions the model can place less the 5" in message and said in message, message


def test_eval_with_a_drafter_caps_generations_at_the_verify_pass_limit(models, tmp_path, capsys, caplog):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w} " * 30, "completion": w, "answer": w}) + "\n"
                            for w in ("one", "two")))  # prompts of ~75 tokens: short generations
    args = ["eval", "--model", models["target"], "--data", str(data), "--split", "all", "--template", "chat",
            "--max-length", "96"]
    assert main([*args, "--draft", models["drafter"], "--no-draft-lookup"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["examples"] == 2 and "Traceback" not in err
    warned = [r.getMessage() for r in caplog.records if "stop at" in r.getMessage()]
    assert len(warned) == 1 and "96 positions the model can place less the 5" in warned[0]


# ----------------------------------------------------------------------------- 3: plain and composed, before decoding
def test_generate_on_a_plain_model_refuses_a_prompt_past_the_limit(models, capsys):
    assert generate(models["target"], PROMPT_88 + " a" * 12, "--max-new-tokens", "4") == 2  # 100 tokens
    assert "fills the 96 positions" in one_error_line(capsys)
    assert generate(models["target"], PROMPT_88, "--max-new-tokens", "9") == 2
    assert "ask for at most 8 new tokens" in one_error_line(capsys)


def test_generate_on_a_composed_model_refuses_before_decoding(models, capsys, monkeypatch):
    from llm_modules.decoding import engine

    steps = []
    real_step = engine.DecodeBatch.step
    monkeypatch.setattr(engine.DecodeBatch, "step", lambda self: steps.append(1) or real_step(self))
    assert generate(models["composed"], PROMPT_88, "--max-new-tokens", "9") == 2
    assert "exceeds the 96 positions the model can place; ask for at most 8 new tokens" in one_error_line(capsys)
    assert steps == []  # nothing was decoded first


def test_eval_caps_the_new_tokens_at_the_limit_with_one_line(models, tmp_path, capsys, caplog):
    """--max-length 90 with the default 256 new tokens: each generation stops at the model's limit, and one line
    says so; plain and composed alike."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1? " * 8, "completion": str(i + 1),
                                        "answer": str(i + 1)}) + "\n" for i in range(2)))  # ~70 tokens
    for model in (models["target"], models["composed"]):
        assert main(["eval", "--model", model, "--data", str(data), "--split", "all", "--template", "chat",
                     "--max-length", "90"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out.strip().splitlines()[-1])["examples"] == 2 and "Traceback" not in err
        warned = [r.getMessage() for r in caplog.records if "stop at" in r.getMessage()]
        assert len(warned) == 1 and "2 of 2" in warned[0], warned
        caplog.clear()


# ----------------------------------------------------------------------------- 6: --draft-tokens bounded
@pytest.mark.parametrize("command", ["generate", "chat", "eval", "serve"])
@pytest.mark.parametrize("value", ["0", "-1", "10000"])
def test_draft_tokens_out_of_bounds_are_one_line_before_loading(models, capsys, monkeypatch, command, value):
    refuse_to_load(monkeypatch)
    extra = {"generate": ["--prompt", "hi"], "chat": [], "eval": ["--data", "x.jsonl"], "serve": ["--port", "0"]}
    assert main([command, "--model", models["target"], *extra[command], "--draft", models["drafter"],
                 "--draft-tokens", value]) == 2
    line = one_error_line(capsys)
    assert "--draft-tokens" in line and f"between 1 and {MAX_DRAFT_TOKENS}" in line


def test_draft_tokens_without_a_drafter_is_one_line(models, capsys, monkeypatch):
    refuse_to_load(monkeypatch)
    assert main(["generate", "--model", models["target"], "--prompt", "hi", "--draft-tokens", "3"]) == 2
    assert "--draft-tokens needs --draft" in one_error_line(capsys)


def test_a_drafter_record_with_an_absurd_draft_length_is_refused_at_load(models, tmp_path, capsys):
    import shutil

    folder = Path(shutil.copytree(models["drafter"], tmp_path / "drafter"))
    (folder / DRAFTER_FILE).write_text(json.dumps({"draft_tokens": 100000000}))
    with pytest.raises(LLMModulesError, match=f"between 1 and {MAX_DRAFT_TOKENS}"):
        DrafterRecord.load(folder)
    assert generate(models["target"], "hi", "--max-new-tokens", "2", "--draft", str(folder)) == 2
    assert "draft_tokens" in one_error_line(capsys)


def test_draft_tokens_that_leave_no_room_are_refused_when_the_drafter_loads(models, capsys):
    """A 48-position target: K = 47 would keep 48 positions for each verify pass, leaving none to decode in."""
    assert generate(models["target48"], "hi", "--max-new-tokens", "2", "--draft", models["drafter48"],
                    "--draft-tokens", "47") == 2
    line = one_error_line(capsys)
    assert "--draft-tokens 47" in line and "48 positions" in line
    assert generate(models["target48"], "hi", "--max-new-tokens", "2", "--draft", models["drafter48"],
                    "--draft-tokens", "8") == 0


# ----------------------------------------------------------------------------- 7: a corrupt draft vocabulary
@pytest.mark.parametrize("ids,said", [([3, 7, 50257], "past the target's vocabulary"),
                                      ([-2, 3, 7], "negative"), ([3, 7, 7], "sorted"), ([7, 3, 9], "sorted")])
def test_a_corrupt_draft_vocabulary_is_one_line_at_load(models, tmp_path, capsys, ids, said):
    import shutil

    folder = Path(shutil.copytree(models["drafter"], tmp_path / "drafter"))
    DrafterRecord(4, vocab=len(ids)).save(folder)
    save_draft_vocab(folder, torch.tensor(ids))
    assert generate(models["target"], "hi", "--max-new-tokens", "2", "--draft", str(folder)) == 2
    line = one_error_line(capsys)
    assert DRAFT_VOCAB_FILE in line and said in line


# ----------------------------------------------------------------------------- 8: the repetition penalty
@pytest.mark.parametrize("value", ["1e-40", "0", "1e40"])
def test_an_extreme_repetition_penalty_is_one_line_before_loading(models, capsys, monkeypatch, value):
    refuse_to_load(monkeypatch)
    assert generate(models["target"], "hi", "--do-sample", "--repetition-penalty", value) == 2
    assert "repetition_penalty must be between" in one_error_line(capsys)


# ----------------------------------------------------------------------------- 9: what --draft and errors name
def test_eval_of_a_composed_model_refuses_draft_as_generate_does(models, capsys):
    assert generate(models["composed"], "hi", "--draft", "/nonexistent") == 2
    said = one_error_line(capsys)
    assert main(["eval", "--model", models["composed"], "--data", "x.jsonl", "--draft", "/nonexistent"]) == 2
    assert one_error_line(capsys) == said and "composed model" in said


def test_a_digest_mismatch_names_the_large_model_the_user_passed(models, tmp_path, capsys):
    """A drafter trained on target/ asked to draft for target2/ (other weights): the error names target2."""
    other = save_target(tmp_path / "target2", 96)
    with torch.no_grad():
        model = GPT2LMHeadModel.from_pretrained(other)
        model.transformer.wte.weight.add_(1.0)
        model.save_pretrained(other)
    assert generate(other, "hi", "--max-new-tokens", "2", "--draft", models["drafter"]) == 2
    line = one_error_line(capsys)
    assert repr(other) in line and "not the one it was trained on" in line


def test_draft_prompt_lookup_needs_no_drafter_gives_the_models_own_text_and_keeps_the_reserve(models, capsys):
    """`--draft prompt-lookup`: speculative decoding with drafts copied from the context, the model's own greedy
    text; its K (10 by default) is reserved like a drafter's, and a K that leaves no room is one line."""
    prompt = "one two three one two three one two"
    assert generate(models["target"], prompt, "--max-new-tokens", "12") == 0
    alone = capsys.readouterr().out
    assert generate(models["target"], prompt, "--max-new-tokens", "12", "--draft", "prompt-lookup") == 0
    assert capsys.readouterr().out == alone
    assert generate(models["target"], PROMPT_88, "--max-new-tokens", "8", "--draft", "prompt-lookup") == 2
    assert f"less the {PromptLookup.DEFAULT_TOKENS + 1}" in one_error_line(capsys)
    assert generate(models["target48"], "a", "--draft", "prompt-lookup", "--draft-tokens", "46") == 2
    assert "leaves no room" in one_error_line(capsys)
    assert generate(models["composed"], "a", "--draft", "prompt-lookup") == 2
    assert "drafts for a plain model" in one_error_line(capsys)


# ----------------------------------------------------------------------------- --draft-lookup
@pytest.mark.parametrize("command", ["generate", "chat", "eval", "serve"])
@pytest.mark.parametrize("flag,lookup", [((), (True, None, True)), (("--draft-lookup",), (True, None, True)),
                                         (("--no-draft-lookup", "--draft-width", "3", "--no-draft-adaptive"),
                                          (False, 3, False))])
def test_draft_lookup_reaches_the_drafters_loading_from_every_command(models, capsys, monkeypatch, command, flag,
                                                                       lookup):
    asked = []

    def loading(draft, *args, **kwargs):
        asked.append((draft.lookup, draft.width, draft.adaptive))
        raise LLMModulesError("loaded far enough")

    monkeypatch.setattr("llm_modules.models.loading.load_drafter", loading)
    extra = {"generate": ["--prompt", "hi"], "chat": [], "eval": ["--data", "x.jsonl"], "serve": ["--port", "0"]}
    assert main([command, "--model", models["target"], *extra[command], "--draft", models["drafter"], *flag]) == 2
    assert "loaded far enough" in one_error_line(capsys) and asked == [lookup]


def test_draft_lookup_without_a_drafter_is_one_line(models, capsys, monkeypatch):
    refuse_to_load(monkeypatch)
    assert main(["generate", "--model", models["target"], "--prompt", "hi", "--no-draft-lookup"]) == 2
    assert "--no-draft-lookup needs --draft" in one_error_line(capsys)


@pytest.mark.parametrize("flags, said", [(("--draft-width", "2"), "--draft-width needs --draft"),
                                         (("--draft", "DRAFTER", "--draft-width", "0"), "between 1 and 16"),
                                         (("--draft", "prompt-lookup", "--draft-width", "2"), "needs a drafter"),
                                         (("--no-draft-adaptive",), "--no-draft-adaptive needs --draft")])
def test_a_bad_draft_width_is_one_line(models, capsys, flags, said):
    flags = [models["drafter"] if f == "DRAFTER" else f for f in flags]
    assert main(["generate", "--model", models["target"], "--prompt", "hi", *flags]) == 2
    assert said in one_error_line(capsys)


def test_a_drafter_with_and_without_lookup_gives_the_models_own_text(models, capsys):
    from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
    from llm_modules.decoding.speculative.policy import DraftPolicy
    from llm_modules.decoding.speculative.tree_proposer import TreeProposer
    from llm_modules.models.loading import DraftOptions, load_drafter, load_model

    target = load_model(models["target"])
    tree = load_drafter(DraftOptions(models["drafter"]), target, models["target"])
    assert isinstance(tree, TreeProposer) and tree.lookup is not None and tree.width == TreeProposer.DEFAULT_WIDTH
    assert isinstance(tree.policy, DraftPolicy)
    chain = load_drafter(DraftOptions(models["drafter"], lookup=False, width=1, adaptive=False), target,
                         models["target"])
    assert isinstance(chain, ComposedProposer) and chain.policy is None
    prompt = "one two three one two three one two"
    assert generate(models["target"], prompt, "--max-new-tokens", "12") == 0
    alone = capsys.readouterr().out
    for flags in (["--draft-lookup"], ["--no-draft-lookup"], ["--draft-width", "3"],
                  ["--no-draft-lookup", "--draft-width", "1", "--no-draft-adaptive"]):
        assert generate(models["target"], prompt, "--max-new-tokens", "12", "--draft", models["drafter"], *flags) == 0
        assert capsys.readouterr().out == alone
