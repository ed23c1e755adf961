"""The lm-evaluation-harness adapter scores and generates exactly like the composed model itself."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

import pytest
import torch

from llm_modules import LLMModulesModel
from llm_modules.errors import LLMModulesError

from ..helpers import FIXTURES, REPO, nudge

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from llm_modules.evaluation.lm_eval import LLMModulesLM

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: extra intra-op threads only cost time on a busy machine (up to 50x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def composed(tiny_pair_with_tokenizer):
    torch.manual_seed(0)
    model = LLMModulesModel.compose(
        large=tiny_pair_with_tokenizer["large"], small=tiny_pair_with_tokenizer["small"], head="new"
    )
    nudge(model)  # the new head starts at zero; move it so greedy outputs vary
    return model.eval()


@pytest.fixture(scope="module")
def saved(composed, tmp_path_factory):
    return str(composed.save_pretrained(tmp_path_factory.mktemp("lm_eval_model")))


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t + 1] | ids[: t + 1]) for every t, from one unpadded forward of ids[:-1]."""
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def encode(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_loglikelihood_equals_the_direct_sum_in_mixed_length_batches(composed):
    lm = LLMModulesLM(model=composed, batch_size=3)
    pairs = [
        ("The capital of France is", " Paris"),
        ("One", " two three four five six seven"),
        ("A much longer context that goes on for quite a few more tokens than the others do, then", " ends."),
        ("Hi", " there"),
        ("", "Empty contexts condition on the prefix token"),
    ]
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    assert len(got) == len(pairs)
    for (context, continuation), (score, _) in zip(pairs, got):
        context_ids = encode(composed, context) if context else [lm.prefix_token_id]
        whole = encode(composed, context + continuation) if context else context_ids + encode(composed, continuation)
        assert whole[: len(context_ids)] == context_ids
        n = len(whole) - len(context_ids)
        expected = float(token_logprobs(composed, whole)[-n:].sum())
        assert score == pytest.approx(expected, abs=TOL), (context, continuation)
    # the batch size does not change the numbers
    single = LLMModulesLM(model=composed, batch_size=1).loglikelihood(requests("loglikelihood", *pairs))
    assert [s for s, _ in single] == pytest.approx([s for s, _ in got], abs=TOL)


def test_is_greedy_marks_exactly_the_greedy_continuation(composed):
    lm = LLMModulesLM(model=composed, batch_size=2)
    context = encode(composed, "The capital of France is")
    prompt = torch.tensor([context])
    out = composed.generate(prompt, torch.ones_like(prompt), max_new_tokens=3, eos_token_id=[])
    greedy = out[0, len(context) :].tolist()
    other = (greedy[-1] + 1) % composed.vocab_size
    got = lm._loglikelihood_tokens([(None, context, greedy), (None, context, greedy[:-1] + [other])])
    assert [g for _, g in got] == [True, False]
    assert got[0][0] == pytest.approx(float(token_logprobs(composed, context + greedy)[-3:].sum()), abs=TOL)
    assert got[1][0] < got[0][0]
    # through text, when the greedy tokens survive a decode/encode round trip
    text = composed.tokenizer.decode(greedy)
    if encode(composed, "The capital of France is" + text) == context + greedy:
        [(_, is_greedy)] = lm.loglikelihood(requests("loglikelihood", ("The capital of France is", text)))
        assert is_greedy


TEXT = (
    "A small model reads the states of a large frozen model through cross-attention and learns "
    "to predict the next token of the large vocabulary, one position at a time."
)


def windowed_direct_sum(model, prefix: int, tokens: list[int], window: int) -> float:
    """Sum of log-probs of `tokens` in disjoint chunks of `window`, each seeing up to `window` inputs."""
    seq, total = [prefix] + tokens, 0.0
    for a in range(0, len(tokens), window):
        b = min(a + window, len(tokens))
        inputs = seq[max(0, b - window) : b + 1]  # predicts tokens[a:b] from its last b - a positions
        total += float(token_logprobs(model, inputs)[-(b - a) :].sum())
    return total


def test_loglikelihood_rolling_equals_the_direct_sum(composed):
    lm = LLMModulesLM(model=composed, batch_size=2)
    tokens = encode(composed, TEXT)
    [whole] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (TEXT,)))
    assert whole == pytest.approx(float(token_logprobs(composed, [lm.prefix_token_id] + tokens).sum()), abs=TOL)

    windowed = LLMModulesLM(model=composed, batch_size=2, max_length=8)
    got = windowed.loglikelihood_rolling(requests("loglikelihood_rolling", (TEXT,), ("Short text.",)))
    assert len(tokens) > 3 * 8
    assert got[0] == pytest.approx(windowed_direct_sum(composed, lm.prefix_token_id, tokens, 8), abs=TOL)
    short = encode(composed, "Short text.")
    assert got[1] == pytest.approx(float(token_logprobs(composed, [lm.prefix_token_id] + short).sum()), abs=TOL)


def test_max_length_respects_the_small_models_position_limit(composed, monkeypatch):
    monkeypatch.setattr(composed, "small_max_positions", 12)
    assert LLMModulesLM(model=composed).max_length == 12
    assert LLMModulesLM(model=composed, max_length=500).max_length == 12  # capped, with a warning
    lm = LLMModulesLM(model=composed, batch_size=4)
    [got] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (TEXT,)))  # forward would raise past 12
    assert got == pytest.approx(windowed_direct_sum(composed, lm.prefix_token_id, encode(composed, TEXT), 12), abs=TOL)
    [(score, _)] = lm.loglikelihood(requests("loglikelihood", (TEXT, " end")))  # context left-truncated
    whole = encode(composed, TEXT + " end")
    assert score == pytest.approx(float(token_logprobs(composed, whole[-13:])[-1]), abs=TOL)
    monkeypatch.setattr(composed, "large_max_positions", 10)  # the model's one limit: the smaller of the two
    assert composed.max_positions == 10 and LLMModulesLM(model=composed).max_length == 10


def test_generate_until_stops_at_the_until_string_like_model_generate(composed):
    lm = LLMModulesLM(model=composed, batch_size=2)
    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived"]
    full = []
    for prompt in prompts:
        ids = torch.tensor([encode(composed, prompt)])
        out = composed.generate(ids, torch.ones_like(ids), max_new_tokens=10, eos_token_id=lm.eot_token_id)
        full.append(composed.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    # stop at the text of the 4th generated token of the first prompt: a stop string the model reaches
    new = composed.tokenizer(full[0], add_special_tokens=False)["input_ids"]
    stop = composed.tokenizer.decode(new[3:4]).strip() or composed.tokenizer.decode(new[3:4])
    assert 0 < full[0].index(stop) < len(full[0])
    gen_kwargs = {"until": [stop], "max_gen_toks": 10, "do_sample": False}
    got = lm.generate_until(requests("generate_until", *[(p, dict(gen_kwargs)) for p in prompts]))
    assert got == [text.split(stop)[0] for text in full]
    assert stop not in got[0] and len(got[0]) < len(full[0])
    # max_gen_toks bounds the answer; sampling runs and is reproducible under a seed
    [short] = lm.generate_until(requests("generate_until", (prompts[0], {"until": [], "max_gen_toks": 2})))
    assert short == composed.tokenizer.decode(new[:2])
    sampled = []
    for _ in range(2):
        torch.manual_seed(5)
        options = {"do_sample": True, "temperature": 0.8, "max_gen_toks": 5}
        sampled += lm.generate_until(requests("generate_until", (prompts[1], options)))
    assert sampled[0] == sampled[1] and isinstance(sampled[0], str)


def test_pretrained_folder_and_registry_name(saved, composed):
    from lm_eval.api.registry import get_model

    cls = get_model("llm-modules")
    assert cls is LLMModulesLM
    lm = cls.create_from_arg_string(f"pretrained={saved},batch_size=2,max_length=64", {"device": "cpu"})
    assert (lm.batch_size, lm.max_length) == (2, 64)
    pair = ("The capital of France is", " Paris")
    [(a, _)] = lm.loglikelihood(requests("loglikelihood", pair))
    [(b, _)] = LLMModulesLM(model=composed).loglikelihood(requests("loglikelihood", pair))
    assert a == pytest.approx(b, abs=TOL)
    with pytest.raises(LLMModulesError, match="exactly one"):
        LLMModulesLM()
    with pytest.raises(LLMModulesError, match="batch_size"):
        LLMModulesLM(model=composed, batch_size="auto")


def test_simple_evaluate_runs_local_tasks_offline(saved, tmp_path, monkeypatch):
    import datasets.config
    import lm_eval
    from lm_eval.tasks import TaskManager

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    tasks_dir = shutil.copytree(FIXTURES / "lm_eval", tmp_path / "tasks")
    monkeypatch.chdir(tasks_dir)  # the YAMLs name their data files relative to the working directory

    lm = LLMModulesLM(pretrained=saved, batch_size=4)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["llm_modules_tiny_mc", "llm_modules_tiny_gen", "llm_modules_tiny_ppl"],
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        bootstrap_iters=0,
    )
    results = out["results"]
    acc = results["llm_modules_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and "acc_norm,none" in results["llm_modules_tiny_mc"]
    assert 0.0 <= results["llm_modules_tiny_gen"]["exact_match,none"] <= 1.0
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert results["llm_modules_tiny_ppl"][metric] > 0

    # the reported accuracy is the adapter's own argmax over the choices
    import json

    docs = [json.loads(line) for line in (tasks_dir / "tiny_mc.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = lm.loglikelihood(requests("loglikelihood", *[(context, c) for c in doc["choices"]]))
        correct += max(range(len(scores)), key=lambda i: scores[i][0]) == doc["answer"]
    assert acc == pytest.approx(correct / len(docs))


def test_missing_lm_eval_gives_an_install_hint(monkeypatch):
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "llm_modules.evaluation.lm_eval")
    with pytest.raises(LLMModulesError, match=r"pip install 'llm-modules\[eval\]'"):
        importlib.import_module("llm_modules.evaluation.lm_eval")


@pytest.mark.subprocess
def test_importing_llm_modules_does_not_import_lm_eval():
    code = "import sys, llm_modules, llm_modules.models.composed; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
