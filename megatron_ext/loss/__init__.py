"""The reward-shaped next-token objective: configuration, single-device reference, vocab-parallel loss."""

from megatron_ext.loss.config import PRESETS, RewardShapingConfig

__all__ = ["PRESETS", "RewardShapingConfig"]
