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
