"""Which large model a composed model was trained on: a digest of its weights, checked on load.

The bridge and head are trained on one large model's states. A saved composed model keeps only
the large model's spec, which may later resolve to other weights (a hub id's new revision, a
`config:` spec's fresh random init, an overwritten folder). So `save_pretrained` also records a
digest of the large weights, and `from_pretrained` refuses a large model whose digest differs
unless told `allow_large_mismatch=True` (`--allow-large-mismatch`).

The digest hashes every parameter's name, shape and dtype and a strided sample of its values:
it never copies a whole tensor (an embedding matrix may be 1 GB). It is recorded in the training
precision and, from float32, in each half precision too, so a model trained on a float32 large
model still checks when the large model is later loaded in bfloat16 or float16. Weights quantized
while loading (8-/4-bit) are other numbers: across a change of quantization nothing is compared,
with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from llm_modules.errors import LLMModulesError
from llm_modules.models.large import quantization_of
from llm_modules.tensors import DTYPES

logger = logging.getLogger(__name__)

SAMPLES = 4096  # values hashed per parameter
HALF = {name: dtype for name, dtype in DTYPES.items() if name != "float32"}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _sample(p: torch.Tensor, n: int = SAMPLES) -> torch.Tensor:
    """About n evenly strided values of p as a new small tensor; p itself is never copied."""
    t = p.detach()
    if t.dim() == 0:
        return t.reshape(1).clone()
    if not t.is_contiguous():  # no flat view without a copy: take a few evenly spaced rows first
        rows = torch.linspace(0, t.shape[0] - 1, min(t.shape[0], 64)).long().to(t.device)
        t = t.index_select(0, rows)  # (<=64, ...)
    flat = t.view(-1)
    step = max(1, flat.numel() // n)
    return flat[::step][:n].contiguous()  # (<= n,)


def weights_digest(module: nn.Module, as_dtype: torch.dtype | None = None) -> str:
    """sha256 of every parameter's name, shape, dtype and strided sample (values cast to `as_dtype`
    when given: the digest the same weights would have in that precision)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        dtype = as_dtype or p.dtype
        h.update(f"{name}|{tuple(p.shape)}|{dtype}|".encode())
        values = _sample(p).to("cpu", dtype)
        h.update(values.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _dtype_of(large: nn.Module) -> torch.dtype:
    return next(large.parameters()).dtype


def record(large: nn.Module) -> dict[str, Any]:
    """What a saved model keeps of its large model: digests per precision and the hub revision."""
    dtype = _dtype_of(large)
    name = _NAMES.get(dtype, str(dtype))
    digests = {name: weights_digest(large)}
    if dtype == torch.float32:
        digests.update({half: weights_digest(large, as_dtype) for half, as_dtype in HALF.items()})
    revision = getattr(getattr(large, "config", None), "_commit_hash", None)
    quantization = quantization_of(large)
    return {"dtype": name, "digests": digests, **({"revision": revision} if revision else {}),
            **({"quantization": quantization} if quantization != "none" else {})}


def check(saved: dict[str, Any], large: nn.Module, spec: str, where: str, allow_mismatch: bool = False) -> None:
    """Raise when `large` is not the model `saved` describes (a warning when `allow_mismatch`)."""
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
    if loaded in saved["digests"]:
        expected, now = saved["digests"][loaded], weights_digest(large)
    else:  # loaded in more precision than it was trained in: compare at the training precision
        expected = saved["digests"][saved["dtype"]]
        now = weights_digest(large, DTYPES[saved["dtype"]])
    if now == expected:
        return
    revisions = ""
    current_revision = getattr(getattr(large, "config", None), "_commit_hash", None)
    if saved.get("revision") or current_revision:
        revisions = f" (hub revision {current_revision or 'unknown'} now, {saved.get('revision') or 'unknown'} then)"
    message = (f"the large model {spec!r} of {where} is not the one it was trained on: weights digest {now} now, "
               f"{expected} when saved{revisions}")
    if not allow_mismatch:
        raise LLMModulesError(message + "; pass --allow-large-mismatch (allow_large_mismatch=True) to use it anyway")
    logger.warning("%s; used anyway (allow_large_mismatch)", message)
