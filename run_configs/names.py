"""The names the launcher offers (loss presets, recipes, stages), importable without NeMo-Run, so
that `python -m run_configs` checks its arguments before the slow imports."""

from __future__ import annotations

from megatron_ext.loss.config import RewardShapingConfig

__all__ = ["PAPER_MODELS", "PRESETS", "RECIPE_NAMES", "STAGES"]

PRESETS: tuple[str, ...] = RewardShapingConfig.PRESET_NAMES
"""The loss presets, selectable by name in every recipe."""

PAPER_MODELS: tuple[str, ...] = (
    "dense_1b",
    "dense_4b",
    "moe_5b_a0.3b",
    "moe_10b_a0.5b",
    "moe_20b_a1b",
)
"""The paper's models (megatron_ext.models presets)."""

STAGES: tuple[str, ...] = ("pretrain", "midtrain")
"""Training stages a recipe exists for."""

RECIPE_NAMES: tuple[str, ...] = ("tiny", *PAPER_MODELS)
"""Recipe names: the tiny CPU model and the paper's models."""
