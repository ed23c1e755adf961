"""The real packaged models: Qwen2.5-Coder-0.5B-Instruct (large) and SmolLM2-135M-Instruct (small)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llm_modules import LLMModulesModel
from llm_modules.data.prepare import prepare_data
from llm_modules.entrypoints.cli import main
from llm_modules.training.config import DEMO, TrainConfig

pytestmark = pytest.mark.real
LARGE, SMALL = "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def composed():
    torch.manual_seed(0)
    return LLMModulesModel.compose(large=LARGE, small=SMALL, head="residual").eval()


def test_real_pair_composes_generates_and_caches_exactly(composed):
    counts = composed.parameter_counts()
    assert counts["large"]["trainable"] == 0 and counts["large"]["frozen"] > 600_000_000
    assert counts["small"]["frozen"] == 576  # only the 1-row embedding stub
    messages = [{"role": "user", "content": "What is the sum of 5 and 5? Answer with a number."}]
    ids = composed.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = composed(input_ids=ids).logits
        large_logits = composed.large(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 151936)
    torch.testing.assert_close(logits, large_logits, rtol=1e-4, atol=1e-4)  # residual head starts at the large model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in composed.head.parameters():
            p.normal_(std=0.02)  # let the small side speak
    cached = composed.generate(ids, max_new_tokens=8, eos_token_id=[])
    recomputed = composed.generate(ids, max_new_tokens=8, eos_token_id=[], use_cache=False)
    assert torch.equal(cached, recomputed)
    assert cached.shape == (1, ids.shape[1] + 8)


def per_token_loss(logits_of, examples) -> float:
    """Mean next-token cross-entropy over answer tokens, one unpadded example at a time."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = logits_of(torch.tensor([e.input_ids]))[0, :-1].float()  # (T-1, V)
            labels = torch.tensor(e.labels[1:])
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            tokens += int((labels != -100).sum())
    return total / tokens


def test_real_short_training_run(tmp_path, capsys, composed):
    output = tmp_path / "run"
    data = "reasoning-gym:gsm_symbolic?size=16&seed=1"
    code = main(["train", "--demo", "--data", data, "--output", str(output),
                 "--max-steps", "2", "--eval-every", "2", "--save-every", "2", "--num-samples", "1",
                 "--max-new-tokens", "12", "--no-progress", "--state-cache-dir", str(tmp_path / "states")])
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 2 and (output / "best" / "model.safetensors").is_file()
    # The residual head starts at the large model, so the loss before training is the large model's
    # own, computed here with plain transformers on the same validation examples.
    config = TrainConfig.from_flags(**{**DEMO, "data": data, "output": str(output)})
    val = prepare_data(config.data, composed.tokenizer, composed.small_max_positions).val
    reference = per_token_loss(lambda ids: composed.large(input_ids=ids).logits, val)
    assert summary["initial_val_loss"] == pytest.approx(reference, abs=1e-4)
    capsys.readouterr()
    assert main(["eval", "--model", str(output / "best"), "--limit", "2", "--max-new-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trained = LLMModulesModel.from_pretrained(output / "best").eval()
    assert result["examples"] == min(2, len(val))
    assert result["loss"] == pytest.approx(per_token_loss(lambda ids: trained(input_ids=ids).logits, val[:2]), abs=1e-4)


def test_real_vocabulary_map_from_qwen_to_smollm():
    from llm_modules.models.specs import resolve_tokenizer
    from llm_modules.models.vocab_map import VocabMap

    large_tok, small_tok = resolve_tokenizer(LARGE), resolve_tokenizer(SMALL)
    vm = VocabMap.from_tokenizers(large_tok, small_tok, 151936, 49152)
    assert vm.offsets.nbytes + vm.small_ids.nbytes < 8e6  # a dense 151,936 x 576 float matrix: 350 MB
    ids = large_tok("<|im_start|>user\nHow many legs does a spider have?<|im_end|>")["input_ids"]
    for i in ids:  # these words and both chat markers are single tokens in both vocabularies
        pieces = vm.small_ids[vm.offsets[i]:vm.offsets[i + 1]].tolist()
        assert [small_tok.decode(pieces)] == [large_tok.decode([i])] and len(pieces) == 1
