"""Our float32 product for a few rows (a verify pass's 2 to 16 tokens) on an AVX2 CPU: `kernels/small_m.c`, built on
first use with the system's C compiler and loaded with ctypes.

Measured on an AMD EPYC (2 threads): a (M, 1536) x (1536, 8960) product at M = 2, 3, 4, 5, 8 took 2.12, 2.30,
2.50, 2.70, 3.39 ms against oneDNN's 3.03, 3.20, 3.57, 3.59, 4.84 (one row, oneDNN's: 1.98-2.04;
reports/speculative/pass_cost_onednn/verify_matmul.md), and the 151,936-row output embedding 33-80 ms against
45-93 at 2 to 16 rows. Where it cannot be built (no
compiler, no AVX2 and FMA, not x86-64) `kernel()` is None and callers keep oneDNN's; the library built is kept
under the cache folder, named by the source's and the compiler's digest.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "small_m.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
NEEDS = frozenset({"avx2", "fma"})  # x86 flags the kernel's instructions need
MIN_ROWS, MAX_ROWS = 2, 16  # where it beat oneDNN's (one row: oneDNN's matrix-vector path is as fast)


def compiler() -> str | None:
    """$CC, else cc or gcc on the PATH; None without one."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def build(folder: Path, cc: str) -> Path:
    """Compile SOURCE into `folder` (kept: named by the source's, the flags' and the compiler's digest) -> the
    library. Raises OSError / CalledProcessError when it cannot."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = folder / f"small_m-{digest}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, check=True)
        os.replace(built, target)  # atomic: another process building the same one wins or loses whole
    return target


@functools.cache
def kernel() -> Any:
    """The loaded product function, or None where this machine cannot build or run it (logged once)."""
    from llm_modules.devices import cpu_flags
    from llm_modules.models.specs import cache_dir

    if platform.machine() not in ("x86_64", "AMD64") or not NEEDS <= cpu_flags():
        return None
    cc = compiler()
    if cc is None:
        logger.info("no C compiler (cc, gcc or $CC): verify passes use oneDNN's kernels")
        return None
    try:
        path = build(cache_dir() / "kernels", cc)
        fn = ctypes.CDLL(str(path)).small_m_linear
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        logger.warning("could not build the small-M kernel (%s): verify passes use oneDNN's kernels", detail.strip())
        return None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    fn.restype = None
    return fn


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) float32 contiguous, weight (N, K) contiguous, bias (N,) or None -> (M, N), with `kernel()` (which
    must be there) on torch's thread count."""
    fn = kernel()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    fn(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), m, k, n,
       torch.get_num_threads())
    return y
