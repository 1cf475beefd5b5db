"""Training and validation batches from indexed token data through megatron-core's GPTDataset.

The data order is a pure function of the number of samples consumed: the global batch that starts
at sample `c` holds GPTDataset samples c, c+1, ..., c+global_batch_size-1 (the dataset itself is
shuffled by megatron with `DataConfig.seed`), and data-parallel rank r takes the r-th contiguous
slice of it, in micro-batches. Restoring `consumed_samples` from a checkpoint therefore restores
the data position exactly: no sample is repeated or skipped.

`BatchLoader` reads them as megatron's training loop does: a torch DataLoader over a batch
sampler that starts at the consumed samples (`PlanSampler`, megatron's pretraining sampler with
this project's slicing), with worker processes, pinned memory and prefetch as `DataConfig` says.
The order is the sampler's whatever the number of workers, so a run reads the same samples with
and without them. Only the ranks that use the input read it: the first and last pipeline stages
(tokens, labels and loss mask); the stages between only learn the sample indices. Within a
tensor-parallel group, which needs the same batch on every rank, only TP rank 0 reads, and
broadcasts each micro-batch to the others (as megatron's training loop does), so a node's TP
ranks read the data once, not TP times.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.data
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_ext.data.errors import DataError
from megatron_ext.training.config import DataConfig, TrainConfig

__all__ = [
    "BatchLoader",
    "BatchPlan",
    "LoaderSettings",
    "MicroBatch",
    "PlanSampler",
    "TokenIds",
    "build_datasets",
]


class TokenIds:
    """The two token facts GPTDataset needs from a tokenizer (vocabulary size, end-of-document id).

    The data were tokenized beforehand (tools/preprocess_data.py), so the trainer does not load a
    tokenizer; `unique_identifiers` lets megatron hash the dataset configuration for its cache.
    """

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = {"class": "TokenIds", "vocab_size": vocab_size, "eod": eod}


def build_datasets(
    config: TrainConfig, *, is_built_on_rank: bool = True
) -> tuple[GPTDataset, GPTDataset | None]:
    """The training and validation GPTDatasets (blends when several paths are given).

    Sizes: train_steps * global_batch_size training samples (megatron adds epochs as needed) and
    eval_iters * global_batch_size validation samples, the same ones at every validation.
    """
    data, model = config.data, config.model
    blend = (list(data.paths), list(data.weights) if data.weights else None)
    gpt_config = GPTDatasetConfig(
        random_seed=data.seed,
        sequence_length=config.sequence_length,
        blend=blend,
        split=data.split,
        path_to_cache=data.cache_dir,
        tokenizer=TokenIds(model.vocab_size, data.eod_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    gbs = config.global_batch_size
    valid_samples = config.eval_iters * gbs if config.eval_interval else 0
    sizes = [config.train_steps * gbs, valid_samples, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: is_built_on_rank, gpt_config
    ).build()
    if train is None:
        raise ValueError(f"the data split {data.split!r} leaves no training data")
    if config.eval_interval and valid is None:
        raise ValueError(
            f"eval_interval={config.eval_interval} but the data split {data.split!r} leaves no "
            "validation data"
        )
    return train, valid


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of this rank (its tensors are None on a rank that reads no input)."""

    tokens: torch.Tensor | None
    """[b, s] input token ids."""
    labels: torch.Tensor | None
    """[b, s] next-token ids."""
    loss_mask: torch.Tensor | None
    """[b, s] 1.0 where the position counts in the loss."""
    position_ids: torch.Tensor | None
    """[b, s] positions for RoPE."""
    sample_indices: tuple[int, ...]
    """Indices of the samples in the dataset (for checking the data order)."""

    def _map(self, fn) -> MicroBatch:
        return dataclasses.replace(
            self,
            **{k: fn(getattr(self, k)) for k in _TENSOR_FIELDS if getattr(self, k) is not None},
        )

    def pin_memory(self) -> MicroBatch:
        """The micro-batch in pinned host memory (the DataLoader's pin-memory thread calls it)."""
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device | str) -> MicroBatch:
        """The micro-batch on `device` (asynchronous copies from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=True))


_TENSOR_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which samples a data-parallel rank reads for the global batch starting at a given sample."""

    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    @property
    def local_batch_size(self) -> int:
        """Samples per global batch on this rank."""
        return self.global_batch_size // self.dp_size

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per global batch on this rank."""
        return self.local_batch_size // self.micro_batch_size

    def sample_indices(self, consumed_samples: int) -> list[list[int]]:
        """Per micro-batch, the dataset indices this rank reads for the batch at consumed_samples."""
        start = consumed_samples + self.dp_rank * self.local_batch_size
        mbs = self.micro_batch_size
        return [
            list(range(start + m * mbs, start + (m + 1) * mbs))
            for m in range(self.num_microbatches)
        ]

    def micro_batches(
        self, dataset: GPTDataset, consumed_samples: int, device: torch.device
    ) -> list[MicroBatch]:
        """The micro-batches of this rank for the global batch starting at consumed_samples, read
        in this process (BatchLoader reads the same ones through a DataLoader)."""
        samples = _Samples(dataset)
        return [
            _collate([samples[i] for i in indices]).to(device)
            for indices in self.sample_indices(consumed_samples)
        ]


class PlanSampler(torch.utils.data.Sampler[list[int]]):
    """megatron's pretraining batch sampler for a BatchPlan: from `consumed_samples` up to
    `total_samples`, one list of dataset indices per micro-batch of this data-parallel rank, in
    training order (`BatchPlan.sample_indices` of each global batch in turn)."""

    def __init__(self, plan: BatchPlan, consumed_samples: int, total_samples: int) -> None:
        self.plan = plan
        self.consumed_samples = consumed_samples
        self.total_samples = total_samples

    def __iter__(self) -> Iterator[list[int]]:
        for consumed in range(
            self.consumed_samples, self.total_samples, self.plan.global_batch_size
        ):
            yield from self.plan.sample_indices(consumed)

    def __len__(self) -> int:
        batches = -(-(self.total_samples - self.consumed_samples) // self.plan.global_batch_size)
        return max(batches, 0) * self.plan.num_microbatches


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
    """How a rank's DataLoader reads (DataConfig's options, resolved for the device)."""

    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int = 2
    persistent_workers: bool = True

    @classmethod
    def resolve(cls, data: DataConfig, device: torch.device | str) -> LoaderSettings:
        """DataConfig's options with their defaults filled in for `device` (None: 2 workers and
        pinned memory on CUDA, in-process reading on CPU)."""
        cuda = torch.device(device).type == "cuda"
        workers = data.num_workers if data.num_workers is not None else (2 if cuda else 0)
        pin = data.pin_memory if data.pin_memory is not None else cuda
        return cls(workers, pin and cuda, data.prefetch_factor, data.persistent_workers)


class BatchLoader:
    """This rank's micro-batches, one global batch at a time, from a torch DataLoader.

    Iterating yields the list of micro-batches of each global batch from `consumed_samples` up to
    `total_samples`, on `device`. With `reads=False` (a pipeline stage between the first and the
    last) nothing is read: the micro-batches carry only their sample indices. With `tp_group`
    (more than one rank) only its rank 0 reads; every micro-batch is broadcast from it to the
    group's other ranks, whose iterations must run in step with its own (each micro-batch is one
    broadcast; `sample_shape` is its [b, s]). A failure in a worker (an exception, or a worker
    killed) is raised as a DataError naming the batch, on the group's other ranks too.
    """

    def __init__(
        self,
        dataset: GPTDataset,
        plan: BatchPlan,
        *,
        consumed_samples: int,
        total_samples: int,
        device: torch.device | str,
        settings: LoaderSettings,
        reads: bool = True,
        tp_group: dist.ProcessGroup | None = None,
        sample_shape: tuple[int, int] | None = None,
        name: str = "training",
    ) -> None:
        self.plan, self.device, self.reads, self.name = plan, device, reads, name
        self.consumed_samples = consumed_samples
        self.sampler = PlanSampler(plan, consumed_samples, total_samples)
        self.loader: torch.utils.data.DataLoader | None = None
        self.tp_group = tp_group if reads and tp_group is not None and tp_group.size() > 1 else None
        if self.tp_group is not None and sample_shape is None:
            raise ValueError("BatchLoader(tp_group=...) needs sample_shape=(micro-batch, seq)")
        self.sample_shape = sample_shape
        self._tp_source = None if self.tp_group is None else dist.get_global_rank(self.tp_group, 0)
        if reads and (self.tp_group is None or self.tp_group.rank() == 0):
            workers = settings.num_workers
            self.loader = torch.utils.data.DataLoader(
                _Samples(dataset),
                batch_sampler=self.sampler,
                num_workers=workers,
                collate_fn=_collate,
                pin_memory=settings.pin_memory,
                worker_init_fn=_worker_init if workers else None,
                prefetch_factor=settings.prefetch_factor if workers else None,
                persistent_workers=settings.persistent_workers and workers > 0,
            )
        self._iterator: Iterator[MicroBatch] | None = None

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        """The global batches in order (a fresh pass from `consumed_samples` each time)."""
        source: Iterator[Any]
        if self.loader is None:
            source = (_indices_only(indices) for indices in self.sampler)
        else:
            source = self._iterator = iter(self.loader)
        consumed, per_batch = self.consumed_samples, self.plan.num_microbatches
        while True:
            batch = []
            for _ in range(per_batch):
                try:
                    micro = next(source)
                except StopIteration:
                    if batch:
                        raise RuntimeError(f"{self.name} data ended inside a global batch")
                    return
                except Exception as exc:
                    if self.tp_group is not None:
                        self._broadcast(None, consumed)  # the group's other ranks raise too
                    raise self._failure(consumed, exc) from exc
                if self.loader is not None:
                    micro = micro.to(self.device)
                if self.tp_group is not None:
                    micro = self._broadcast(micro, consumed)
                    assert micro is not None
                batch.append(micro)
            yield batch
            consumed += self.plan.global_batch_size

    def _broadcast(self, micro: MicroBatch | None, consumed: int) -> MicroBatch | None:
        """The micro-batch as TP rank 0 read it (`micro` there; None: its read failed), on every
        rank of the group. One int64 tensor: a flag, then tokens, labels, positions and the
        loss mask's float32 bits."""
        assert self.tp_group is not None and self.sample_shape is not None
        b, s = self.sample_shape
        packed = torch.zeros(1 + 4 * b * s, dtype=torch.int64, device=self.device)
        fields = packed[1:].view(4, b, s)
        reader = self.loader is not None
        if reader and micro is not None:
            assert micro.loss_mask is not None and micro.loss_mask.dtype == torch.float32
            packed[0] = 1
            for i, key in enumerate(("tokens", "labels", "position_ids")):
                fields[i].copy_(getattr(micro, key))
            fields[3].copy_(micro.loss_mask.view(torch.int32))
        dist.broadcast(packed, self._tp_source, group=self.tp_group)
        if reader:
            return micro  # (None after a failed read: the caller raises)
        if int(packed[0]) == 0:  # (a host synchronisation, while a step's batches are fetched)
            raise DataError(
                f"tensor-parallel rank 0 of this rank's group (global rank {self._tp_source}), "
                f"which reads the data for it, failed while the {self.name} batch at "
                f"consumed_samples={consumed} was read; its own error says why"
            )
        assert micro is not None  # the indices, from this rank's sampler
        return dataclasses.replace(
            micro,
            tokens=fields[0],
            labels=fields[1],
            position_ids=fields[2],
            loss_mask=fields[3].to(torch.int32).view(torch.float32),
        )

    def _failure(self, consumed: int, exc: Exception) -> DataError:
        where = "a data-loader worker" if self.loader and self.loader.num_workers else "reading"
        indices = [i for m in self.plan.sample_indices(consumed) for i in m]
        return DataError(
            f"{where} failed while the {self.name} batch at consumed_samples={consumed} was read "
            f"(this rank's samples {indices[0]}..{indices[-1]}): {type(exc).__name__}: {exc}"
            "\nRerun with data.num_workers=0 (--num-workers 0) to read in the training process "
            "and see the error where it happens"
        )

    def close(self) -> None:
        """Stop the worker processes now (they would otherwise stop when garbage-collected)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.loader = None


class _Samples(torch.utils.data.Dataset):
    """The dataset's samples by index, wrapping around its length (megatron sizes GPTDataset for
    the run, but a longer run over the same cache reads it again from the start)."""

    def __init__(self, dataset: GPTDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        return index, self.dataset[index % len(self.dataset)]


def _worker_init(worker_id: int) -> None:
    # A SIGTERM to the job's process group is the training process's to handle (it finishes its
    # step and saves); the workers stop when it shuts them down or dies.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _indices_only(indices: list[int]) -> MicroBatch:
    return MicroBatch(None, None, None, None, sample_indices=tuple(indices))


def _collate(samples: list[tuple[int, dict[str, Any]]]) -> MicroBatch:
    def stack(key: str) -> torch.Tensor:
        return torch.stack([s[key] for _, s in samples])

    return MicroBatch(
        tokens=stack("tokens"),  # [b, s]
        labels=stack("labels"),  # [b, s]
        loss_mask=stack("loss_mask"),  # [b, s]
        position_ids=stack("position_ids"),  # [b, s]
        sample_indices=tuple(i for i, _ in samples),
    )
