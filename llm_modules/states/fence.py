"""Building one state cache with many processes, on one host or many, on a node-local or shared folder.

Processes that see the same cache folder build it together, each its share; processes on hosts
with their own (node-local) folder build their host's copy the same way. Who sees what is found
out, not assumed (:func:`sharing_groups`). Every build writes under a name no other build uses
(``<key>.tmp-<host>-<pid>-<nonce>``), and only the step that puts a finished build in place is
fenced, by a lock file created with ``O_EXCL`` that names its host, process and time
(:func:`finish_lock`). A build folder is judged dead by its process id only on its own host;
elsewhere by how long nothing in it changed (:func:`stale_build`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from llm_modules.errors import LLMModulesError

# A build folder in which nothing changed for this long is dead: its members touch it after every
# batch, and no batch of a large model takes an hour.
STALE_BUILD_SECONDS = 3600
# The lock is held only to swap a finished folder into place (a few renames).
STALE_LOCK_SECONDS = 120
LOCK_WAIT_SECONDS = 600


def host_name() -> str:
    """This host, as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


class Group:
    """The processes of this run: torch.distributed's group when it is initialised, else this one alone."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (on every process)."""
        if self.dist is None:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()


def sharing_groups(root: Path, group: Group, nonce: str) -> list[list[int]]:
    """For each rank, the ranks that see the same `root` folder as it does (itself included).

    Each process drops a file named by its rank into `root/.probe-<nonce>/`, and after a barrier
    lists what it sees: on a shared folder every rank, on node-local folders the ranks of its host.
    """
    if group.world == 1:
        return [[0]]
    probe = root / f".probe-{nonce}"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / str(group.rank)).touch()
    group.barrier()
    seen = sorted(int(p.name) for p in probe.iterdir() if p.name.isdigit())
    groups = group.gather(seen)
    group.barrier()  # everyone has looked: the lowest rank of each folder removes it
    if group.rank == min(seen):
        shutil.rmtree(probe, ignore_errors=True)
    return groups


def build_name(key: str, host: str, pid: int, nonce: str) -> str:
    return f"{key}.tmp-{host}-{pid}-{nonce}"


def last_change(folder: Path) -> float:
    """The newest modification time of `folder` and the files directly in it."""
    times = [folder.stat().st_mtime]
    for entry in folder.iterdir():
        try:
            times.append(entry.stat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # exists but is someone else's
        return True
    return True


def stale_build(path: Path, now: float | None = None) -> bool:
    """Whether the build folder `<key>.tmp-...` is dead.

    Named `<host>-<pid>-<nonce>`: on this host, dead when its process is gone or is this very
    process (a leftover of an earlier try); anywhere, dead when nothing in it changed for
    STALE_BUILD_SECONDS. Older names (`<pid>` alone, no host) are judged by that age only, since
    a process id means nothing on another host.
    """
    tail = path.name.rpartition(".tmp-")[2]
    try:
        age = (now or time.time()) - last_change(path)
    except FileNotFoundError:
        return False  # gone already
    if age > STALE_BUILD_SECONDS:
        return True
    parts = tail.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    host, pid = parts[0], int(parts[1])
    return host == host_name() and (pid == os.getpid() or not pid_alive(pid))


def read_lock(path: Path) -> dict[str, Any] | None:
    """What the lock file `path` says of its holder; None when it is gone, half written or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stale_lock(path: Path, holder: dict[str, Any] | None) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_LOCK_SECONDS:
        return True
    if holder is None:  # being written this instant, or its writer died between create and write
        return False
    return holder.get("host") == host_name() and not pid_alive(int(holder.get("pid", -1)))


def break_lock(path: Path, holder: dict[str, Any] | None) -> None:
    """Take away a dead lock: rename it aside (one taker wins), and give it back if it was not the
    one judged dead (its holder replaced it in the meantime)."""
    aside = path.with_name(f"{path.name}.dead-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if holder is not None and read_lock(aside) != holder:
        try:
            os.link(aside, path)  # fails when a new lock is in place already
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


@contextmanager
def finish_lock(root: Path, key: str, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Hold `root/<key>.lock` (created with O_EXCL, holding host, pid, time and a nonce) while a
    finished build is put in place; a dead holder's lock is broken (see `_stale_lock`)."""
    path = root / f"{key}.lock"
    mine = {"host": host_name(), "pid": os.getpid(), "time": time.time(), "nonce": secrets.token_hex(8)}
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if _stale_lock(path, holder):
                break_lock(path, holder)
                continue
            if time.monotonic() > deadline:
                raise LLMModulesError(f"state cache lock {path} held by {holder} for over {wait:.0f} s; if that "
                                      "process is gone, delete the lock file") from None
            time.sleep(0.05)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine))
            f.flush()
            os.fsync(f.fileno())
        break
    try:
        yield
    finally:
        if read_lock(path) == mine:  # never remove a lock someone else took after breaking ours
            path.unlink(missing_ok=True)
