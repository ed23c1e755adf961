"""Scaling out on tiny models: the frozen large model's loading options and its place outside DDP,
state caches built by 2 and 4 gloo processes, training on several processes, --device and --dtype."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_modules import LLMModulesModel
from llm_modules.entrypoints.cli import main
from llm_modules.errors import LLMModulesError
from llm_modules.models.large import is_placed, load_options
from llm_modules.models.saved import WEIGHTS_FILE
from llm_modules.states.fence import build_name, finish_lock, host_name, stale_build
from llm_modules.states.store import INDEX_FILE, StateCache, state_cache_key
from llm_modules.training.config import TrainConfig

from ..helpers import (
    build_states,
    compose_tiny,
    losses,
    make_examples,
    run_cli,
    spawn,
    train_run,
    write_data,
)


@pytest.fixture
def train_args(tiny_pair_with_tokenizer, tmp_path):
    data = write_data(tmp_path / "data.jsonl", n=12)

    def build(output: str, *extra: str) -> list[str]:
        return ["train", "--large", tiny_pair_with_tokenizer["large"], "--small", tiny_pair_with_tokenizer["small"],
                "--data", data, "--output", str(tmp_path / output), "--template", "stratos", "--batch-size", "2",
                "--max-length", "512", "--max-steps", "2", "--num-samples", "0", "--no-progress",
                "--state-cache-dir", str(tmp_path / "states"), *extra]

    return build


# ----------------------------------------------------------------------------- the large model
def test_large_dtype_bfloat16_trains_on_cpu(train_args, tmp_path):
    assert main(train_args("bf16", "--large-dtype", "bfloat16")) == 0
    assert len(losses(tmp_path / "bf16")) == 3
    config = json.loads((tmp_path / "bf16" / "last" / "llm_modules_config.json").read_text())
    assert config["large_identity"]["dtype"] == "bfloat16"
    assert not any(k.startswith("large.") for k in load_file(str(tmp_path / "bf16" / "last" / WEIGHTS_FILE)))
    # another precision of the large model computes other states: its own cache folder
    assert main(train_args("fp32")) == 0
    assert len([p for p in (tmp_path / "states").iterdir() if p.is_dir()]) == 4  # train + val, per precision
    assert losses(tmp_path / "bf16") != losses(tmp_path / "fp32")


def test_large_device_map_auto_loads_in_place_and_computes_the_same_states(tiny_models):
    plain = compose_tiny(tiny_models["qwen2"], tiny_models["llama"])
    torch.manual_seed(0)
    mapped = LLMModulesModel.compose(large=tiny_models["qwen2"], small=tiny_models["llama"],
                                     large_placement=load_options(device_map="auto")).eval()
    mapped.load_trained_state_dict(plain.trained_state_dict())
    ids = torch.randint(0, plain.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    # ids on the CPU: the large model takes them on its own device and hands its states back here
    on_gpu = mapped.large.device.type == "cuda"  # a GPU's kernels: other roundings
    torch.testing.assert_close(mapped(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits,
                               **(dict(rtol=1e-4, atol=1e-6) if on_gpu else dict(rtol=0, atol=0)))
    if on_gpu:
        return  # the rest is about the map on a machine whose only device is the CPU
    # on one device (here: the CPU) accelerate loads it there whole; over several it records the map,
    # and then place() moves everything but the large model
    assert not is_placed(mapped.large)
    mapped.large.hf_device_map = {"": "cpu"}
    assert is_placed(mapped.large) and mapped.place("meta") is mapped
    assert {p.device.type for p in mapped.large.parameters()} == {"cpu"}
    assert {p.device.type for n, p in mapped.named_parameters() if not n.startswith("large.")} == {"meta"}


def test_quantization_without_bitsandbytes_is_one_clear_error(train_args, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k))
    assert main(train_args("q", "--large-quantization", "8bit")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--large-quantization 8bit needs bitsandbytes" in err
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: object() if name == "bitsandbytes" else real(name, *a, **k))
    with pytest.raises(LLMModulesError, match="--large-quantization 4bit needs a CUDA GPU"):
        load_options(quantization="4bit", device="cpu")


def test_large_loading_options_are_refused_where_the_large_model_trains(tiny_pair_with_tokenizer, tmp_path):
    common = dict(large=tiny_pair_with_tokenizer["large"], data="x.jsonl", output=str(tmp_path / "o"))
    with pytest.raises(LLMModulesError, match="--large-dtype sets how the FROZEN large model loads"):
        TrainConfig.from_flags(method="lora", large_dtype="bfloat16", **common)
    with pytest.raises(LLMModulesError, match="--large-device-map must be one of none, auto"):
        TrainConfig.from_flags(small=tiny_pair_with_tokenizer["small"], large_device_map="balanced", **common)
    with pytest.raises(LLMModulesError, match="is randomly initialised from a config: device maps"):
        LLMModulesModel.compose(large="config:gpt-neo-125m", small="config:gpt-neo-125m",
                                large_placement=load_options(device_map="auto"))


def test_fsdp_on_cpu_is_one_clear_error(train_args, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP is tested by test_fsdp_on_the_gpus_matches_ddp")
    assert main(train_args("fsdp", "--fsdp")) == 2
    assert "--fsdp needs CUDA GPUs" in capsys.readouterr().err


def test_fsdp_with_lora_is_one_clear_error(train_args, capsys):
    """Seen on an H200 (torch 2.11): FSDP's full state dict of the LoRA-wrapped large model lost its
    frozen embeddings and the first checkpoint failed deep inside torch; refused up front instead."""
    assert main(train_args("fsdp", "--fsdp", "--method", "lora")) == 2
    assert "--fsdp with --method lora fails inside FSDP's state-dict gathering" in capsys.readouterr().err


def test_more_processes_than_gpus_is_one_clear_error(train_args, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(train_args("two_on_one", "--no-state-cache")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 processes on this machine but 1 CUDA GPU(s): launch one process per GPU " \
        "(--nproc_per_node 1), or hide the GPUs (CUDA_VISIBLE_DEVICES=)" in err


def test_a_second_training_in_one_process_may_change_mixed_precision(train_args, tmp_path):
    """accelerate keeps one state per process; a notebook's second run with another precision must not fail."""
    assert main(train_args("bf16", "--mixed-precision", "bf16")) == 0
    assert main(train_args("fp32", "--mixed-precision", "no")) == 0
    assert len(losses(tmp_path / "fp32")) == len(losses(tmp_path / "bf16")) == 3


# ----------------------------------------------------------------------------- sharded state building
@pytest.mark.multiprocess
@pytest.mark.parametrize("world,node_local", [(4, False), (2, True)])
def test_sharded_build_gives_the_states_of_a_single_process_build(tiny_models, tmp_path, world, node_local):
    """4 processes on one shared folder; 2 with node-local folders (rank 0 and rank 1 each see only
    their own, like two hosts), each of which builds its own copy. (The kill test and the training
    test build with 2 processes on a shared folder.)"""
    model = compose_tiny(tiny_models["qwen2"], tiny_models["llama"])
    examples = make_examples(model)
    key = state_cache_key(model, "data-a")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each spawned process runs: the same kernels, so the same bytes
    try:
        single = StateCache.open_or_build(tmp_path / "one", key, model, examples, batch_size=2, progress=False,
                                          shard_bytes=4000)
    finally:
        torch.set_num_threads(threads)
    roots = [str(tmp_path / "node0"), str(tmp_path / "node1")] if node_local else [str(tmp_path / "shared")]
    spawn(build_states, world, tiny_models["qwen2"], tiny_models["llama"], roots, examples, "data-a")
    for root in roots:
        assert sorted(p.name for p in Path(root).iterdir()) == [key]  # no build folder, probe or lock left
        shared = StateCache(Path(root) / key, json.loads((Path(root) / key / INDEX_FILE).read_text()), built=False)
        assert len({s.split("-")[1] for s in shared.index["shards"]}) == world // len(roots)  # every member wrote
        for field in ("n", "lengths", "hashes", "examples", "d_large", "computed"):
            assert shared.index[field] == single.index[field], field
        for i in range(len(examples)):
            a, b = shared[i], single[i]
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.view(torch.uint8).numpy().tobytes() == b.view(torch.uint8).numpy().tobytes(), i


@pytest.mark.multiprocess
def test_a_process_killed_mid_build_leaves_no_index_a_later_run_trusts(tiny_models, tmp_path):
    model = compose_tiny(tiny_models["qwen2"], tiny_models["llama"])
    examples = make_examples(model)
    key = state_cache_key(model, "data-a")
    root = tmp_path / "shared"
    with pytest.raises(Exception, match="SIGKILL|signal|exited"):
        spawn(build_states, 2, tiny_models["qwen2"], tiny_models["llama"], [str(root)], examples, "data-a", 1)
    assert not (root / key).exists()
    leftovers = list(root.glob(f"{key}.tmp-*"))
    assert leftovers and not any((p / INDEX_FILE).exists() for p in leftovers)  # partial, never trusted
    assert all(stale_build(p) for p in leftovers)  # its processes are gone
    cache = StateCache.open_or_build(root, key, model, examples, batch_size=2, progress=False)
    assert cache.built and cache.computed == len(examples) and not list(root.glob(f"{key}.tmp-*"))
    reference = StateCache.open_or_build(tmp_path / "ref", key, model, examples, batch_size=2, progress=False)
    assert all(torch.equal(cache[i], reference[i]) for i in range(len(examples)))


def test_build_folders_are_judged_by_pid_only_on_their_own_host(tmp_path):
    key = "a" * 64
    here_dead = tmp_path / build_name(key, host_name(), 999999999, "x1")
    elsewhere = tmp_path / build_name(key, "another-host.example", 999999999, "x2")
    alive_here = tmp_path / build_name(key, host_name(), os.getppid(), "x3")
    legacy = tmp_path / f"{key}.tmp-999999999"  # no host: a pid means nothing
    for folder in (here_dead, elsewhere, alive_here, legacy):
        folder.mkdir()
    assert stale_build(here_dead)
    assert not stale_build(elsewhere) and not stale_build(alive_here) and not stale_build(legacy)
    later = os.path.getmtime(elsewhere) + 3601  # nothing changed for over an hour: dead anywhere
    assert stale_build(elsewhere, now=later) and stale_build(legacy, now=later)


def test_finish_lock_excludes_and_breaks_a_dead_holders_lock(tmp_path):
    from llm_modules.states import fence as cache_fence

    with finish_lock(tmp_path, "k"):
        lock = json.loads((tmp_path / "k.lock").read_text())
        assert lock["host"] == host_name() and lock["pid"] == os.getpid()
        with pytest.raises(LLMModulesError, match="k.lock held by"):
            with finish_lock(tmp_path, "k", wait=0.2):
                pass
    assert not (tmp_path / "k.lock").exists()
    (tmp_path / "k.lock").write_text(json.dumps({"host": host_name(), "pid": 999999999, "time": 0, "nonce": "n"}))
    with finish_lock(tmp_path, "k", wait=5):  # its holder is gone: broken, then taken
        assert json.loads((tmp_path / "k.lock").read_text())["pid"] == os.getpid()
    (tmp_path / "k.lock").write_text(json.dumps({"host": "another-host", "pid": 1, "time": 0, "nonce": "m"}))
    with pytest.raises(LLMModulesError, match="held by"):  # another host's live lock is respected...
        with finish_lock(tmp_path, "k", wait=0.2):
            pass
    old = os.path.getmtime(tmp_path / "k.lock") - cache_fence.STALE_LOCK_SECONDS - 1
    os.utime(tmp_path / "k.lock", (old, old))
    with finish_lock(tmp_path, "k", wait=5):  # ...until it is older than any finishing step takes
        pass


# ----------------------------------------------------------------------------- training on several processes
@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_two_and_four_processes_train_like_one_with_one_validation_example(tiny_pair_with_tokenizer, tmp_path):
    from llm_modules.data.prepare import prepare_data
    from llm_modules.models.specs import resolve_tokenizer

    data = write_data(tmp_path / "data.jsonl", n=9)
    config = dict(large=tiny_pair_with_tokenizer["large"], small=tiny_pair_with_tokenizer["small"], data=data,
                  template="stratos", max_length=512, max_steps=2, eval_every=1, val_fraction=0.001, dropout=0.0,
                  num_samples=0, progress=False, release_large=False, state_cache_dir=str(tmp_path / "states"))
    prepared = prepare_data(TrainConfig.from_flags(**config, output="x").data, resolve_tokenizer(config["large"]), 1024)
    assert len(prepared.val) == 1  # fewer validation examples than processes: some validate nothing
    main_args = [f"--{k.replace('_', '-')}={v}" for k, v in config.items() if not isinstance(v, bool)]
    # on CPUs like the spawned processes (a GPU's float32 kernels sum in another order)
    one_process = run_cli(["train", *main_args, "--batch-size=4", f"--output={tmp_path / 'one'}", "--no-progress",
                           "--no-release-large"], cpu=True)
    assert one_process.wait(timeout=300) == 0, one_process.stdout.read()
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for world in (2, 4):
        # each its own cache: reusing the one-process run's would skip the sharded build
        spawn(train_run, world, {**config, "batch_size": 4 // world, "output": str(tmp_path / f"p{world}"),
                                 "state_cache_dir": str(tmp_path / f"states{world}")}, use_accelerate=True)
        rows = [json.loads(line) for line in (tmp_path / f"p{world}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2] and all("val_loss" in r for r in rows)
        for field in ("loss", "val_loss"):
            torch.testing.assert_close(torch.tensor([r[field] for r in rows if field in r]),
                                       torch.tensor([r[field] for r in one if field in r]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="accelerate runs FSDP on CUDA GPUs only (not on CPU with gloo): needs a GPU")
@pytest.mark.subprocess
@pytest.mark.multiprocess
@pytest.mark.parametrize("frozen", [(), ("--no-train-small",)], ids=["small_trained", "small_frozen"])
def test_fsdp_on_the_gpus_matches_ddp(train_args, tmp_path, frozen):
    """One process per GPU, two at most: on one GPU this still checks FSDP's wrapping and its
    checkpoint gathered to one file and scattered back on resume; with the small model frozen
    (--no-train-small) too, where FSDP wraps decoder layers that hold no trained tensor."""
    import sys

    gpus = str(min(2, torch.cuda.device_count()))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", gpus, "--master_port", "29541"]
    ddp = run_cli(train_args("ddp", "--mixed-precision", "no", "--dropout", "0", *frozen), launcher)
    assert ddp.wait(timeout=600) == 0, ddp.stdout.read()
    fsdp = run_cli(train_args("fsdp", "--fsdp", "--mixed-precision", "no", "--dropout", "0", "--save-every", "1",
                              *frozen), launcher)
    assert fsdp.wait(timeout=600) == 0, fsdp.stdout.read()
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "fsdp")), torch.tensor(losses(tmp_path / "ddp")),
                               rtol=1e-4, atol=1e-4)
    a, b = (load_file(str(tmp_path / run / "last" / WEIGHTS_FILE)) for run in ("ddp", "fsdp"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    resumed = run_cli(train_args("fsdp", "--fsdp", "--mixed-precision", "no", "--dropout", "0", "--save-every", "1",
                                 "--resume", *frozen), launcher)  # the gathered checkpoint scattered back over FSDP
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and "at step 2" in output, output
    c = load_file(str(tmp_path / "fsdp" / "last" / WEIGHTS_FILE))
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 training on a CUDA GPU: needs one")
def test_bf16_training_on_a_gpu(train_args, tmp_path):
    assert main(train_args("gpu", "--large-dtype", "bfloat16", "--mixed-precision", "bf16")) == 0
    assert all(v > 0 for v in losses(tmp_path / "gpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes quantization: needs a CUDA GPU and bitsandbytes")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_large_model_trains_on_a_gpu(train_args, tmp_path, bits):
    assert main(train_args(bits, "--large-quantization", bits)) == 0
    values = losses(tmp_path / bits)
    assert len(values) == 3 and all(0 < v < 100 for v in values), values
    config = json.loads((tmp_path / bits / "last" / "llm_modules_config.json").read_text())
    assert config["large_identity"]["quantization"] == bits
    assert not any(k.startswith("large.") for k in load_file(str(tmp_path / bits / "last" / WEIGHTS_FILE)))
    # quantized weights compute other states: the unquantized run builds its own cache beside this one's
    before = set((tmp_path / "states").iterdir())
    assert main(train_args("plain", "--large-dtype", "float32")) == 0
    assert len(set((tmp_path / "states").iterdir()) - before) >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--large-device-map auto: needs a CUDA GPU")
def test_large_device_map_auto_on_a_gpu_trains_like_the_whole_model_on_it(train_args, tmp_path):
    assert main(train_args("whole", "--dropout", "0", "--mixed-precision", "no")) == 0
    assert main(train_args("mapped", "--dropout", "0", "--mixed-precision", "no", "--large-device-map", "auto",
                           "--state-cache-dir", str(tmp_path / "states_mapped"))) == 0
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "mapped")), torch.tensor(losses(tmp_path / "whole")),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- --device and --dtype
def test_device_and_dtype_on_generate_eval_and_chat(tiny_pair_with_tokenizer, tmp_path, capsys, monkeypatch):
    from llm_modules.devices import pick_device, pick_dtype
    from llm_modules.models.loading import load_model

    torch.manual_seed(0)
    LLMModulesModel.compose(large=tiny_pair_with_tokenizer["large"], small=tiny_pair_with_tokenizer["small"]) \
        .save_pretrained(tmp_path / "m")
    expected = "cuda" if torch.cuda.is_available() else "mps" if pick_device().type == "mps" else "cpu"
    assert pick_device().type == expected and pick_device("auto").type == expected
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    model = load_model(str(tmp_path / "m"), device=torch.device("cpu"), dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "What is 2 plus 2?", "--max-new-tokens",
                 "3", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    data = write_data(tmp_path / "d.jsonl", n=4)
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", data, "--split", "all", "--no-generate",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] > 0
    monkeypatch.setattr("builtins.input", lambda prompt: "")
    assert main(["chat", "--model", str(tmp_path / "m"), "--device", "cpu"]) == 0
    if not torch.cuda.is_available():
        assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--device", "cuda:1"]) == 2
        assert "--device cuda:1: this machine has 0 CUDA GPUs" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", data, "--device", "tpu"]) == 2
    assert "--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'" in capsys.readouterr().err
