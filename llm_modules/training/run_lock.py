"""One run at a time in a training output folder: a lock file naming the run's host and process.

Checkpoint recovery (`checkpoint.recover_checkpoints`) finishes the swaps that a killed run left,
which is safe only when no run writes into the folder, and two runs appending to one `metrics.jsonl`
interleave their steps. So the main process of a run (rank 0; the other processes write only their
own random states, under its barriers) holds `<output>/run.lock` from before it checks or writes the
folder until it ends (`take_run_lock`): created with O_EXCL, holding host, pid, the process's start
time, time and a nonce. A lock whose holder is gone is taken over, judged as the state cache judges
its leases (`states.leases.holder_gone`): on this host when its process is dead, or its pid now names
a later process (the start time differs); from another host (a shared folder) when nothing touched it
for a day (its holder touches it every minute). A live holder refuses the run with one line.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from llm_modules.errors import LLMModulesError
from llm_modules.states.fence import (
    STALE_LOCK_SECONDS,
    break_lock,
    host_name,
    read_lock,
)
from llm_modules.states.leases import TOUCH_SECONDS, holder_gone

LOCK_FILE = "run.lock"
_TRIES = 10  # stale locks broken in a row before giving up (each break lets one taker in)


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces and ")"
    try:
        return int(fields[19])  # field 22 of the line; fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _holder(holder: dict[str, Any] | None) -> tuple[str, int, int | None] | None:
    """(host, pid, start time) from a lock's contents; None when they are not a lock's."""
    try:
        host, pid, started = str(holder["host"]), int(holder["pid"]), holder.get("started")  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    return (host, pid, started if isinstance(started, int) else None) if pid > 0 else None


def lock_gone(path: Path, holder: dict[str, Any] | None) -> bool:
    """Whether the lock file `path`, holding `holder` (`fence.read_lock`), stands for no live run."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # let go meanwhile: try again
    who = _holder(holder)
    if who is None:  # being written this instant, or its writer died between create and write
        return age > STALE_LOCK_SECONDS
    host, pid, started = who
    if holder_gone(host, pid, path, time.time()):
        return True
    return host == host_name() and started is not None and process_start(pid) not in (None, started)


def _ours(holder: dict[str, Any] | None) -> bool:
    who = _holder(holder)
    return who is not None and who[:2] == (host_name(), os.getpid())


def _refusal(output: Path, path: Path, holder: dict[str, Any] | None) -> str:
    who = _holder(holder)
    if who is None:
        return (f"output folder {output} is being taken by another run ({path} is being written); "
                "wait for it, or pick another --output")
    host, pid, _ = who
    since = holder.get("time") if holder else None
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(since))}" if isinstance(since, float) else ""
    if host == host_name():
        return (f"output folder {output} is in use by another run (host {host}, pid {pid}{when}); wait for it to "
                "end, or pick another --output")
    return (f"output folder {output} is in use by another run (host {host}, pid {pid}{when}); wait for it to end, "
            f"or pick another --output; if that run is gone, delete {path}")


def check_no_other_run(output: Path) -> None:
    """Raise when a live run other than this process holds `output`'s lock (read-only: breaks nothing)."""
    path = Path(output) / LOCK_FILE
    holder = read_lock(path)
    if path.exists() and not _ours(holder) and not lock_gone(path, holder):
        raise LLMModulesError(_refusal(Path(output), path, holder))


def _keep_fresh(path: Path, mine: dict[str, Any], stop: threading.Event) -> None:
    """Touch the lock every TOUCH_SECONDS while it is ours: a run on another host judges it by its age."""
    while not stop.wait(TOUCH_SECONDS):
        if read_lock(path) != mine:
            return
        try:
            os.utime(path)
        except OSError:
            return


def _let_go(path: Path, mine: dict[str, Any], stop: threading.Event, created: bool) -> None:
    stop.set()
    if read_lock(path) == mine:  # never remove a lock another run took after judging ours dead
        path.unlink(missing_ok=True)
    if created:  # a run refused before writing anything leaves no folder behind
        try:
            path.parent.rmdir()
        except OSError:  # not empty: the run wrote into it
            pass


class RunLock:
    """This process's hold on a training output folder (`take_run_lock`); let go by `release()`, when
    collected, or at interpreter exit. A killed process's lock is taken over by the next run."""

    def __init__(self, path: Path, mine: dict[str, Any], created: bool):
        self.path, self.holder = path, mine
        stop = threading.Event()
        # the thread and the finalizer hold no reference to self: the lock goes with the object
        threading.Thread(target=_keep_fresh, args=(path, mine, stop), name="run-lock", daemon=True).start()
        self._release = weakref.finalize(self, _let_go, path, mine, stop, created)

    @property
    def held(self) -> bool:
        return self._release.alive

    def release(self) -> None:
        self._release()


def take_run_lock(output: str | Path) -> RunLock:
    """Hold `output/run.lock` (the folder is made when missing), or raise with one line naming the folder and
    the live run that holds it; a dead holder's lock is broken (`lock_gone`, `fence.break_lock`)."""
    output = Path(output)
    created = not output.exists()
    path = output / LOCK_FILE
    mine = {"host": host_name(), "pid": os.getpid(), "started": process_start(os.getpid()), "time": time.time(),
            "nonce": secrets.token_hex(8)}
    try:
        output.mkdir(parents=True, exist_ok=True)
        for _ in range(_TRIES):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(path)
                if not lock_gone(path, holder):
                    raise LLMModulesError(_refusal(output, path, holder)) from None
                break_lock(path, holder)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(mine))
                f.flush()
                os.fsync(f.fileno())
            return RunLock(path, mine, created)
    except (FileExistsError, NotADirectoryError):
        raise LLMModulesError(f"output {output} is not a folder; pick another --output") from None
    except PermissionError as err:
        raise LLMModulesError(f"output folder {output} cannot be written ({err.strerror}); pick another --output") from None
    raise LLMModulesError(f"output folder {output}: its lock {path} changed hands {_TRIES} times while being taken; "
                          "another run is starting there, pick another --output")
