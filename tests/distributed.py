"""A small multi-process harness for gloo tests on CPU.

A `WorkerPool` starts `world_size` processes once, each with a gloo process group on a free port,
and then runs many checks on them: `pool.run(fn, *args)` calls `fn(*args)` on every rank and
returns the per-rank results. A failure on any rank raises in the test with every failing rank's
traceback tagged by its rank; the pool is then torn down and restarted lazily, because a rank that
failed may have left its peers inside a collective. `fn` must be a module-level function (it is
pickled by reference).
"""

from __future__ import annotations

import atexit
import gc
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["WorkerPool", "free_port", "get_pool", "shutdown_pools"]

_DEFAULT_TIMEOUT_S = 300.0


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, tasks, results) -> None:
    import datetime
    import multiprocessing

    # A spawned process inherits "spawn" as its default start method; a torchrun rank has
    # Linux's "fork". Data-loader workers started by spawn import torch and the dataset code
    # again: the one pool check with workers took 8.7-9.1 s instead of 1.4-1.5 s.
    multiprocessing.set_start_method("fork", force=True)

    import torch
    import torch.distributed as dist

    import megatron_ext  # noqa: F401 - before megatron-core (see megatron_ext.core.jit)
    import megatron_ext.training.trainer  # noqa: F401 - what most checks run
    from megatron_ext.core.heap import freeze_imported_objects

    # As the trainer's entry points do: the collections after each check (below) and those in
    # the runs skip the imported modules' objects.
    freeze_imported_objects()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    # Two cores are shared by all ranks: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=120),
        )
        results.put((rank, "ready", None))
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args, kwargs = task
            try:
                out = fn(*args, **kwargs)
                results.put((rank, "ok", out))
            except BaseException:  # noqa: BLE001 - every failure goes back to the test, tagged
                results.put((rank, "error", traceback.format_exc()))
            # What a check built (models in megatron DDP, optimizers) sits in reference cycles
            # that hold its process groups; a gloo group keeps three threads polling until it is
            # freed. Without this, the pools' workers held 200+ groups (700 threads) by the end.
            del task, fn, args, kwargs
            out = None
            gc.collect()
    except BaseException:  # noqa: BLE001
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerPool:
    """`world_size` gloo ranks kept alive across many checks."""

    def __init__(self, world_size: int, timeout_s: float = _DEFAULT_TIMEOUT_S) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, self.world_size, port, self._tasks[r], self._results),
                # Not daemonic: a rank starts data-loader worker processes of its own, as under
                # torchrun (shutdown_pools stops the pool at exit).
                daemon=False,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready")

    def _collect(self, what: str) -> list[Any]:
        outs: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(outs) + len(errors) < self.world_size:
            try:
                rank, status, payload = self._results.get(timeout=self.timeout_s)
            except queue.Empty:
                missing = sorted(set(range(self.world_size)) - set(outs) - set(errors))
                self.shutdown()
                detail = "".join(f"\n[rank {r}] {tb}" for r, tb in sorted(errors.items()))
                raise TimeoutError(
                    f"ranks {missing} gave no answer within {self.timeout_s:.0f} s ({what}){detail}"
                ) from None
            if status == "error":
                errors[rank] = payload
                # Peers of a failed rank may be stuck in a collective: stop waiting for them soon.
                if len(errors) == 1:
                    self._deadline_after_error()
            else:
                outs[rank] = payload
        if errors:
            self.shutdown()
            detail = "".join(f"\n----- rank {r} -----\n{tb}" for r, tb in sorted(errors.items()))
            raise RuntimeError(f"{len(errors)} of {self.world_size} ranks failed ({what}):{detail}")
        return [outs[r] for r in range(self.world_size)]

    def _deadline_after_error(self) -> None:
        self.timeout_s = min(self.timeout_s, 20.0)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call fn(*args, **kwargs) on every rank; return the results in rank order."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        try:
            return self._collect(getattr(fn, "__name__", repr(fn)))
        finally:
            self.timeout_s = _DEFAULT_TIMEOUT_S

    def shutdown(self) -> None:
        """Stop every worker (politely, then by force)."""
        for q in self._tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs, self._tasks, self._results = [], [], None


_POOLS: dict[int, WorkerPool] = {}


def get_pool(world_size: int) -> WorkerPool:
    """The shared pool of `world_size` ranks (started on first use, reused afterwards)."""
    if world_size not in _POOLS:
        _POOLS[world_size] = WorkerPool(world_size)
    return _POOLS[world_size]


def shutdown_pools() -> None:
    """Stop the workers of every shared pool; a pool starts again on its next `run`."""
    for pool in _POOLS.values():
        pool.shutdown()


atexit.register(shutdown_pools)
