"""Looking after the state cache: list its folders, prune them, keep it under a size cap.

The cap is ``$LLM_MODULES_CACHE_MAX_GB`` gigabytes (GiB), else 50. After a training run has its
states, the least recently used folders go first until the cache fits; the folders the run uses
are never removed, even when they alone exceed the cap, nor are folders another run is reading (a
live lease, see `states.leases`). ``llm-modules cache ls|prune`` does the same by hand.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from llm_modules.errors import LLMModulesError
from llm_modules.states.leases import live_leases, remove_unless_in_use
from llm_modules.states.store import INDEX_FILE, prune

DEFAULT_MAX_GB = 50.0
MAX_GB_ENV = "LLM_MODULES_CACHE_MAX_GB"


@dataclass
class CacheEntry:
    """One complete cache folder."""

    key: str
    path: Path
    size_bytes: int
    examples: int
    dtype: str
    last_used: float  # seconds since the epoch: the mtime of its index
    library_version: str
    readers: int = 0  # processes reading it now (live leases): pruning leaves it


def default_root() -> Path:
    from llm_modules.models.specs import cache_dir

    return cache_dir() / "states"


def max_cache_bytes() -> int:
    value = os.environ.get(MAX_GB_ENV, "")
    try:
        gb = float(value) if value else DEFAULT_MAX_GB
    except ValueError:
        raise LLMModulesError(f"{MAX_GB_ENV}={value!r} is not a number of gigabytes") from None
    if gb < 0:
        raise LLMModulesError(f"{MAX_GB_ENV} must be >= 0, got {value!r}")
    return int(gb * 2**30)


def list_caches(root: str | Path) -> list[CacheEntry]:
    """Complete cache folders under `root`, least recently used first."""
    root, entries = Path(root), []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
            if index.get("key") != folder.name:
                continue
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            entries.append(CacheEntry(folder.name, folder, size, index["n"], index["dtype"],
                                      (folder / INDEX_FILE).stat().st_mtime, index.get("library_version", "?"),
                                      len(live_leases(folder))))
        except (OSError, ValueError, KeyError, TypeError):  # not a complete cache folder
            continue
    return sorted(entries, key=lambda e: (e.last_used, e.key))


def enforce_size_cap(root: str | Path, max_bytes: int | None = None, keep: set[str] = frozenset()) -> list[Path]:
    """Remove dead builds, then the least recently used folders not in `keep` and not in use by a
    run (leased) until the rest fit in `max_bytes` (default: `max_cache_bytes()`). Returns the
    removed cache folders."""
    limit = max_cache_bytes() if max_bytes is None else max_bytes
    every = list_caches(root)
    prune(root, keep={e.key for e in every})  # only dead build folders go here
    total, removed = sum(e.size_bytes for e in every), []
    for entry in every:
        if total <= limit:
            break
        if entry.key in keep or not remove_unless_in_use(Path(root), entry.key):
            continue
        total -= entry.size_bytes
        removed.append(entry.path)
    return removed


def format_listing(entries: list[CacheEntry]) -> list[str]:
    lines = [f"{'key':<18}{'size':>12}{'examples':>10}  {'dtype':<9} {'last used':<17} {'llm-modules':<12} readers"]
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        lines.append(f"{e.key[:16]:<18}{e.size_bytes / 2**20:>8.2f} MiB{e.examples:>10}  {e.dtype:<9} {used:<17} "
                     f"{e.library_version:<12} {e.readers}")
    total = sum(e.size_bytes for e in entries)
    lines.append(f"total {len(entries)} caches, {total / 2**20:.2f} MiB (cap {max_cache_bytes() / 2**30:g} GiB, "
                 f"{MAX_GB_ENV})")
    return lines
