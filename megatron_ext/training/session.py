"""A run's session on this rank: the default process group (created from the torchrun
environment unless the caller made one), SIGTERM noted instead of dying of it, and, at the end,
megatron's parallel state, the process groups and the model released, so that a process that
goes on (test workers, notebooks, repeated runs) keeps nothing of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Self

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext.core import install_cpu_compat
from megatron_ext.core.parallel import destroy_new_process_groups, process_groups
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.device import resolve_device

__all__ = [
    "Session",
    "SigtermFlag",
    "distributed_session",
    "init_distributed",
    "release_model",
    "world_size",
]


class SigtermFlag:
    """Notes SIGTERM instead of dying of it, while active (main thread only; elsewhere inert)."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        self._previous = None
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handle(self, signum, frame) -> None:
        if not self.received:
            print(
                f"rank {dist.get_rank()}: SIGTERM received; saving a checkpoint after this step",
                flush=True,
            )
        self.received = True

    def __enter__(self) -> Self:
        if self._enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._enabled:
            signal.signal(signal.SIGTERM, self._previous)


def world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(config: TrainConfig, device: str) -> bool:
    """Create the default process group unless the caller did; returns whether we created it.

    device: 'cuda' or 'cpu' (resolve_device of config.device); on the CPU megatron's CUDA-only
    calls are bridged (and GPUs hidden from this process when some are visible)."""
    if device == "cpu":
        install_cpu_compat(force=True)
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return False
    backend = config.backend or ("nccl" if device == "cuda" else "gloo")
    if "MASTER_ADDR" not in os.environ and world_size() == 1:
        # A single process started without torchrun: rendezvous with itself on a free port.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group(backend)
    return True


def release_model(model: torch.nn.Module | list[torch.nn.Module]) -> None:
    """Let the model, its optimizer and the process groups they hold be freed once the run is
    over, in a process that goes on (test workers, notebooks, repeated runs). Two references
    outlive the run otherwise: megatron DDP's gradient hooks sit on autograd nodes that hold
    them from C++ (a cycle the garbage collector cannot see), and RotaryEmbedding.forward's
    lru_cache holds the embedding. Each gloo group kept alive keeps three threads polling."""
    import gc
    from collections import OrderedDict
    from types import CellType, FunctionType

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    chunks = model if isinstance(model, list) else [model]
    for chunk in chunks:
        grad_accs = getattr(chunk, "grad_accs", None)
        if isinstance(grad_accs, list):
            grad_accs.clear()
    # The hooks themselves: megatron drops their handles, so find them through their closures
    # (cell -> closure tuple -> function) and empty the hook tables holding them. Each level is
    # one gc.get_referrers call over all of its objects: every call walks the whole heap, and
    # one call per hook (a few hundred) took longer than the tiny runs themselves.
    cells = [r for r in gc.get_referrers(*chunks) if isinstance(r, CellType)]
    closures = gc.get_referrers(*cells) if cells else []
    hooks = [
        f
        for f in (gc.get_referrers(*closures) if closures else [])
        if isinstance(f, FunctionType) and "_make_backward_post_hook" in f.__qualname__
    ]
    for table in gc.get_referrers(*hooks) if hooks else []:
        if isinstance(table, OrderedDict):
            table.clear()
    cache_clear = getattr(RotaryEmbedding.forward, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


@dataclasses.dataclass(frozen=True)
class Session:
    """What distributed_session set up: the device ('cuda' or 'cpu') and the SIGTERM flag."""

    device: str
    sigterm: SigtermFlag


@contextlib.contextmanager
def distributed_session(config: TrainConfig) -> Iterator[Session]:
    """The process group for `config` (validated against the world size first) and megatron's
    parallel state torn down after the block (a process group made by the caller is kept, the
    groups made since are destroyed)."""
    config.validate(world_size())
    device = resolve_device(config.device)
    owns_group = init_distributed(config, device)
    groups_before = process_groups()
    # SIGTERM is noted from here on, so that one arriving while the run starts up is honoured at
    # its first step too (only with somewhere to save to).
    sigterm = SigtermFlag(bool(config.checkpoint.save_dir) and config.checkpoint.save_on_sigterm)
    try:
        with sigterm:
            yield Session(device=device, sigterm=sigterm)
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if owns_group:
            dist.destroy_process_group()
        else:
            destroy_new_process_groups(groups_before)
