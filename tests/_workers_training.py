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


def train_and_report_buckets(config) -> dict[str, Any]:
    """As `train`, plus the number of DDP bucket groups and this rank's final weights (one flat
    fp32 tensor, in parameter order), read after the run returned."""
    import torch

    from megatron_ext.training.trainer import trainer_session

    with trainer_session(config) as trainer:
        result = trainer.run()
        buckets = len(trainer.model.bucket_groups)
        weights = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
    return {"records": result.records, "bucket_groups": buckets, "weights": weights}
