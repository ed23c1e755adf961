"""Several CPU processes joined by gloo, started with torch.multiprocessing (spawn), for the scale-out tests.

Workers live here, not in a test module: spawned processes import them by name.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, use_accelerate: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if not use_accelerate:  # accelerate starts the group itself, from the same variables
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any, timeout: float = 300, use_accelerate: bool = False) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes on CPUs (any GPU hidden from them: gloo,
    and more processes than a one-GPU machine has GPUs); raises when one fails or time runs out."""
    with mock.patch.dict(os.environ, CUDA_VISIBLE_DEVICES=""):  # the children inherit it at their start
        context = mp.start_processes(_entry, args=(world, free_port(), fn, args, use_accelerate), nprocs=world,
                                     join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
            raise TimeoutError(f"{world} processes of {fn.__name__} did not finish in {timeout} s")


# ----------------------------------------------------------------------------- workers
def compose_tiny(large: str, small: str):
    from llm_modules import LLMModulesModel

    torch.manual_seed(0)
    return LLMModulesModel.compose(large=large, small=small).eval()


def build_states(rank: int, world: int, large: str, small: str, roots: list[str], examples: list,
                 fingerprint: str, kill_rank: int = -1) -> None:
    """Build the state cache of `examples` in roots[rank % len(roots)] (one root: a shared folder;
    several: node-local folders). `kill_rank` SIGKILLs itself after encoding its first batch."""
    from llm_modules.states.store import StateCache, state_cache_key

    model = compose_tiny(large, small)
    if rank == kill_rank:
        encode, calls = model.encode_large, []

        def encode_then_die(*a, **kw):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return encode(*a, **kw)

        model.encode_large = encode_then_die
    root = Path(roots[rank % len(roots)])
    StateCache.open_or_build(root, state_cache_key(model, fingerprint), model, examples, batch_size=2,
                             progress=False, shard_bytes=4000)


def train_run(rank: int, world: int, config: dict) -> None:
    """train.setup + fit on `world` processes; checks that only the trained parts are wrapped."""
    from torch.nn.parallel import DistributedDataParallel

    from llm_modules.training.config import TrainConfig
    from llm_modules.training.loop import fit, setup
    from llm_modules.training.objectives.composed import TrainedParts

    run = setup(TrainConfig(**config))
    assert isinstance(run.wrapped, DistributedDataParallel), type(run.wrapped)
    assert isinstance(run.wrapped.module, TrainedParts)
    wrapped = {id(p) for p in run.wrapped.parameters()}
    assert not wrapped & {id(p) for p in run.objective.model.large.parameters()}, "the large model is wrapped"
    assert not any(name.startswith("large.") for name in run.wrapped.module.state_dict())
    fit(run)
    run.accelerator.end_training()
