"""The job a launcher starts on every rank (NeMo-Run's recipes, run_configs): pretrain(config).

The trainer, and with it torch's and megatron-core's modules, loads only when a rank calls it, so
that a launcher that builds, checks and ships the configuration (on a login node, say) does not
import megatron-core for nothing (4-6 s) and quits as soon as its job does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_ext.training.config import TrainConfig
    from megatron_ext.training.trainer import TrainResult

__all__ = ["pretrain_on_this_rank"]


def pretrain_on_this_rank(config: TrainConfig) -> TrainResult:
    """`megatron_ext.training.pretrain(config)`, in a rank process that ends with it: the
    collections during the run skip the imported modules' objects (megatron_ext.core.heap) and
    its exit skips the final one (megatron_ext.core.shutdown)."""
    from megatron_ext.core.heap import freeze_imported_objects
    from megatron_ext.core.shutdown import skip_final_gc
    from megatron_ext.training.trainer import pretrain

    skip_final_gc()
    freeze_imported_objects()
    return pretrain(config)
