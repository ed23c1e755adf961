"""Frozen large-model hidden states, computed once per training set and kept on disk.

The large model never trains, so its states for each example are the same every epoch. They are
stored under ``root/<key>/`` as safetensors shards (one tensor per example, named by its index)
plus ``index.json``, which is written last: a folder without a valid index is never read. Several
processes build one folder together, each its share (see `cache_fence` for hosts and locks). A key
(:func:`state_cache_key`) covers everything that changes the states, so any change lands in a
new folder; old folders stay (a user may switch back) until :func:`prune` removes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from llm_modules.errors import LLMModulesError
from llm_modules.models.cpu_linear import decoding_linears
from llm_modules.models.large_identity import loaded_weights_digest
from llm_modules.states.fence import (
    Group,
    build_name,
    finish_lock,
    host_name,
    sharing_groups,
    stale_build,
)
from llm_modules.states.leases import Lease, remove_unless_in_use, take_lease
from llm_modules.tensors import DTYPES, positions_from_mask, right_pad
from llm_modules.version import __version__

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SHARD_BYTES = 256 << 20  # a shard is closed once it holds this many bytes of states
_FORMAT = 1  # bump when the on-disk layout changes
# Heads that compute the large model's own logits from the states: from a half-precision cache they
# train on rounded states, while generation gives them float32 ones (measured by
# benchmarks/half_state_cache.py, reports/half_state_cache/results.md).
HEADS_READING_STATES = ("residual", "projected")
HALF_STATES_WARNING = (
    "state cache in %s: the %s head's base logits come from rounded large states in training but from "
    "float32 states in generation (demo pair: %s; reports/half_state_cache/results.md); "
    "--state-cache-dtype float32 trains on exactly what generation sees"
)
HALF_STATES_MEASURED = {
    "float16": "logits move by up to 0.006, the loss by +0.000003 per answer token, no arg-max changes",
    "bfloat16": "logits move by up to 0.048, the loss by +0.0001 per answer token, 1 arg-max in 1652 changes",
}


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LLMModulesError(f"state cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def large_weights_digest(large: torch.nn.Module) -> str:
    """sha256 of the weights' digest (names, shapes, dtypes and every value, see `large_identity`),
    the parameter count, and the model config."""
    h = hashlib.sha256(loaded_weights_digest(large).encode())
    h.update(str(sum(p.numel() for p in large.parameters())).encode())
    config = getattr(large, "config", None)
    if config is not None:  # rope, norm eps...: not in the weights but change the states
        items = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        h.update(json.dumps(items, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_state_key(model: Any, dtype: str = "float32") -> str:
    """Hex digest of everything but the data that decides the stored states: the large spec, its
    weights' identity, the tapped layers (`model.large_taps`), the storage dtype, the attention implementation and
    the torch, transformers and llm-modules versions (an upgrade may change the numbers)."""
    import transformers

    _check_dtype(dtype)
    payload = {
        "format": _FORMAT, "large": model.config.large, "weights": large_weights_digest(model.large),
        "taps": model.large_taps, "dtype": dtype,
        "attention": getattr(model.large.config, "_attn_implementation", None),
        "torch": torch.__version__, "transformers": transformers.__version__, "llm_modules": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def state_cache_key(model: Any, data_fingerprint: str, dtype: str = "float32") -> str:
    """Hex digest naming the cache folder of `model`'s large states on one list of examples.

    Covers `model_state_key` and `data_fingerprint`. Pass `examples_digest(examples)`: the states
    depend on the token ids only, so the key then ignores how the examples were chosen (seed,
    validation fraction, subset) and one folder serves every run over the same examples.
    """
    payload = {"model": model_state_key(model, dtype), "data": data_fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def examples_digest(examples: Sequence[Any]) -> str:
    """sha256 of every example's input ids, in order: tells which examples a cache holds."""
    h = hashlib.sha256()
    for e in examples:
        ids = torch.as_tensor(e.input_ids, dtype=torch.int64)
        h.update(len(ids).to_bytes(8, "little") + ids.numpy().tobytes())
    return h.hexdigest()


def example_hash(example: Any) -> str:
    """sha256 of one example's input ids: the states depend on nothing else (given the model key)."""
    return ids_hash(example.input_ids)


def ids_hash(ids: Sequence[int]) -> str:
    """`example_hash` of an example whose input ids are `ids`."""
    return hashlib.sha256(torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()


def _donors(root: Path, model_key: str, dtype: str) -> dict[str, tuple["StateCache", int]]:
    """{example hash: (cache, index)} over the complete folders under `root` built with `model_key`,
    each leased while the build copies from it (release them with `StateCache.close`)."""
    found: dict[str, tuple[StateCache, int]] = {}
    for folder in sorted(root.iterdir()):
        index = StateCache._read_index(folder, folder.name, dtype) if folder.is_dir() else None
        if index is None or index.get("model_key") != model_key or "hashes" not in index:
            continue
        cache = StateCache._open_leased(root, folder.name, dtype)
        if cache is None:  # pruned meanwhile
            continue
        for i, h in enumerate(index["hashes"]):
            found.setdefault(h, (cache, i))
    return found


class HeldStates:
    """States of examples that another pass of the large model computed (the pass that generated a drafter's
    training answers): safetensors files in `folder` (`write_held`), each tensor (T, K, dL) named by its
    example's `example_hash`, the file's metadata naming the model key and dtype it was computed for. Files of
    another model key or dtype, or that cannot be read, are ignored. A build (`StateCache.open_or_build`, `held`)
    copies the states of the examples held here instead of running the large model on them."""

    def __init__(self, folder: str | Path, model_key: str, dtype: str):
        self.folder, self.model_key, self.dtype = Path(folder), model_key, dtype
        self.where: dict[str, Path] = {}  # example hash -> file
        for path in sorted(self.folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("model_key") == model_key and meta.get("dtype") == dtype:
                        for name in f.keys():
                            self.where.setdefault(name, path)
            except Exception:  # damaged (a writer killed mid-write leaves a .tmp, never a .safetensors)
                logger.warning("held states %s cannot be read: ignored", path)

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, example: str) -> bool:
        return example in self.where

    def __getitem__(self, example: str) -> torch.Tensor:
        with safe_open(str(self.where[example]), framework="pt") as f:
            return f.get_tensor(example)

    def close(self) -> None:  # a donor's surface (`_donors`): nothing is kept open
        pass


def write_held(path: Path, states: dict[str, torch.Tensor], model_key: str, dtype: str) -> None:
    """Write `states` ({example hash: (T, K, dL) in `dtype`}) as one `HeldStates` file, whole or not at all."""
    tmp = path.with_name(f"{path.name}.tmp-{host_name()}-{os.getpid()}")
    save_file({h: t.contiguous() for h, t in states.items()}, str(tmp), metadata={
        "model_key": model_key, "dtype": dtype, "llm_modules": __version__})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prune(root: str | Path, keep: set[str]) -> list[Path]:
    """Delete cache folders under `root` whose key is not in `keep` and that no run reads (see
    `states.leases`), and dead build folders.

    Only folders named like a key (64 hex digits) or a build folder are touched. Returns the removed ones.
    """
    root, removed = Path(root), []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        key, is_tmp, _ = path.name.partition(".tmp-")
        is_key = len(key) == 64 and all(c in "0123456789abcdef" for c in key)
        if not (path.is_dir() and is_key):
            continue
        if is_tmp and stale_build(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif not is_tmp and key not in keep and remove_unless_in_use(root, key):
            removed.append(path)
    return removed


@dataclass
class BuildPlan:
    """One cache folder, `root/<key>/`, and how it is built: `model`'s large states of `examples`, stored
    in `dtype` in shards of about `shard_bytes`, computed `batch_size` examples at a time; with
    `model_key`, states that other folders of that model key hold are copied instead of computed."""

    root: Path
    key: str
    model: Any
    examples: Sequence[Any]
    dtype: str = "float32"
    batch_size: int = 8
    progress: bool = True
    shard_bytes: int = SHARD_BYTES
    model_key: str | None = None
    held: HeldStates | None = None

    @property
    def final(self) -> Path:
        return self.root / self.key


class StateCache:
    """Memory-mapped, read-only view of cached states: ``cache[i]`` -> tensor (T_i, K, d_large), K tapped layers.

    Tensors come back in the stored dtype (the caller casts). Shards are opened lazily through
    `safetensors.safe_open` and each example is read on demand; nothing is loaded up front. While
    open, the folder is leased (`states.leases`): pruning leaves it alone until `close()`, the
    object is collected, or the process ends.
    """

    def __init__(self, path: Path, index: dict[str, Any], built: bool, lease: Lease | None = None):
        self.path, self.index, self.built, self.lease = path, index, built, lease
        self.computed = index.get("computed", 0) if built else 0  # examples run through the large model
        self.lengths: list[int] = index["lengths"]
        self.d_large: int = index["d_large"]
        self.dtype: torch.dtype = DTYPES[index["dtype"]]
        self.size_bytes: int = sum((path / s).stat().st_size for s in index["shards"])
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"state cache index {i} out of range for {len(self)} examples")
        shard = self.index["shard_of"][i]
        if self.lease is not None:
            self.lease.touch()
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / self.index["shards"][shard]), framework="pt")
        return self._handles[shard].get_tensor(str(i))  # (T_i, K, d_large)

    def batch(self, indices: Sequence[int], pad_to: int) -> torch.Tensor:
        """(B, pad_to, K, d_large) states, right-padded with zeros like `data.collate`."""
        rows = [self[i] for i in indices]
        out = torch.zeros(len(indices), pad_to, *rows[0].shape[1:], dtype=self.dtype)
        for row, (i, states) in enumerate(zip(indices, rows)):
            if self.lengths[i] > pad_to:
                raise LLMModulesError(f"example {i} has {self.lengths[i]} tokens, more than pad_to={pad_to}")
            out[row, : self.lengths[i]] = states
        return out

    def close(self) -> None:
        """Let go of the folder: its shards and its lease (pruning may then remove it)."""
        self._handles.clear()
        if self.lease is not None:
            self.lease.release()

    # ------------------------------------------------------------------ open / build
    @classmethod
    def _open_leased(cls, root: Path, key: str, dtype: str, built: bool = False) -> "StateCache | None":
        """The complete folder `root/<key>`, leased; None when it is not (or no longer) complete. The
        check and the lease happen under the key's lock, which pruning takes too."""
        with finish_lock(root, key):
            index = cls._read_index(root / key, key, dtype)
            lease = take_lease(root / key) if index is not None else None
        return None if index is None else cls(root / key, index, built=built, lease=lease)

    @classmethod
    def open_or_build(cls, root: str | Path, key: str, model: Any, examples: Sequence[Any], dtype: str = "float32",
                      batch_size: int = 8, progress: bool = True, shard_bytes: int = SHARD_BYTES,
                      model_key: str | None = None, group: Group | None = None,
                      held: HeldStates | None = None) -> "StateCache":
        """Open the complete cache `root/<key>/` for `examples`, or compute and store it first.

        Every process of a torch.distributed run must call this (`group`, default: the initialised
        process group, else this process alone). The processes that see the same `root` build it
        together: each encodes every n-th batch of the length-sorted examples (the batches a
        single process would run, so the states are the same bytes) and writes its own shards and
        a manifest; when all are written, the lowest rank checks every manifest, writes the index
        and puts the folder in place under a lock (`cache_fence`). A folder without a valid
        `index.json` (a killed build) is never read, and is replaced. A complete folder built for
        other examples raises: give each example list its own key. With `model_key` (see
        `model_state_key`), a build copies the states of examples that other folders of the same
        model key already hold and runs the large model on the others only; `held` (`HeldStates`, one process
        only: the others would not hold them) adds states another pass computed. Opening a folder marks
        it used (the mtime of its index) and leases it while the cache is open (`states.leases`).
        """
        _check_dtype(dtype)
        if not examples:
            raise LLMModulesError("state cache: no examples to cache")
        group = group or Group()
        head = getattr(model.config, "head", None)
        if dtype != "float32" and head in HEADS_READING_STATES and group.rank == 0:
            logger.warning(HALF_STATES_WARNING, dtype, head, HALF_STATES_MEASURED[dtype])
        plan = BuildPlan(Path(root), key, model, examples, dtype=dtype, batch_size=batch_size, progress=progress,
                         shard_bytes=shard_bytes, model_key=model_key, held=held)
        if held is not None and len(held) and group.world > 1:
            raise LLMModulesError("state cache: states held by one process cannot feed a build shared by several")
        root, final = plan.root, plan.final
        root.mkdir(parents=True, exist_ok=True)
        digest = examples_digest(examples)
        me = {"complete": cls._read_index(final, key, dtype) is not None, "host": host_name(), "pid": os.getpid(),
              "nonce": secrets.token_hex(4)}
        everyone = group.gather(me)
        built = False
        if not all(p["complete"] for p in everyone):
            groups = sharing_groups(root, group, everyone[0]["nonce"])
            members = groups[group.rank]
            leader = everyone[members[0]]
            if not leader["complete"]:
                built = True
                name = build_name(key, leader["host"], leader["pid"], everyone[0]["nonce"])
                if group.rank == members[0]:
                    for leftover in root.glob(f"{key}.tmp-*"):
                        if leftover.name != name and stale_build(leftover):
                            shutil.rmtree(leftover, ignore_errors=True)
                cls._build_shared(plan, root / name, members.index(group.rank), len(members))
            group.barrier()  # every share written
            if built and group.rank == members[0]:
                cls._finish(plan, root / name, len(members), digest)
            group.barrier()  # every folder in place
        cache = cls._open_leased(root, key, dtype, built=built)
        if cache is None:
            raise LLMModulesError(f"state cache {final} has no valid {INDEX_FILE} after its build")
        index = cache.index
        if index["examples"] != digest:
            cache.close()
            raise LLMModulesError(
                f"state cache {final} was built for other examples ({index['n']} of them; {len(examples)} "
                "given): the key must cover the example list, e.g. add the split name to the data fingerprint"
            )
        if built:
            logger.info("cached large-model states of %d examples in %s (%.1f MB, %s; %d computed, %d reused)",
                        len(cache), final, cache.size_bytes / 1e6, dtype, cache.computed, len(cache) - cache.computed)
        else:
            if group.rank == 0:
                os.utime(final / INDEX_FILE)  # last used: the size cap evicts the least recently used first
            logger.info("reusing cached large-model states %s (%d examples, %.1f MB)",
                        final, len(cache), cache.size_bytes / 1e6)
        return cache

    @staticmethod
    def _read_index(folder: Path, key: str, dtype: str) -> dict[str, Any] | None:
        """The folder's index when it is complete and matches (key, dtype, format); else None."""
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
            ok = (index["format"] == _FORMAT and index["key"] == key and index["dtype"] == dtype
                  and isinstance(index["examples"], str)
                  and len(index["lengths"]) == len(index["shard_of"]) == index["n"]
                  and all((folder / s).is_file() for s in index["shards"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return index if ok else None

    @classmethod
    def _build_shared(cls, plan: BuildPlan, folder: Path, member: int, members: int) -> None:
        """This process's share of a build in `folder`; a failure removes the folder (the others then
        fail at the next barrier, and nothing is left that a later run would read)."""
        donors: dict[str, tuple[StateCache, int]] = {}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            donors = _donors(plan.root, plan.model_key, plan.dtype) if plan.model_key else {}
            held = plan.held
            if held is not None and (held.model_key, held.dtype) == (plan.model_key, plan.dtype):  # else not these
                for example in held.where:
                    donors.setdefault(example, (held, example))
            cls._build(plan, folder, donors, member, members)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            for cache, _ in donors.values():
                cache.close()

    @classmethod
    def _finish(cls, plan: BuildPlan, folder: Path, members: int, digest: str) -> None:
        """The lowest rank of a build: check every member's manifest and shards, write the index
        last, and put the folder in place unless a complete one got there first."""
        root, key, dtype, final = plan.root, plan.key, plan.dtype, plan.final
        try:
            index = _merge_manifests(folder, key, members, dtype, [len(e.input_ids) for e in plan.examples],
                                     [example_hash(e) for e in plan.examples])
            index.update(examples=digest, model_key=plan.model_key)
            _write_json_atomic(folder / INDEX_FILE, index)  # last: only now is the folder complete
            with finish_lock(root, key):
                if cls._read_index(final, key, dtype) is not None:  # another build finished first: keep it
                    shutil.rmtree(folder)
                    return
                if final.exists():  # a folder without a valid index: debris that no build owns any more
                    logger.warning("state cache %s is incomplete (no valid %s): replacing it", final, INDEX_FILE)
                    debris = root / f"{key}.tmp-{host_name()}-{os.getpid()}-debris"
                    os.replace(final, debris)
                    shutil.rmtree(debris, ignore_errors=True)
                os.replace(folder, final)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @staticmethod
    def _build(plan: BuildPlan, folder: Path, donors: dict[str, tuple["StateCache", int]], member: int = 0,
               members: int = 1) -> None:
        """Member `member` of `members`: copy its share of the states `donors` hold, and run the
        large model over its share of the other examples (sorted by length, cut into batches of
        `plan.batch_size` as one process would, every `members`-th batch), into shards
        `shard-<member>-<n>` in `folder`, then `part-<member>.json` naming them: the manifest."""
        key, model, examples, dtype = plan.key, plan.model, plan.examples, plan.dtype
        lengths = [len(e.input_ids) for e in examples]
        if min(lengths) < 1:
            raise LLMModulesError("state cache: an example has no tokens")
        hashes = [example_hash(e) for e in examples]
        reused = [i for i in range(len(examples)) if hashes[i] in donors][member::members]
        order = sorted((i for i in range(len(examples)) if hashes[i] not in donors), key=lambda i: lengths[i])
        batches = [order[s : s + plan.batch_size] for s in range(0, len(order), plan.batch_size)][member::members]
        shards: dict[str, int] = {}  # name -> bytes
        where: dict[int, str] = {}
        pending: dict[str, torch.Tensor] = {}
        pending_bytes, d_large = 0, None
        alive = folder / f"part-{member:05d}.alive"  # touched after every batch: the build is not dead

        def flush() -> None:
            nonlocal pending, pending_bytes
            name = f"shard-{member:05d}-{len(shards):05d}.safetensors"
            save_file(pending, str(folder / name), metadata={"key": key, "llm_modules": __version__})
            with open(folder / name, "rb") as f:
                os.fsync(f.fileno())
            shards[name] = (folder / name).stat().st_size
            pending, pending_bytes = {}, 0

        def add(i: int, states: torch.Tensor) -> None:  # states (T_i, K, dL) in the stored dtype
            nonlocal pending_bytes, d_large
            pending[str(i)], d_large = states, states.shape[-1]
            pending_bytes += states.nbytes
            where[i] = f"shard-{member:05d}-{len(shards):05d}.safetensors"
            if pending_bytes >= plan.shard_bytes:
                flush()

        for i in reused:
            cache, j = donors[hashes[i]]
            # a copy of its own: duplicate examples map to one donor row, and safetensors refuses to
            # save tensors that share storage
            states = cache[j].clone()
            if states.shape[0] != lengths[i] or states.dtype != DTYPES[dtype]:
                raise LLMModulesError(f"state cache: the states held for example {i} are "
                                      f"{tuple(states.shape)} {states.dtype}, not ({lengths[i]}, ...) {dtype}")
            add(i, states)
        shown = plan.progress and member == 0 and batches
        bar = tqdm(total=sum(map(len, batches)), desc="large-model states", unit="ex",
                   disable=None if shown else True)  # None: off when not a TTY
        device = next(model.large.parameters()).device if batches else None
        # oneDNN's kernels where torch's are slow (models.cpu_linear), the large model's own layers back afterwards
        with torch.no_grad(), decoding_linears(model.large):
            for rows in batches:
                # (B, width); pad id 0: masked out
                ids, mask = right_pad([list(examples[i].input_ids) for i in rows], 0, device)
                states, _ = model.encode_large(ids, mask, positions_from_mask(mask))  # (B, width, K, dL)
                for r, i in enumerate(rows):
                    add(i, states[r, : lengths[i]].to("cpu", DTYPES[dtype]).clone())  # (T_i, K, dL)
                alive.touch()
                bar.update(len(rows))
        bar.close()
        if pending:
            flush()
        manifest = {"member": member, "shards": shards, "where": {str(i): s for i, s in where.items()},
                    "d_large": d_large, "computed": sum(map(len, batches))}
        _write_json_atomic(folder / f"part-{member:05d}.json", manifest)


def _merge_manifests(folder: Path, key: str, members: int, dtype: str, lengths: list[int],
                     hashes: list[str]) -> dict[str, Any]:
    """The index of a shared build from its members' manifests; raises when a member's part is
    missing or a shard is not the size its member wrote."""
    manifests = []
    for member in range(members):
        path = folder / f"part-{member:05d}.json"
        try:
            manifests.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise LLMModulesError(f"state cache build {folder}: member {member} left no readable manifest ({err})")
    shards = [name for m in manifests for name in m["shards"]]
    for m in manifests:
        for name, size in m["shards"].items():
            if not (folder / name).is_file() or (folder / name).stat().st_size != size:
                raise LLMModulesError(f"state cache build {folder}: shard {name} is missing or not the size written")
    position = {name: n for n, name in enumerate(shards)}
    where = {int(i): position[name] for m in manifests for i, name in m["where"].items()}
    if sorted(where) != list(range(len(lengths))) or sum(len(m["where"]) for m in manifests) != len(lengths):
        raise LLMModulesError(f"state cache build {folder}: the members' shares do not cover every example once")
    d_large = next(m["d_large"] for m in manifests if m["d_large"] is not None)
    return {"format": _FORMAT, "key": key, "n": len(lengths), "lengths": lengths, "d_large": d_large,
            "dtype": dtype, "shards": shards, "shard_of": [where[i] for i in range(len(lengths))],
            "library_version": __version__, "hashes": hashes, "computed": sum(m["computed"] for m in manifests)}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
