"""The reward-shaped next-token objective: config, single-device reference, vocab-parallel loss."""

from megatron_ext.loss.config import PRESETS, RewardShapingConfig
from megatron_ext.loss.reference import ShapedLossStats, reference_shaped_cross_entropy
from megatron_ext.loss.vocab_parallel import vocab_parallel_shaped_cross_entropy

__all__ = [
    "PRESETS",
    "RewardShapingConfig",
    "ShapedLossStats",
    "reference_shaped_cross_entropy",
    "vocab_parallel_shaped_cross_entropy",
]
