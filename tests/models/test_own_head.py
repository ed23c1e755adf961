"""The own head (head="own"): the small model answers in its OWN tokenizer and vocabulary, reading the large
model's states of the prompt, which the large model reads in its own tokens. Untrained it is exactly the small
model alone; cached decoding equals a full recompute; it saves, loads, serves, evaluates and trains in the
small tokenizer. The two tiny models have different byte-level BPE tokenizers (600 and 420 tokens)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_modules import LLMModulesModel
from llm_modules.bridges import LargeRead
from llm_modules.data.prepare import TokenizedExample, collate
from llm_modules.decoding.engine import DecodeBatch, Sequence
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.errors import LLMModulesError
from llm_modules.losses import next_token_loss
from llm_modules.models.compose_config import ComposeConfig
from llm_modules.models.saved import CONFIG_FILE
from llm_modules.tensors import IGNORE_INDEX, left_pad

from ..helpers import OPTIONS, decode_cached_and_recomputed, nudge_gates

BRIDGES = ["ladder", "xattn"]
QUESTIONS = [("What is 3 plus 4?", " 3 plus 4 is 7."), ("What is 12 plus 9? Tell me.", " 12 plus 9 is 21."),
             ("What is 5 plus 5?", " It is 10.")]


def own_model(pair, bridge, seed=0, **extra) -> LLMModulesModel:
    torch.manual_seed(seed)
    return LLMModulesModel.compose(large=pair["large"], small=pair["small"], bridge=bridge, head="own",
                                   large_reads="prompt", **{**OPTIONS[bridge], **extra}).eval()


def small_alone(pair):
    return AutoModelForCausalLM.from_pretrained(pair["small"]).eval()


def examples(tokenizer) -> list[TokenizedExample]:
    """Question and answer in `tokenizer`'s ids, the loss on the answer and its EOS."""
    out = []
    for question, answer in QUESTIONS:
        prompt, reply = tokenizer(question)["input_ids"], tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
        out.append(TokenizedExample(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply, None))
    return out


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(question)["input_ids"] for question, _ in QUESTIONS]


def test_the_config_takes_the_own_head_only_where_it_can_start_as_the_small_model(mapped_pair):
    base = dict(large=mapped_pair["large"], small=mapped_pair["small"], head="own")
    config = ComposeConfig.from_options(**base, bridge="xattn", large_reads="prompt")
    assert config.small_inputs == "own"  # set for it
    for options, match in ((dict(bridge="eca", large_reads="prompt"), "not gated"),
                           (dict(bridge="xattn"), "--large-reads prompt"),
                           (dict(bridge="xattn", large_reads="prompt", small_inputs="mapped"), "leave out small_inputs"),
                           (dict(bridge="xattn", large_reads="prompt", train_embeddings=True), "train_embeddings")):
        with pytest.raises(LLMModulesError, match=match):
            ComposeConfig.from_options(**base, **options)
    with pytest.raises(LLMModulesError, match="head 'own' only"):
        ComposeConfig.from_options(large="l", small="s", head="new", small_inputs="own", large_reads="prompt")


@pytest.mark.parametrize("bridge", BRIDGES)
def test_untrained_it_is_the_small_model_alone(mapped_pair, bridge):
    """float32, the same text in the small tokenizer: the composed model's loss (mean and summed, as training
    computes it) and logits equal the small model's alone; opening the gates moves them (the large model is
    read, so the equality is the gates' doing)."""
    model = own_model(mapped_pair, bridge)
    tokenizer = AutoTokenizer.from_pretrained(mapped_pair["small"])
    assert model.tokenizer.get_vocab() == tokenizer.get_vocab() and model.vocab_size == len(tokenizer) != len(
        model.large_tokenizer)
    batch = collate(examples(tokenizer), pad_id=tokenizer.pad_token_id)
    alone = small_alone(mapped_pair)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = model(**batch)
    assert out.logits.shape[-1] == len(tokenizer)
    real = batch["attention_mask"].bool()  # padding's logits are no one's
    torch.testing.assert_close(out.logits[real], alone[real], rtol=0, atol=1e-5)
    expected = next_token_loss(alone, batch["labels"])
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)
    summed = model(**batch, loss="sum").loss
    answer_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(summed / answer_tokens, expected, rtol=0, atol=1e-5)
    nudge_gates(model)
    assert (model(**batch).loss - expected).abs() > 1e-3


def test_a_small_model_with_tied_embeddings(mapped_pair, tmp_path):
    """A small model whose language head is its input embeddings (SmolLM2's, Qwen's small ones): the own head is
    that very matrix, counted once, trained once per step (one entry in the optimizer), and still starts as
    the small model alone; saved (once) and loaded, it stays tied."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llm_modules.training.config import TrainConfig
    from llm_modules.training.objectives import build_objective

    tokenizer = AutoTokenizer.from_pretrained(mapped_pair["small"])
    torch.manual_seed(5)
    tied = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=len(tokenizer),
                                        max_position_embeddings=1024, tie_word_embeddings=True)).eval()
    tied.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    pair = {"large": mapped_pair["large"], "small": str(tmp_path / "tied")}
    model = own_model(pair, "xattn")
    assert model.head.out.weight is model.small.get_input_embeddings().weight
    counts = model.parameter_counts()
    assert counts["total"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = collate(examples(tokenizer), pad_id=tokenizer.pad_token_id)
    real = batch["attention_mask"].bool()
    alone = tied(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(model(**batch).logits[real], alone[real], rtol=0, atol=1e-5)
    config = TrainConfig.from_flags(large=pair["large"], small=pair["small"], data="d.jsonl", output="o", head="own",
                                    large_reads="prompt", bridge="xattn", large_layers=[2, 4], num_heads=4)
    groups = build_objective(config).param_groups(config)
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids))
    nudge_gates(model)
    model.save_pretrained(tmp_path / "saved")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert "head.out.weight" not in saved and any(name.startswith("small.") for name in saved)  # saved once
    loaded = LLMModulesModel.from_pretrained(tmp_path / "saved").eval()
    assert loaded.head.out.weight is loaded.small.get_input_embeddings().weight
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_the_large_model_reads_the_prompts_text_in_its_own_tokens(mapped_pair):
    """The large model's input is the prompt's text re-tokenized by the large tokenizer (not the small ids), and
    the answer never reaches it."""
    model = own_model(mapped_pair, "xattn")
    small_tok, large_tok = model.small_tokenizer, model.large_tokenizer
    text = QUESTIONS[1][0]
    small_ids = small_tok(text)["input_ids"]
    assert model.large_prompt_ids(small_ids) == large_tok(text)["input_ids"] != small_ids
    batch = collate(examples(small_tok), pad_id=small_tok.pad_token_id)
    seen = []
    handle = model.large.base_model.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["input_ids"]),
                                                          with_kwargs=True)
    model(**batch)
    handle.remove()
    [large_ids] = seen
    for row, (question, _) in zip(large_ids, QUESTIONS):
        assert large_tok.decode(row[row != 0]) == question


def test_training_from_cached_prompt_states_equals_reading_the_prompt(mapped_pair, tmp_path):
    """The composed objective's batches (states of each prompt re-tokenized, cached, right-padded to the longest)
    give the loss and gradients of the model reading the prompts itself; states of another width are refused."""
    from llm_modules.states.store import StateCache, examples_digest, state_cache_key
    from llm_modules.training.objectives.composed import prompt_examples

    model = own_model(mapped_pair, "xattn")
    nudge_gates(model)
    model.train()
    chosen = examples(model.tokenizer)
    batch = collate(chosen, pad_id=model.tokenizer.pad_token_id)
    prompts_large = prompt_examples(chosen, model.large_prompt_ids)
    assert [p.input_ids for p in prompts_large] == [model.large_tokenizer(q)["input_ids"] for q, _ in QUESTIONS]
    cache = StateCache.open_or_build(tmp_path, state_cache_key(model, "prompt:" + examples_digest(prompts_large)),
                                     model, prompts_large, progress=False)
    width = max(cache.lengths)
    assert min(cache.lengths) < width  # the batch pads

    def loss_and_grads(**extra):
        model.zero_grad()
        loss = model(**batch, **extra, loss="sum").loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(large_states=cache.batch([0, 1, 2], pad_to=width))
    read, read_grads = loss_and_grads()
    torch.testing.assert_close(loss, read, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(read_grads) and any(n.startswith("bridge.") for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], read_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(LLMModulesError, match="longest prompt"):
        model(**batch, large_states=cache.batch([0, 1, 2], pad_to=width + 1))


def decoding_model(pair, bridge):
    model = own_model(pair, bridge)
    nudge_gates(model)
    return model.double()


@pytest.mark.parametrize("bridge", BRIDGES)
def test_cached_decoding_equals_full_recompute(mapped_pair, bridge):
    """float64, left-padded prompts whose large re-tokenizations differ in length: the cached decoder's logits at
    every step are those of one forward over prompt + answer, and its tokens those of a full recompute."""
    model = decoding_model(mapped_pair, bridge)
    ids, mask = left_pad(prompts(model.tokenizer), model.tokenizer.pad_token_id)
    steps, cached = decode_cached_and_recomputed(model, ids, mask)
    assert int(cached[:, ids.shape[1]:].max()) < model.vocab_size  # the small vocabulary's ids
    full_mask = torch.cat([mask, torch.ones(len(ids), 6, dtype=torch.long)], 1)
    full = model.forward_read(LargeRead(answer_start=ids.shape[1]), input_ids=cached, attention_mask=full_mask).logits
    torch.testing.assert_close(torch.stack(steps, 1), full[:, ids.shape[1] - 1:-1], rtol=1e-9, atol=1e-9)


def test_rows_joining_and_leaving_decode_as_each_row_alone(mapped_pair):
    """A row joining mid-decode whose large prompt is longer or shorter than the running rows' (the bridge's keys
    over it are padded to join) and rows leaving early decode as each row alone; the large model runs once per
    joining batch and never in a decode step."""
    model = decoding_model(mapped_pair, "xattn")
    rows, lengths = prompts(model.tokenizer), [6, 2, 5]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=n, eos_token_id=[])[0, len(p):].tolist()
             for p, n in zip(rows, lengths)]
    calls = []
    handle = model.large.base_model.register_forward_hook(lambda m, a, out: calls.append(1))
    batch = DecodeBatch(model)
    seqs = [Sequence(p, SamplingOptions(max_new_tokens=n), []) for p, n in zip(rows, lengths)]
    batch.add(seqs[1:])
    batch.step()
    batch.add(seqs[:1])  # joins after one step
    while batch.rows:
        batch.step()
    handle.remove()
    assert [s.tokens for s in seqs] == alone
    assert len(calls) == 2


def test_it_stops_at_the_small_models_end_of_sequence(mapped_pair):
    """Decoding ends at the end-of-sequence id of the small model (whose vocabulary it predicts), not the large's."""
    from llm_modules.decoding.engine import model_eos_ids

    model = own_model(mapped_pair, "xattn")
    model.large.generation_config.eos_token_id = 7
    assert model_eos_ids(model) == [small_alone(mapped_pair).generation_config.eos_token_id] != [7]


def test_save_load_round_trip(mapped_pair, tmp_path):
    """The saved folder says head own; it loads with the small tokenizer (load_model too) and gives identical
    logits and tokens."""
    from llm_modules.models.loading import load_model

    model = own_model(mapped_pair, "xattn")
    nudge_gates(model)
    model.save_pretrained(tmp_path / "own")
    saved = json.loads((tmp_path / "own" / CONFIG_FILE).read_text())
    assert saved["head"] == "own" and saved["small_inputs"] == "own"
    loaded = LLMModulesModel.from_pretrained(tmp_path / "own").eval()
    assert loaded.tokenizer.get_vocab() == model.small_tokenizer.get_vocab()
    assert load_model(str(tmp_path / "own")).tokenizer.get_vocab() == model.small_tokenizer.get_vocab()
    batch = collate(examples(model.tokenizer), pad_id=model.tokenizer.pad_token_id)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    ids = torch.tensor([prompts(model.tokenizer)[0]])
    assert torch.equal(loaded.generate(ids, max_new_tokens=5, eos_token_id=[]),
                       model.generate(ids, max_new_tokens=5, eos_token_id=[]))



def test_a_frozen_small_model_saves_only_the_bridge(mapped_pair, tmp_path):
    """train_small=False: the small model and its own head are frozen, come back from its spec, and are not saved."""
    from safetensors.torch import load_file

    model = own_model(mapped_pair, "xattn", train_small=False)
    assert not any(p.requires_grad for p in model.head.parameters())
    nudge_gates(model)
    model.save_pretrained(tmp_path / "frozen")
    assert {name.split(".")[0] for name in load_file(str(tmp_path / "frozen" / "model.safetensors"))} == {"bridge"}
    loaded = LLMModulesModel.from_pretrained(tmp_path / "frozen").eval()
    batch = collate(examples(model.tokenizer), pad_id=model.tokenizer.pad_token_id)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_served_in_the_small_tokenizer(mapped_pair, tmp_path):
    """`serve`: a chat request's prompt is laid out and counted in the small tokenizer, and the reply is the
    small tokenizer's text of the tokens the model generates (greedy)."""
    from openai import OpenAI

    from llm_modules.data.prompting import prompt_ids

    from ..helpers import ServerThread

    model = own_model(mapped_pair, "xattn")
    nudge_gates(model, scale=0.5)
    model.save_pretrained(tmp_path / "model")
    question = [{"role": "user", "content": QUESTIONS[0][0]}]
    ids = prompt_ids(question, model.small_tokenizer, "stratos")
    assert ids != prompt_ids(question, model.large_tokenizer, "stratos")
    expected = model.generate(torch.tensor([ids]), max_new_tokens=8)[0, len(ids):]
    with ServerThread(str(tmp_path / "model"), max_batch=2, max_queue=2) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="model", messages=question, max_tokens=8, temperature=0)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == model.small_tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.choices[0].message.content.strip()


def uneven_data(path) -> str:
    """12 prompt/completion lines whose prompts differ in length (so batches pad the large prompts)."""
    with path.open("w") as f:
        for i in range(12):
            a, b = 7 * i + 1, i % 4 + 2
            prompt = f"What is {a} plus {b}?" + " Tell me the sum." * (i % 3)
            f.write(json.dumps({"prompt": prompt, "completion": f"{a} plus {b} is {a + b}.", "answer": str(a + b)}) + "\n")
    return str(path)


def test_train_cli_with_the_own_head(mapped_pair, tmp_path, capsys):
    """`train --method composed --head own --large-reads prompt`: its validation starts at the small model
    alone's bits per byte (labels in the small tokenizer), the loss falls, the state cache holds the prompts in
    large-model tokens, the validation loss from cached states (gates open) is the saved model's reading the
    prompts itself, the evaluation harness decodes in the small tokenizer, and `generate` loads the folder;
    --method drafter refuses --head own."""
    from llm_modules.data.prepare import prepare_data, prompt_length
    from llm_modules.entrypoints.cli import main
    from llm_modules.evaluation.harness import (
        EvalOptions,
        PlainScorer,
        evaluate,
        load_scorer,
    )
    from llm_modules.states.store import INDEX_FILE
    from llm_modules.training.config import TrainConfig

    from ..helpers import losses

    args = ["train", "--method", "composed", "--large", mapped_pair["large"], "--small", mapped_pair["small"],
            "--data", uneven_data(tmp_path / "data.jsonl"), "--output", str(tmp_path / "run"),
            "--template", "stratos", "--batch-size", "2", "--max-length", "1000", "--max-steps", "4",
            "--eval-every", "4", "--num-samples", "1", "--max-new-tokens", "4", "--no-progress",
            "--state-cache-dir", str(tmp_path / "states"), "--bridge", "xattn", "--large-layers", "2,4",
            "--small-stride", "1", "--num-heads", "4", "--head", "own", "--large-reads", "prompt", "--lr-small", "1e-2",
            "--lr-bridge", "1e-2", "--gate-temperature", "0.01", "--val-fraction", "0.5"]
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "best" / CONFIG_FILE).read_text())["head"] == "own"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and losses(tmp_path / "run")[-2] < losses(tmp_path / "run")[1]
    config = TrainConfig.from_file(tmp_path / "run" / "run_config.json")
    small_tok, large_tok = (AutoTokenizer.from_pretrained(mapped_pair[side]) for side in ("small", "large"))
    data = prepare_data(config.data, small_tok)
    alone = evaluate(PlainScorer(small_alone(mapped_pair), small_tok), data.val,
                     EvalOptions(generate=False, batch_size=4))
    assert rows[0]["val_bpb"] == pytest.approx(alone["bits_per_byte"], abs=1e-4)
    trained = evaluate(load_scorer(str(tmp_path / "run" / "best")), data.val, EvalOptions(generate=False, batch_size=4))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(data.val) >= 2 and trained["loss"] == pytest.approx(summary["best_val_loss"], abs=1e-5)
    assert abs(trained["loss"] - alone["loss"]) > 1e-2
    scorer = load_scorer(str(tmp_path / "run" / "best"))  # the harness generates and decodes in the small tokenizer
    [sample] = evaluate(scorer, data.val[:1], EvalOptions(max_new_tokens=4, batch_size=1))["samples"]
    prompt = data.val[0].input_ids[:prompt_length(data.val[0])]
    tokens = scorer.model.generate(torch.tensor([prompt]), max_new_tokens=4)[0, len(prompt):]
    assert sample["model_answer"] == small_tok.decode(tokens, skip_special_tokens=True)
    stored = sorted(n for p in (tmp_path / "states").glob(f"*/{INDEX_FILE}") for n in json.loads(p.read_text())["lengths"])
    prompts_text = [small_tok.decode(e.input_ids[:prompt_length(e)])
                    for e in data.train + data.val]
    assert stored == sorted(len(large_tok(t)["input_ids"]) for t in prompts_text)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt", "What is 3 plus 4?",
                 "--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32"]) == 0
    with pytest.raises(LLMModulesError, match="--head own cannot draft"):
        TrainConfig.from_flags(large="l", small="s", data="d", output="o", method="drafter", head="own",
                               large_reads="prompt", bridge="xattn")


@pytest.mark.parametrize("extra,words", [
    (["--bridge", "xattn"], ["head 'own' needs --large-reads prompt"]),
    (["--large-reads", "prompt"], ["head 'own'", "ladder or xattn", "'eca'"]),
    (["--method", "drafter", "--large-reads", "prompt", "--bridge", "xattn"], ["--head own cannot draft"]),
])
def test_what_the_own_head_refuses_is_one_line(tmp_path, capsys, extra, words):
    """On the command line: --head own without --large-reads prompt, with the eca bridge (the default), or under
    --method drafter is one `error:` line, before anything is written."""
    from llm_modules.entrypoints.cli import main

    args = ["train", "--large", "config:gpt-neo-125m", "--small", "config:gpt-neo-125m", "--data", "d.jsonl",
            "--output", str(tmp_path / "out"), "--head", "own", *extra]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "out").exists()
