"""Marking a state cache as in use while a run reads it, so that pruning never removes it under the reader.

A reader holds a lease on each cache folder it reads: a file ``<folder>/leases/<host>-<pid>-<nonce>``
(its host, process and start time inside). It is taken under the key's lock (`fence.finish_lock`)
once the folder is checked complete, and removed when the reader lets go (`Lease.release`, the
`StateCache` collected, or the process ending). Pruning and the size cap take the same lock and
remove a folder only when it holds no live lease (:func:`remove_unless_in_use`), so a folder cannot
go between a reader's check and its lease. A lease is stale when, on this host, its process is
gone (a killed run), or, from another host (a shared folder), when nothing touched it for
STALE_LEASE_SECONDS: readers touch theirs as they read, at most once a minute. Stale leases are
deleted when found.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
import weakref
from pathlib import Path

from llm_modules.states.fence import build_name, finish_lock, host_name, pid_alive

LEASES = "leases"  # the folder of a cache's leases
# A lease of another host untouched this long is stale: its reader touches it as it reads, and we
# cannot ask another host whether a process lives.
STALE_LEASE_SECONDS = 24 * 3600
TOUCH_SECONDS = 60  # a reader refreshes its lease's mtime at most this often


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


class Lease:
    """This process's mark on one cache folder; released explicitly, when collected, or at exit."""

    def __init__(self, path: Path):
        self.path = path
        self._touched = time.monotonic()
        self._release = weakref.finalize(self, _remove, path)  # also runs at interpreter exit

    def touch(self) -> None:
        """Refresh the lease (cheap: a file's mtime, at most once per TOUCH_SECONDS)."""
        now = time.monotonic()
        if now - self._touched >= TOUCH_SECONDS:
            self._touched = now
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._release()


def take_lease(folder: Path) -> Lease:
    """A lease on `folder`. Call it holding the key's `finish_lock`, after checking the folder is complete."""
    leases = folder / LEASES
    leases.mkdir(exist_ok=True)
    path = leases / f"{host_name()}-{os.getpid()}-{secrets.token_hex(4)}"
    path.write_text(json.dumps({"host": host_name(), "pid": os.getpid(), "time": time.time()}))
    return Lease(path)


def holder_gone(host: str, pid: int, path: Path, now: float) -> bool:
    """Whether the lease (or lock, `training.run_lock`) file `path` of process `pid` on `host` stands for
    no live process: on this host when that process is gone; from another host when nothing touched
    the file for STALE_LEASE_SECONDS (a holder touches it every TOUCH_SECONDS)."""
    if host == host_name():
        return not pid_alive(pid)
    try:
        return now - path.stat().st_mtime > STALE_LEASE_SECONDS
    except FileNotFoundError:
        return True


def _live(path: Path, now: float) -> bool:
    """Whether the lease file `path` still stands for a reader."""
    parts = path.name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True  # not ours to judge: keep the folder
    return not holder_gone(parts[0], int(parts[1]), path, now)


def live_leases(folder: Path) -> list[Path]:
    """The leases on `folder` whose readers may still read it; stale ones are deleted."""
    live, now = [], time.time()
    try:
        entries = sorted((folder / LEASES).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    for path in entries:
        if _live(path, now):
            live.append(path)
        else:
            path.unlink(missing_ok=True)
    return live


def in_use(folder: Path) -> bool:
    return bool(live_leases(folder))


def remove_unless_in_use(root: Path, key: str) -> bool:
    """Remove the cache folder `root/<key>` unless a live lease holds it; returns whether it went.

    Under the key's lock, the folder is checked and renamed aside (a build-folder name that no reader
    opens), then deleted outside the lock.
    """
    folder = Path(root) / key
    with finish_lock(Path(root), key):
        if not folder.exists() or in_use(folder):
            return False
        aside = Path(root) / build_name(key, host_name(), os.getpid(), "removed" + secrets.token_hex(4))
        os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)
    return True
