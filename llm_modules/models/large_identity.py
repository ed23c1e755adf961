"""Which large model a composed model was trained on: a digest of its weights, checked on load.

The bridge and head are trained on one large model's states. A saved composed model keeps only
the large model's spec, which may later resolve to other weights (a hub id's new revision, a
`config:` spec's fresh random init, an overwritten folder). So `save_pretrained` also records a
digest of the large weights, and `from_pretrained` refuses a large model whose digest differs
unless told `allow_large_mismatch=True` (`--allow-large-mismatch`).

The digest (format 2) hashes every parameter's name, shape and dtype and every one of its values,
in blocks hashed on several threads, so that no whole tensor is copied. It is recorded in the training precision and,
from float32, in each half precision too, so a model trained on a float32 large model still checks
when the large model is later loaded in bfloat16 or float16. Weights quantized while loading
(8-/4-bit) are other numbers: across a change of quantization nothing is compared, with a warning.

Hashing every value costs seconds for a real model (measured in the README), so digests are kept:
on disk per model file (under ``<LLM_MODULES_CACHE>/digests``, keyed by the weight files' paths,
sizes and modification times, the parameters' names, shapes and dtypes, the quantization and the
transformers version), read only right after loading (composing or loading a saved model), and
in memory per module for as long as no parameter was replaced or changed in place (its tensor
version counter; an edit through `.data` bypasses it and is not seen until the next load). Folders saved before format 2 recorded a digest of strided samples (4,096
values per parameter, no ``digest_format`` in the record); they are checked with that digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from llm_modules.errors import LLMModulesError
from llm_modules.models.large import quantization_of

logger = logging.getLogger(__name__)

DIGEST_FORMAT = 2  # 2: every value of every parameter; 1 (a record without "digest_format"): strided samples
SAMPLES = 4096  # values hashed per parameter by format 1
BLOCK = 1 << 22  # values hashed at a time (16 MiB of float32); part of format 2
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {torch.float32: "float32", **{v: k for k, v in HALF.items()}}
_DTYPES = {"float32": torch.float32, **HALF}
NATIVE = "native"  # each parameter in its own dtype
_MEMO: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, str]]]" = weakref.WeakKeyDictionary()


_buffers = threading.local()  # per thread, one BLOCK-sized buffer per dtype: casts into it skip allocation


def _cast(piece: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == piece.dtype:
        return piece
    buffers = _buffers.__dict__.setdefault("by_dtype", {})
    if dtype not in buffers:
        buffers[dtype] = torch.empty(BLOCK, dtype=dtype)
    return buffers[dtype][: piece.numel()].copy_(piece)


def _block_digests(flat: torch.Tensor, start: int, casts: dict[str, torch.dtype]) -> dict[str, bytes]:
    """sha256 of values start..start + BLOCK of `flat`, cast to each of `casts`."""
    piece = flat[start : start + BLOCK].cpu()  # (<= BLOCK,)
    return {d: hashlib.sha256(_cast(piece, dtype).view(torch.uint8).numpy()).digest() for d, dtype in casts.items()}


def weights_digests(module: nn.Module, dtypes: Sequence[str]) -> dict[str, str]:
    """{dtype name: digest of every parameter's name, shape and dtype and all its values}, the values
    cast to that dtype (`NATIVE`: each parameter as it is): the digests the same weights would have in
    each precision. A parameter's values are hashed in blocks of BLOCK values, on several threads
    (hashlib and torch's casts release the GIL), and its blocks' sha256s go into the digest in order."""
    hashers = {name: hashlib.sha256() for name in dtypes}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for name, p in module.named_parameters():
            flat = p.detach().reshape(-1)  # a view of a contiguous parameter
            casts = {d: p.dtype if d == NATIVE else _DTYPES[d] for d in dtypes}
            for d, h in hashers.items():
                h.update(f"{name}|{tuple(p.shape)}|{casts[d]}|".encode())
            for blocks in pool.map(lambda start: _block_digests(flat, start, casts), range(0, flat.numel(), BLOCK)):
                for d, h in hashers.items():
                    h.update(blocks[d])
    return {d: h.hexdigest() for d, h in hashers.items()}


def weights_digest(module: nn.Module, as_dtype: torch.dtype | None = None) -> str:
    """sha256 of every parameter's name, shape, dtype and values (cast to `as_dtype` when given: the
    digest the same weights would have in that precision). Not cached: see `loaded_weights_digest`."""
    name = NATIVE if as_dtype is None else _NAMES[as_dtype]
    return weights_digests(module, [name])[name]


def _sample(p: torch.Tensor, n: int = SAMPLES) -> torch.Tensor:
    """About n evenly strided values of p as a new small tensor (format 1)."""
    t = p.detach()
    if t.dim() == 0:
        return t.reshape(1).clone()
    if not t.is_contiguous():  # no flat view without a copy: take a few evenly spaced rows first
        rows = torch.linspace(0, t.shape[0] - 1, min(t.shape[0], 64)).long().to(t.device)
        t = t.index_select(0, rows)  # (<=64, ...)
    flat = t.view(-1)
    step = max(1, flat.numel() // n)
    return flat[::step][:n].contiguous()  # (<= n,)


def sampled_digest(module: nn.Module, as_dtype: torch.dtype | None = None) -> str:
    """Format 1, for folders saved before every value was hashed: sha256 of every parameter's name,
    shape, dtype and a strided sample of its values."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        dtype = as_dtype or p.dtype
        h.update(f"{name}|{tuple(p.shape)}|{dtype}|".encode())
        values = _sample(p).to("cpu", dtype)
        h.update(values.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _weights_state(module: nn.Module) -> tuple:
    """What tells whether a module's weights may have changed: each parameter's storage, place and
    version counter (bumped by every in-place change)."""
    return tuple((p.data_ptr(), p._version, p.dtype, str(p.device), tuple(p.shape)) for p in module.parameters())


def _file_key(module: nn.Module) -> str | None:
    """The key of `module`'s digests on disk: its weight files (path, size, mtime), its parameters'
    names, shapes and dtypes, its quantization and the transformers version; None when it was not
    loaded from a folder of weight files (a random init)."""
    import transformers

    where = getattr(getattr(module, "config", None), "_name_or_path", "") or ""
    folder = Path(where) if where else None
    if folder is None or not folder.is_dir():
        return None
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth") and f.is_file())
    if not files:
        return None
    payload = {"files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
               "parameters": [(n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()],
               "quantization": quantization_of(module), "transformers": transformers.__version__,
               "format": DIGEST_FORMAT}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _digest_file(key: str) -> Path:
    from llm_modules.models.specs import cache_dir

    return cache_dir() / "digests" / f"{key}.json"


def _read_saved(key: str) -> dict[str, str]:
    try:
        saved = json.loads(_digest_file(key).read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _write_saved(key: str, digests: dict[str, str]) -> None:
    path = _digest_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_read_saved(key), **digests}))
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache costs time, not correctness
        logger.info("could not keep the large weights' digests in %s: %s", path, err)


def cached_digests(module: nn.Module, dtypes: Sequence[str], just_loaded: bool = False) -> dict[str, str]:
    """`weights_digests(module, dtypes)`, from memory while no parameter changed since they were
    computed, else (`just_loaded`: the module holds its weight files' values, nothing changed them
    yet) from the digests kept for those files, else computed (and kept)."""
    state = _weights_state(module)
    memo = _MEMO.get(module)
    known = dict(memo[1]) if memo is not None and memo[0] == state else {}
    key = _file_key(module) if just_loaded and any(d not in known for d in dtypes) else None
    if key is not None:
        known.update({d: v for d, v in _read_saved(key).items() if d in dtypes and d not in known})
    missing = [d for d in dtypes if d not in known]
    if missing:
        computed = weights_digests(module, missing)
        known.update(computed)
        if key is not None:
            _write_saved(key, computed)
    _MEMO[module] = (state, known)
    return {d: known[d] for d in dtypes}


def loaded_weights_digest(module: nn.Module) -> str:
    """`weights_digest(module)`, from memory while no parameter changed since it was last computed."""
    return cached_digests(module, [NATIVE])[NATIVE]


def _dtype_of(large: nn.Module) -> torch.dtype:
    return next(large.parameters()).dtype


def record(large: nn.Module) -> dict[str, Any]:
    """What a saved model keeps of its large model, right after loading it: digests per precision
    (format 2) and the hub revision."""
    dtype = _dtype_of(large)
    name = _NAMES.get(dtype, str(dtype))
    wanted = [NATIVE, *HALF] if dtype == torch.float32 else [NATIVE]
    found = cached_digests(large, wanted, just_loaded=True)
    digests = {name: found[NATIVE], **{half: found[half] for half in wanted[1:]}}
    revision = getattr(getattr(large, "config", None), "_commit_hash", None)
    quantization = quantization_of(large)
    return {"dtype": name, "digests": digests, "digest_format": DIGEST_FORMAT,
            **({"revision": revision} if revision else {}),
            **({"quantization": quantization} if quantization != "none" else {})}


def check(saved: dict[str, Any], large: nn.Module, spec: str, where: str, allow_mismatch: bool = False,
          trained_on: str | None = None) -> None:
    """Raise when `large` is not the model `saved` describes (a warning when `allow_mismatch`). `spec`: the large
    model as the user named it (a drafter's target: `--model`); `trained_on`: the spec `where` records, named
    too when it differs."""
    if not saved:
        logger.warning("%s was saved without a digest of its large model (older llm-modules): cannot check that "
                       "%s is the model it was trained on", where, spec)
        return
    then, now_quantized = saved.get("quantization", "none"), quantization_of(large)
    if then != now_quantized:  # quantized weights are other numbers: no digest can compare them
        logger.warning("%s was trained on %s large weights and %s is loaded %s: its weights cannot be checked "
                       "against the digest", where, then if then != "none" else "unquantized", spec,
                       now_quantized if now_quantized != "none" else "unquantized")
        return
    loaded = _NAMES.get(_dtype_of(large), str(_dtype_of(large)))
    # the digest of the weights as loaded, else (loaded in more precision than it was trained in) at
    # the training precision
    expected = saved["digests"][loaded if loaded in saved["digests"] else saved["dtype"]]
    as_dtype = None if loaded in saved["digests"] else saved["dtype"]
    if saved.get("digest_format", 1) == 1:  # saved before every value was hashed
        now = sampled_digest(large, None if as_dtype is None else _DTYPES[as_dtype])
    else:
        now = cached_digests(large, [as_dtype or NATIVE], just_loaded=True)[as_dtype or NATIVE]
    if now == expected:
        return
    revisions = ""
    current_revision = getattr(getattr(large, "config", None), "_commit_hash", None)
    if saved.get("revision") or current_revision:
        revisions = f" (hub revision {current_revision or 'unknown'} now, {saved.get('revision') or 'unknown'} then)"
    recorded = f" (it was trained on {trained_on!r})" if trained_on and trained_on != spec else ""
    message = (f"the large model {spec!r} given for {where} is not the one it was trained on{recorded}: weights "
               f"digest {now} now, {expected} when saved{revisions}")
    if not allow_mismatch:
        raise LLMModulesError(message + "; pass --allow-large-mismatch (allow_large_mismatch=True) to use it anyway")
    logger.warning("%s; used anyway (allow_large_mismatch)", message)
