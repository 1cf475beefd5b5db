"""Save and resume through megatron-core dist_checkpointing.

A checkpoint holds the model and optimizer as sharded tensors (so it can be loaded at another
TP/PP/VP/EP/DP layout), the learning-rate scheduler, the step and the data position (consumed
samples) as common state, and the RNG states of every rank as a sharded object. The model is
one sharded state dict per model chunk, under `model` (one chunk) or `model0`, `model1`, ... (a
virtual pipeline), as megatron's own training loop saves them; the sharded keys inside name the
layers by their global numbers, so the chunks of any layout address the same tensors. Layout on
disk:
`<dir>/iter_0000042/` plus a `<dir>/latest` text file holding the last complete step.

Saves are atomic: every rank writes into `<dir>/iter_0000042.tmp/`, which rank 0 renames to its
final name only after all ranks finished writing, and only then points `latest` at it (written
to a temporary file, fsynced, and renamed over the old one). A process killed at any moment of a
save therefore leaves `latest` naming the previous complete checkpoint; the leftover `.tmp`
folder is removed by the next save or resume. Weights are checked to be finite before anything is
written: a checkpoint with NaN or infinite weights is never saved.

Saves may be asynchronous (AsyncCheckpointSaver, CheckpointConfig.async_save): dist_checkpointing
plans the save and returns an AsyncRequest, which megatron-core's AsyncCallsQueue runs in a forked
process (a copy-on-write snapshot of the state at the save's step; on GPU the tensors are copied
to host memory first) while training continues. The same publication (rename, then `latest`)
is the request's last finalize function, run on every rank once every rank's writer finished and
megatron gathered their write results, so all the promises above hold for asynchronous saves too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import queue
import random
import shutil
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import unwrap_model

from megatron_ext.core.checkpoint_layout import (
    LATEST,
    OLD_SUFFIX,
    TMP_SUFFIX,
    CheckpointError,
    checkpoint_dir,
    checkpoint_steps,
    fsync_dir,
    latest_step,
    step_folders,
    write_latest,
)
from megatron_ext.models.config import ModelConfig

__all__ = [
    "AsyncCheckpointSaver",
    "CheckpointError",
    "NonFiniteWeightsError",
    "TrainState",
    "checkpoint_dir",
    "latest_step",
    "load_checkpoint",
    "remove_incomplete_checkpoints",
    "save_checkpoint",
]


class NonFiniteWeightsError(RuntimeError):
    """The weights hold NaN or infinite values; raised instead of saving them."""


class TrainState(dict):
    """Progress of a run: {'step': int, 'consumed_samples': int, 'layout': (pp, tp, dp)}."""


def remove_incomplete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Clean up after interrupted saves under `root`; returns the folders removed.

    Staging folders (`.tmp`) are deleted. A checkpoint moved aside (`.old`) while a save of the
    same step replaced it is moved back if the replacement never arrived, else deleted. Call it
    on one rank only, while no save is running.
    """
    removed = []
    for staging in sorted(Path(root).glob(f"iter_*{TMP_SUFFIX}")):
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(staging)
    for old in sorted(Path(root).glob(f"iter_*{OLD_SUFFIX}")):
        final = old.with_name(old.name.removesuffix(OLD_SUFFIX))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        else:
            old.rename(final)
    return removed


def _layout() -> tuple[int, int, int]:
    return (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def _rng_state() -> dict[str, Any]:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: Any) -> ShardedObject:
    """Every rank's RNG state, addressed by its (pp, tp, dp) coordinates."""
    pp, tp, dp = _layout()
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (pp, tp, dp), offset, replica_id=0)


# The distributed optimizer's checkpoint format (megatron-core's distrib_optim_sharding_type).
# 'fully_reshardable' stores Adam's state per parameter in model space (the parameter's own
# sharding), so it loads at any TP/PP/DP layout; saving gathers each data-parallel group's shards
# (and loading reads them whole), so either holds the optimizer state of one TP/PP shard in host
# memory on every rank for a moment. Checkpoints saved before it was the default hold
# 'dp_reshardable' (per-bucket state, resharded over DP only): they load at their own TP/PP sizes,
# the format being read from the checkpoint (_saved_optimizer_format).
DISTRIB_OPTIM_FORMAT = "fully_reshardable"
_MODEL_SPACE_FORMATS = ("fully_reshardable", "fully_sharded_model_space")


def _metadata(
    distributed_optimizer: bool, optim_format: str = DISTRIB_OPTIM_FORMAT
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }
    if distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = optim_format
    return metadata


def _saved_optimizer_format(common: dict[str, Any]) -> str | None:
    """The distributed optimizer's format in a checkpoint's common state (megatron's own
    'param_state_sharding_type', the same in every chained optimizer), or None without one."""
    stack = [common.get("optimizer")]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("param_state_sharding_type"), str):
                return node["param_state_sharding_type"]
            stack.extend(node.values())
    return None


def _chunks(model: torch.nn.Module | list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The model chunks: a list of them, or one model."""
    return list(model) if isinstance(model, list | tuple) else [model]


def _model_keys(num_chunks: int) -> list[str]:
    """The state-dict keys of the model chunks, as megatron's training loop names them: `model`
    for one chunk, `model0`, `model1`, ... for a virtual pipeline's."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _sharded_state_dict(
    model: torch.nn.Module | list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    distributed_optimizer: bool,
    is_loading: bool,
    rng: Any = None,
    optim_format: str = DISTRIB_OPTIM_FORMAT,
) -> dict[str, Any]:
    metadata = _metadata(distributed_optimizer, optim_format)
    chunks = _chunks(model)
    # The bare models (not DDP / Float16Module): sharded keys as megatron's own checkpoints have.
    state: dict[str, Any] = {
        key: unwrap_model(chunk).sharded_state_dict(metadata=metadata)
        for key, chunk in zip(_model_keys(len(chunks)), chunks, strict=True)
    }
    if optimizer is not None:
        # (it finds every chunk's parameters among the model entries, as in megatron's loop)
        with _bucket_padding_kept(optimizer, distributed_optimizer, optim_format):
            state["optimizer"] = optimizer.sharded_state_dict(
                dict(state), is_loading=is_loading, metadata=metadata
            )
    if rng is not None:
        state["rng"] = _rng_sharded_object(rng)
    return state


# megatron-core 0.19.2: the 'fully_reshardable' format cuts each parameter's Adam state out of
# the buffer-wide tensors of DistributedOptimizer.get_parameter_state_dp_zero at the parameter's
# offsets in the buffer (buffer.param_index_map), but those tensors leave out the padding that
# ends every bucket (each bucket is padded to a multiple of the DP size), which the offsets
# count. With one bucket (overlap_grad_reduce off: megatron makes the buffer one bucket) the two
# agree; with several (overlapped gradient reduce, the paper recipes) every parameter after the
# first bucket was saved with another parameter's state, shifted by the padding before it, and a
# resumed run diverged (measured: step-3 loss 5.55 against 5.10). The loader reads by parameter
# and is right. While the state dict is built, each DistributedOptimizer's buffer-wide tensors
# get the padding back, so the offsets address them. tests/test_training.py::
# test_overlapped_grad_reduce_and_param_gather_train_like_synchronous fails once megatron keeps
# the padding itself: then remove this.
def _bucket_padding_kept(
    optimizer: MegatronOptimizer, distributed_optimizer: bool, optim_format: str
) -> contextlib.AbstractContextManager[None]:
    def padded_gather(sub: Any, original: Any) -> Any:
        def gather(*args: Any, **kwargs: Any) -> Any:
            state = original(*args, **kwargs)
            if state is not None:
                for gbuf_idx, buffer in enumerate(sub.buffers):
                    for world in state[gbuf_idx].values():
                        _pad_buckets(world, buffer)
            return state

        return gather

    fixed = distributed_optimizer and optim_format == "fully_reshardable"
    subs = _distributed_optimizers(optimizer) if fixed else []
    return _replaced_on_each(subs, "get_parameter_state_dp_zero", padded_gather)


def _pad_buckets(world: dict[str, Any], buffer: Any) -> None:
    """Spread `world`'s buffer-wide tensors (the buckets' unpadded parts back to back) over the
    buffer's padded layout, in place."""
    for key, tensor in list(world.items()):
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != buffer.numel_unpadded:
            continue
        spread = tensor.new_zeros(buffer.numel)
        start = 0
        for bucket in buffer.buckets:
            end = start + bucket.numel_unpadded
            spread[bucket.offset : bucket.offset + bucket.numel_unpadded] = tensor[start:end]
            start = end
        world[key] = spread


def _distributed_optimizers(optimizer: MegatronOptimizer) -> list[Any]:
    """The DistributedOptimizers of `optimizer` (itself, or those of its chain)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [sub for sub in subs if isinstance(sub, DistributedOptimizer)]


@contextlib.contextmanager
def _replaced_on_each(subs: list[Any], name: str, wrap: Any) -> Iterator[None]:
    """For the block, each of `subs` gets, on the instance, `wrap(sub, original method)` in
    place of its method `name` (the megatron-core workarounds of this module)."""
    for sub in subs:
        setattr(sub, name, wrap(sub, getattr(sub, name)))
    try:
        yield
    finally:
        for sub in subs:
            delattr(sub, name)  # the class's method again


def _distributed_torch_adams(optimizer: MegatronOptimizer) -> list[torch.optim.Optimizer]:
    return [
        sub.optimizer
        for sub in _distributed_optimizers(optimizer)
        if isinstance(sub.optimizer, (torch.optim.Adam, torch.optim.AdamW))
    ]


# Without Apex or Transformer Engine, megatron-core 0.19's DistributedOptimizer keeps torch Adam's
# step in two places: per parameter in the torch state (a tensor) and per param group in its own
# state dict. Three workarounds keep resuming exact:
# - state_dict() asserts that the per-parameter steps hold exactly one value, so building the
#   sharded state dict to load into a never-stepped optimizer fails: give it zero state first
#   (what torch's Adam creates on its first step; the checkpoint overwrites all of it);
# - the dp_reshardable loader copies the per-parameter 'step' from the pre-load state (it is not
#   among the tensors read from the checkpoint), while the checkpoint's step arrives in the param
#   groups: copy it back to every parameter after loading;
# - the model-space loaders fail outright: _adam_step_kept_on_load, below.


def _materialize_distributed_adam_state(optimizer: MegatronOptimizer) -> None:
    for inner in _distributed_torch_adams(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )


def _restore_distributed_adam_steps(optimizer: MegatronOptimizer) -> None:
    for inner in _distributed_torch_adams(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state[param]
                if "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


# megatron-core 0.19.2: the model-space formats ('fully_reshardable', 'fully_sharded_model_space')
# store no per-parameter 'step' (it is read from the param groups), so their loaders
# (load_parameter_state_from_fully_reshardable / _from_fs_model_space) hand
# DistributedOptimizer._set_main_param_and_optimizer_states each parameter's tensors without it,
# and that method copies every tensor of torch Adam's state, 'step' included: KeyError 'step'
# (with Apex's or Transformer Engine's Adam the step lives in the param groups only). While
# loading, each DistributedOptimizer gets, on the instance, a version that keeps the parameter's
# own step (set from the checkpoint's param groups by load_state_dict just before).
# tests/test_training.py::test_megatron_still_needs_the_adam_step_workaround fails once megatron
# loads these formats without it: then remove this context manager.
def _adam_step_kept_on_load(
    optimizer: MegatronOptimizer,
) -> contextlib.AbstractContextManager[None]:
    def keeping_step(sub: Any, original: Any) -> Any:
        def set_states(model_param: Any, tensors: dict[str, Any]) -> None:
            if "step" not in tensors:
                own = sub._get_main_param_and_optimizer_states(model_param)
                if "step" in own:
                    tensors = {**tensors, "step": own["step"]}
            original(model_param, tensors)

        return set_states

    return _replaced_on_each(
        _distributed_optimizers(optimizer), "_set_main_param_and_optimizer_states", keeping_step
    )


# megatron-core 0.19.2 gives the experts' parameters an optimizer of their own (the second of the
# ChainedOptimizer, reducing over the expert-data-parallel group) only when they are split
# (EP > 1: megatron marks them allreduce=False); at EP=1 they are in the dense optimizer's groups.
# The model-space formats key Adam's tensors by parameter, whatever the optimizer, but the common
# state comes back as saved: the chain's nesting (one optimizer's state as it is, or {0: dense,
# 1: experts}) and each optimizer's param groups (which DistributedOptimizer.load_state_dict
# matches by param_group_identifier_keys, is_expert_parallel among them). So between EP=1 and EP>1
# ChainedOptimizer.load_state_dict fails ("Expected 2 entries in state dict, but got 4"), and
# would then miss the param groups: give every optimizer of this run the saved groups (the same
# hyperparameters and step in all, the ChainedOptimizer keeping the steps in sync), marked as its
# own, with the tensors loaded for it.
def _optimizer_state_regrouped(state: dict[Any, Any], optimizer: MegatronOptimizer) -> Any:
    """The loaded distributed-optimizer `state` in the shape of this run's `optimizer`."""
    subs = list(getattr(optimizer, "chained_optimizers", [optimizer]))

    def unnested(entry: dict[Any, Any]) -> dict[Any, Any]:
        return {k: v for k, v in entry.items() if not isinstance(k, int)}

    indexed = sorted(key for key in state if isinstance(key, int))
    saved = [unnested(e) for e in (state, *(state[k] for k in indexed)) if "optimizer" in e]
    if len(saved) == len(subs):
        return state
    loaded = [state[i] for i in range(len(subs))] if len(subs) > 1 else [unnested(state)]
    groups = [group for entry in saved for group in entry["optimizer"]["param_groups"]]
    regrouped = []
    for sub, tensors in zip(subs, loaded, strict=True):
        expert = sub.optimizer.param_groups[0]["is_expert_parallel"]
        own_groups = [{**group, "is_expert_parallel": expert} for group in groups]
        regrouped.append(
            {
                **saved[0],
                "optimizer": {**saved[0]["optimizer"], "param_groups": own_groups},
                "param_state": tensors["param_state"],
            }
        )
    return regrouped[0] if len(subs) == 1 else dict(enumerate(regrouped))


_IN_PROCESS_QUEUE: queue.Queue = queue.Queue()
_FORK_QUEUE: Any = None


def _in_process_writer_queue() -> None:
    """dist_checkpointing's torch_dist writer returns the results of its writer threads through a
    `multiprocessing.Manager().Queue()`, made for asynchronous saves run in another process. Our
    synchronous saves run the writes in this process, so a plain thread-safe queue does the
    same job without starting a manager server process, which costs a process start, re-imports
    the main module under the spawn start method, and is forbidden in daemonic processes (the
    test pools run ranks as daemons)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = _IN_PROCESS_QUEUE


def _forked_writer_queue() -> None:
    """For asynchronous saves, whose writer is a process forked by megatron's
    TemporalAsyncCaller: a multiprocessing queue made before the fork (the child inherits its
    pipe) carries the results back, again without a manager server process."""
    global _FORK_QUEUE
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _FORK_QUEUE is None:
        _FORK_QUEUE = multiprocessing.get_context("fork").Queue()
    filesystem_async._results_queue = _FORK_QUEUE


class AsyncCheckpointSaver:
    """Asynchronous checkpoint saves through megatron-core's AsyncCallsQueue; every rank holds one
    and makes the same calls in the same order (each call is collective while a save is pending).

    A save scheduled by save_checkpoint(..., async_saver=saver) is written by a forked process;
    `maybe_finalize()` (each step) publishes it once every rank's writer has finished (one integer
    all-reduce per call while a save is pending, none otherwise), `finalize()` waits for it
    (before the next save, at the end of a run or on SIGTERM). `abandon()` only waits for this
    rank's writer and publishes nothing: for errors after which the ranks may not meet again;
    the staging folder left behind is removed on resume and `latest` keeps the previous step.
    """

    def __init__(self) -> None:
        if multiprocessing.current_process().daemon:
            raise CheckpointError(
                "checkpoint.async_save=True needs to fork a writer process, which a daemonic "
                f"process ({multiprocessing.current_process().name}) may not do; run the ranks "
                "with torchrun (or as non-daemonic processes), or set checkpoint.async_save=False"
            )
        self._queue = AsyncCallsQueue(persistent=False)
        self._steps: dict[int, int] = {}  # call index -> step
        self.published: list[int] = []
        """The steps published so far, in order."""

    @property
    def pending(self) -> list[int]:
        """The steps being written (scheduled, not yet published)."""
        return list(self._steps.values())

    def schedule(self, request: Any, step: int) -> None:
        """Start writing a save (collective)."""
        self._steps[self._queue.schedule_async_request(request)] = step

    def maybe_finalize(self, blocking: bool = False) -> list[int]:
        """Publish the saves every rank finished writing (all of them, waiting, when `blocking`);
        returns their steps. Raises megatron's CheckpointException on every rank when some
        rank's writer failed (nothing is published then)."""
        if not self._steps:
            return []
        done = [self._steps.pop(i) for i in self._queue.maybe_finalize_async_calls(blocking)]
        self.published.extend(done)
        return done

    def finalize(self) -> list[int]:
        """Wait for the pending saves and publish them (collective)."""
        return self.maybe_finalize(blocking=True)

    def abandon(self) -> None:
        """Wait for this rank's writers without meeting the other ranks; publish nothing."""
        for call in self._queue.async_calls:
            call.async_caller.close()
        self._queue.async_calls.clear()
        self._steps.clear()
        while _FORK_QUEUE is not None and not _FORK_QUEUE.empty():  # results nobody will read
            _FORK_QUEUE.get_nowait()


def check_finite_weights(model: torch.nn.Module | list[torch.nn.Module], what: str) -> None:
    """Raise NonFiniteWeightsError on every rank when any rank holds a NaN or infinite weight
    (model: a model or the list of its chunks)."""
    params = [p for chunk in _chunks(model) for p in chunk.parameters()]
    bad = torch.zeros(1, dtype=torch.float32, device=params[0].device)
    for param in params:
        if not bool(torch.isfinite(param.detach().sum())):
            bad.fill_(1.0)
            break
    flags = [torch.zeros_like(bad) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, bad)
    ranks = [r for r, flag in enumerate(flags) if float(flag) > 0]
    if ranks:
        raise NonFiniteWeightsError(
            f"{what}: the weights on rank(s) {ranks} hold NaN or infinite values; nothing was "
            "written (the last complete checkpoint is kept)"
        )


def save_checkpoint(
    root: str | os.PathLike,
    *,
    step: int,
    consumed_samples: int,
    model: torch.nn.Module | list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    distributed_optimizer: bool,
    extra: dict[str, Any] | None = None,
    keep_last: int = 0,
    optimizer_format: str | None = None,
    async_saver: AsyncCheckpointSaver | None = None,
) -> Path:
    """Save everything a resumed run needs, atomically (see the module docstring); every rank
    calls it. Returns the checkpoint folder (with `async_saver`, where it will be once published).

    Args:
        model: the model, or the list of its chunks (a virtual pipeline: one sharded state dict
            per chunk).
        keep_last: after publishing, delete all but the newest `keep_last` checkpoints (0 keeps
            them all).
        optimizer_format: the distributed optimizer's format (CheckpointConfig.optimizer_format);
            None: DISTRIB_OPTIM_FORMAT.
        async_saver: write asynchronously through it: the files are written by a forked process
            and published by the saver's maybe_finalize/finalize; a save still pending there is
            published first.

    Raises:
        NonFiniteWeightsError: some rank's weights are not finite (nothing is written).
    """
    root = Path(root)
    path = checkpoint_dir(root, step)
    staging = path.with_name(path.name + TMP_SUFFIX)
    if async_saver is not None:
        async_saver.finalize()  # one save in flight at a time; its staging folder is published
    check_finite_weights(model, f"checkpoint of step {step}")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # left by a save that was killed
            shutil.rmtree(staging)
        staging.mkdir()
    dist.barrier()
    state = _sharded_state_dict(
        model,
        optimizer,
        distributed_optimizer,
        False,
        _rng_state(),
        optimizer_format or DISTRIB_OPTIM_FORMAT,
    )
    state["scheduler"] = scheduler.state_dict()
    state["train_state"] = {
        "step": step,
        "consumed_samples": consumed_samples,
        "layout": _layout(),
        "distributed_optimizer": distributed_optimizer,
        "optimizer_bucket_padding_kept": True,  # (_warn_if_bucket_padding_dropped)
    }
    if extra:
        state["extra"] = extra
    finish = partial(_finish_save, root, staging, path, step, keep_last)
    if async_saver is None:
        _in_process_writer_queue()
        dist_checkpointing.save(state, str(staging))
        finish()
        return path
    _forked_writer_queue()
    request = dist_checkpointing.save(
        state, str(staging), async_sharded_save=True, async_strategy="mcore"
    )
    request.add_finalize_fn(finish)  # after megatron's own: write results gathered, metadata
    async_saver.schedule(request, step)
    return path


def _finish_save(root: Path, staging: Path, path: Path, step: int, keep_last: int) -> None:
    """Once every rank's files are written: publish the checkpoint (rank 0), prune old ones."""
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        _publish(root, staging, path, step)
        if keep_last:
            _prune(root, keep_last, keep=path)
    dist.barrier()


def _publish(root: Path, staging: Path, path: Path, step: int) -> None:
    """Rename the finished staging folder to its final name, then point `latest` at it."""
    fsync_dir(staging)
    if path.exists():  # the same step saved before (a resumed run redoing it): replace it
        old = path.with_name(path.name + OLD_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
        staging.rename(path)
        shutil.rmtree(old)
    else:
        staging.rename(path)
    fsync_dir(root)
    write_latest(root, step)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    folders = [checkpoint_dir(root, s) for s in checkpoint_steps(root)]
    for old in folders[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _warn_if_bucket_padding_dropped(saved: dict, common: dict, path: Path) -> None:
    """Checkpoints saved before _bucket_padding_kept by a run whose gradient reduce overlapped
    (several buckets) may hold Adam's state of other parameters; say so (they still load)."""
    parallel = (common.get("extra") or {}).get("config", {}).get("parallel") or {}
    if saved.get("optimizer_bucket_padding_kept") or not parallel.get("overlap_grad_reduce"):
        return
    if dist.get_rank() == 0:
        warnings.warn(
            f"checkpoint {path} was saved with parallel.overlap_grad_reduce=True by a "
            "megatron_ext that misplaced the distributed optimizer's state of every parameter "
            "after the first DDP bucket (megatron-core's gather drops the padding between "
            "buckets); if its buffers had several buckets, the run resumes with wrong Adam "
            "moments and main weights. Its model weights are right: to start from them alone "
            "(at step 0, with a new optimizer and schedule), set checkpoint.load_optimizer=false",
            stacklevel=2,
        )


def _check_optimizer_compatible(
    saved: dict, distributed_optimizer: bool, optim_format: str, path: Path, saved_ep: int = 1
) -> None:
    """Optimizer state loads only into the same kind of optimizer, and a distributed optimizer's
    saved in the old dp_reshardable format only at the same TP, PP and EP sizes (its keys name
    the optimizers of the chain, which EP=1 and EP > 1 group differently); say so instead of
    failing deep inside megatron."""
    saved_dist = bool(saved.get("distributed_optimizer", False))
    if saved_dist != distributed_optimizer:
        raise CheckpointError(
            f"checkpoint {path} holds {'distributed' if saved_dist else 'non-distributed'} "
            f"optimizer state, but this run uses parallel.distributed_optimizer="
            f"{distributed_optimizer}; use the same setting, or load the weights only "
            "(checkpoint.load_optimizer=False)"
        )
    saved_pp, saved_tp, _ = saved["layout"]
    pp, tp, _ = _layout()
    ep = parallel_state.get_expert_model_parallel_world_size()
    if (
        distributed_optimizer
        and optim_format not in _MODEL_SPACE_FORMATS
        and (saved_pp, saved_tp, saved_ep) != (pp, tp, ep)
    ):
        expert, this_expert = (
            (f", expert={saved_ep}", f", expert={ep}") if (saved_ep, ep) != (1, 1) else ("", "")
        )
        raise CheckpointError(
            f"checkpoint {path} holds distributed-optimizer state in megatron's "
            f"{optim_format!r} format (checkpoint.optimizer_format, or an earlier megatron_ext), "
            f"which resumes only at the sizes it was saved with: pipeline={saved_pp}, "
            f"tensor={saved_tp}{expert} (this run: pipeline={pp}, tensor={tp}"
            f"{this_expert}; the data-parallel size may change). Resume it "
            f"once at pipeline={saved_pp}, tensor={saved_tp}{expert} with "
            f"checkpoint.optimizer_format={DISTRIB_OPTIM_FORMAT!r} (the default): the checkpoints "
            "that run saves load at any layout; or load the weights "
            f"only (checkpoint.load_optimizer=False, with checkpoint.load_dir={path.parent} and "
            "another save_dir)"
        )


def _check_same_architecture(common: dict, model_config: dict[str, Any], path: Path) -> None:
    saved = (common.get("extra") or {}).get("config", {}).get("model")
    if saved is None:
        return  # saved without its configuration: megatron's shape checks are all we have
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}

    def value(config: dict[str, Any], name: str) -> Any:
        # A field the config predates has its default; JSON gives lists for tuples.
        found = config.get(name, defaults[name])
        return tuple(found) if isinstance(found, list) else found

    diffs = [
        f"{name}: checkpoint {value(saved, name)!r}, this run {value(model_config, name)!r}"
        for name in ModelConfig.weight_shape_fields()
        if value(saved, name) != value(model_config, name)
    ]
    if diffs:
        names = (saved.get("name"), model_config.get("name"))
        which = f" ({names[0]!r}, this run {names[1]!r})" if names[0] != names[1] else ""
        raise CheckpointError(
            f"checkpoint {path} is of another model{which}; differing fields:\n  - "
            + "\n  - ".join(diffs)
            + "\nuse the model configuration it was trained with, or another checkpoint.load_dir"
        )


def load_checkpoint(
    root: str | os.PathLike,
    *,
    model: torch.nn.Module | list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    distributed_optimizer: bool,
    load_optimizer: bool = True,
    step: int | None = None,
    model_config: dict[str, Any] | None = None,
) -> TrainState:
    """Load the checkpoint of `step` (default: the latest) into the model, and, with
    `load_optimizer`, into the optimizer, scheduler and RNGs. Returns the saved progress.

    The model and optimizer may be loaded at another parallel layout than they were saved with,
    virtual pipeline included (megatron reshards; Adam's state too, also with the distributed
    optimizer, except from a checkpoint in the old dp_reshardable format, which only changes the
    data-parallel size); RNG states are restored only when the layout is the same.

    Args:
        model: the model, or the list of its chunks.
        model_config: the ModelConfig fields of the run (dataclasses.asdict); when given, a
            checkpoint of a model with other weight shapes is refused before anything is read.

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: unreadable checkpoint, one of another model, or optimizer state that
            cannot load into this optimizer at this layout.
    """
    if step is None:
        step = latest_step(root)
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {root} (no '{LATEST}' file)")
    path = checkpoint_dir(root, step)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {path} does not exist (folders under {root}: "
            f"{step_folders(root) or 'none'}); pass checkpoint.load_step=<one of them>"
        )
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
        saved = common["train_state"]
    except Exception as exc:  # a file missing, truncated or from another program
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}; resume from an earlier "
            f"step with checkpoint.load_step (folders: {step_folders(root)})"
        ) from exc
    if model_config is not None:
        _check_same_architecture(common, model_config, path)
    if load_optimizer and saved.get("weights_only", False):
        raise CheckpointError(
            f"checkpoint {path} holds weights only (no optimizer, scheduler or data position: "
            "e.g. a Hugging Face model imported with tools/import_hf.py); start from it with "
            "checkpoint.init_from (--init-from), or with checkpoint.load_optimizer=false"
        )
    same_layout = tuple(saved["layout"]) == _layout()
    optim_format = DISTRIB_OPTIM_FORMAT
    if load_optimizer and distributed_optimizer:
        # (every distributed-optimizer checkpoint megatron-core 0.19 writes names its format;
        # without one, the format megatron_ext saved first)
        optim_format = _saved_optimizer_format(common) or "dp_reshardable"
    if load_optimizer:
        saved_parallel = (common.get("extra") or {}).get("config", {}).get("parallel") or {}
        saved_ep = int(saved_parallel.get("expert", 1))
        _check_optimizer_compatible(saved, distributed_optimizer, optim_format, path, saved_ep)
    if load_optimizer and distributed_optimizer and optim_format == "fully_reshardable":
        _warn_if_bucket_padding_dropped(saved, common, path)
    want_rng = load_optimizer and same_layout
    if load_optimizer and distributed_optimizer:
        _materialize_distributed_adam_state(optimizer)
    request = _sharded_state_dict(
        model,
        optimizer if load_optimizer else None,
        distributed_optimizer,
        True,
        _rng_state() if want_rng else None,
        optim_format,
    )
    loaded = dist_checkpointing.load(request, str(path))
    chunks = _chunks(model)
    for key, chunk in zip(_model_keys(len(chunks)), chunks, strict=True):
        unwrap_model(chunk).load_state_dict(loaded[key])
    if load_optimizer:
        optimizer_state = loaded["optimizer"]
        if distributed_optimizer and optim_format in _MODEL_SPACE_FORMATS:
            optimizer_state = _optimizer_state_regrouped(optimizer_state, optimizer)
        # no_grad: with fp32 parameters the distributed optimizer's main params are views of the
        # model's leaf parameters, which megatron's loaders copy into in place.
        with torch.no_grad(), _adam_step_kept_on_load(optimizer):
            optimizer.load_state_dict(optimizer_state)
        if distributed_optimizer:
            _restore_distributed_adam_steps(optimizer)
        scheduler.load_state_dict(loaded["scheduler"])
        if want_rng:
            _set_rng_state(loaded["rng"])
    else:
        # Mixed-precision optimizers keep fp32 main weights: copy the loaded weights into them.
        optimizer.reload_model_params()
    return TrainState(
        step=int(saved["step"]),
        consumed_samples=int(saved["consumed_samples"]),
        layout=tuple(saved["layout"]),
    )
