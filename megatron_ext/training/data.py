"""Training and validation batches from indexed token data through megatron-core's GPTDataset.

The data order is a pure function of the number of samples consumed: the global batch that starts
at sample `c` holds GPTDataset samples c, c+1, ..., c+global_batch_size-1 (the dataset itself is
shuffled by megatron with `DataConfig.seed`), and data-parallel rank r takes the r-th contiguous
slice of it, in micro-batches. Restoring `consumed_samples` from a checkpoint therefore restores
the data position exactly: no sample is repeated or skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_ext.training.config import TrainConfig

__all__ = ["BatchPlan", "MicroBatch", "TokenIds", "build_datasets"]


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
    """One micro-batch of this rank."""

    tokens: torch.Tensor
    """[b, s] input token ids."""
    labels: torch.Tensor
    """[b, s] next-token ids."""
    loss_mask: torch.Tensor
    """[b, s] 1.0 where the position counts in the loss."""
    position_ids: torch.Tensor
    """[b, s] positions for RoPE."""
    sample_indices: tuple[int, ...]
    """Indices of the samples in the dataset (for checking the data order)."""


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
        """The micro-batches of this rank for the global batch starting at consumed_samples."""
        out = []
        for indices in self.sample_indices(consumed_samples):
            samples = [dataset[i % len(dataset)] for i in indices]
            out.append(_collate(samples, tuple(indices), device))
        return out


def _collate(samples: list[dict[str, Any]], indices: tuple[int, ...], device) -> MicroBatch:
    def stack(key: str) -> torch.Tensor:
        return torch.stack([s[key] for s in samples]).to(device, non_blocking=True)

    return MicroBatch(
        tokens=stack("tokens"),  # [b, s]
        labels=stack("labels"),  # [b, s]
        loss_mask=stack("loss_mask"),  # [b, s]
        position_ids=stack("position_ids"),  # [b, s]
        sample_indices=indices,
    )
