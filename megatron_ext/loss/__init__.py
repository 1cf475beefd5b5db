"""The reward-shaped next-token objective: config, single-device reference, vocab-parallel loss,
and the loss fused with the output layer.

Names are imported on first use (megatron_ext._lazy), so the config alone loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_ext._lazy import lazy_exports

if TYPE_CHECKING:
    from megatron_ext.loss.config import PRESETS, RewardShapingConfig
    from megatron_ext.loss.output import fused_output_shaped_cross_entropy
    from megatron_ext.loss.reference import ShapedLossStats, reference_shaped_cross_entropy
    from megatron_ext.loss.vocab_parallel import vocab_parallel_shaped_cross_entropy

_EXPORTS = {
    "PRESETS": "config",
    "RewardShapingConfig": "config",
    "ShapedLossStats": "reference",
    "fused_output_shaped_cross_entropy": "output",
    "reference_shaped_cross_entropy": "reference",
    "vocab_parallel_shaped_cross_entropy": "vocab_parallel",
}

__all__ = [
    "PRESETS",
    "RewardShapingConfig",
    "ShapedLossStats",
    "fused_output_shaped_cross_entropy",
    "reference_shaped_cross_entropy",
    "vocab_parallel_shaped_cross_entropy",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
