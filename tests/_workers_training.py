"""Per-rank functions of the trainer tests (run on the gloo pools)."""

from __future__ import annotations

from typing import Any


def train(config) -> dict[str, Any]:
    """pretrain(config) on this rank; the result as plain values."""
    from megatron_ext.training import pretrain

    result = pretrain(config)
    return {
        "records": result.records,
        "sample_indices": result.sample_indices,
        "start_step": result.start_step,
        "final_step": result.final_step,
    }


def gloo_threads() -> int:
    """This process's gloo threads (each gloo process group alive keeps three)."""
    import os

    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().startswith(("gloo", "pt_gloo"))
        except OSError:  # the thread ended meanwhile
            pass
    return count


def train_and_report_buckets(config) -> dict[str, Any]:
    """As `train`, plus the number of DDP bucket groups, this rank's final weights (one flat
    fp32 tensor, in parameter order), read after the run returned, its gloo threads before the
    run and after the session closed, and, with the distributed optimizer, the length of
    megatron's gathered optimizer state with the buffer's unpadded and padded lengths."""
    import gc

    import torch

    from megatron_ext.training.trainer import trainer_session

    threads_before = gloo_threads()  # the pool collected the garbage of earlier checks
    with trainer_session(config) as trainer:
        result = trainer.run()
        buckets = sum(len(chunk.bucket_groups) for chunk in trainer.model)
        weights = torch.cat(
            [p.detach().float().flatten() for c in trainer.model for p in c.parameters()]
        )
        gathered = _gathered_optimizer_numel(trainer.optimizer)
    del trainer
    gc.collect()
    return {
        "records": result.records,
        "bucket_groups": buckets,
        "weights": weights,
        "gloo_threads": (threads_before, gloo_threads()),
        "gathered_numel": gathered,
    }


def _gathered_optimizer_numel(optimizer) -> tuple[int, int, int] | None:
    """What megatron's own gather of the distributed optimizer's state returns: its length, with
    the buffer's unpadded and padded lengths (see checkpoint._bucket_padding_kept); None without
    a distributed optimizer. (A function of its own: its locals hold the optimizer.)"""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer):
            state = DistributedOptimizer.get_parameter_state_dp_zero(
                sub, use_gloo_comm=True, return_on_all_ranks=True
            )
            numel = next(iter(state[0].values()))["param"].numel()
            return numel, sub.buffers[0].numel_unpadded, sub.buffers[0].numel
    return None


def train_with_adam_moments_zeroed_after_load(config) -> dict[str, Any]:
    """train(config) with Adam's moments zeroed right after the checkpoint loads (weights, step,
    schedule and data position kept): what a resume that lost the moments would do."""
    from unittest import mock

    from megatron_ext.training import trainer

    original = trainer.load_checkpoint

    def load_then_zero_moments(*args, **kwargs):
        state = original(*args, **kwargs)
        optimizer = kwargs["optimizer"]
        for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
            for param_state in sub.optimizer.state.values():
                param_state["exp_avg"].zero_()
                param_state["exp_avg_sq"].zero_()
        return state

    with mock.patch.object(trainer, "load_checkpoint", load_then_zero_moments):
        return train(config)


def train_without_adam_step_workaround(config) -> str | None:
    """train(config) with checkpoint._adam_step_kept_on_load switched off: the KeyError it raises
    (as text), or None when the run went through."""
    import contextlib
    from unittest import mock

    from megatron_ext.training import checkpoint

    unpatched = mock.patch.object(
        checkpoint, "_adam_step_kept_on_load", lambda optimizer: contextlib.nullcontext()
    )
    with unpatched:
        try:
            train(config)
        except KeyError as exc:
            return f"KeyError: {exc}"
    return None


def train_and_count_children(config) -> dict[str, Any]:
    """As `train`, plus the child processes (data-loader workers) this rank has left once the
    run returned."""
    import multiprocessing

    result = train(config)
    result["children"] = [p.pid for p in multiprocessing.active_children()]
    return result


class _RaisingSamples:
    """A dataset whose sample `bad` raises OSError."""

    def __init__(self, dataset, bad: int) -> None:
        self.dataset, self.bad = dataset, bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index == self.bad:
            raise OSError(f"cannot read sample {index}")
        return self.dataset[index]


def tp2_loader_batches(config, bad: int | None = None) -> dict[str, Any]:
    """At TP=2 (the pool's two ranks one tensor-parallel group): whether this rank reads, and
    the global batches its BatchLoader yields (each micro-batch's tensors and indices), or the
    DataError it raised; with `bad`, TP rank 0's sample `bad` cannot be read."""
    import torch
    from megatron.core import parallel_state

    from megatron_ext.core.parallel import model_parallel
    from megatron_ext.data.errors import DataError
    from megatron_ext.training.data import BatchLoader, BatchPlan, LoaderSettings, build_datasets

    with model_parallel(tensor=2):
        group = parallel_state.get_tensor_model_parallel_group()
        train_data, _ = build_datasets(config)
        if bad is not None and group.rank() == 0:
            train_data = _RaisingSamples(train_data, bad)
        plan = BatchPlan(global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1)
        loader = BatchLoader(
            train_data,
            plan,
            consumed_samples=4,
            total_samples=16,
            device="cpu",
            settings=LoaderSettings(num_workers=0),
            tp_group=group,
            sample_shape=(2, config.model.seq_length),
        )
        out: dict[str, Any] = {"reads": loader.loader is not None, "error": None, "batches": []}
        try:
            for batch in loader:
                out["batches"].append(
                    [
                        (m.sample_indices, m.tokens, m.labels, m.loss_mask, m.position_ids)
                        for m in batch
                    ]
                )
        except DataError as exc:
            out["error"] = str(exc)
        loader.close()
        torch.distributed.barrier()
    return out
