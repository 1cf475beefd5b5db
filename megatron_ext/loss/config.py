"""Configuration of the reward-shaped next-token objective."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

__all__ = ["RewardShapingConfig", "PRESETS"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardShapingConfig:
    """Reward of the generalized next-token objective (arXiv 2512.22955, objective.md section 2).

    beta = lambda_head = lambda_tail = 0 is standard cross-entropy.
    """

    beta: float = 0.0
    """Positive-reward exponent: < 0 sharpens (precision), > 0 flattens (diversity)."""
    lambda_head: float = 0.0
    """Reward of negative tokens inside the top-k set of the predicted distribution."""
    lambda_tail: float = 0.0
    """Reward of negative tokens outside the top-k set."""
    top_k: int = 100
    """Size of the top-k set (ties at the k-th logit are all inside it)."""

    PRESET_NAMES: ClassVar[tuple[str, ...]] = (
        "ce",
        "precision",
        "diversity",
        "tail_suppression",
        "head_preservation",
    )

    def __post_init__(self) -> None:
        for name in ("beta", "lambda_head", "lambda_tail"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"RewardShapingConfig.{name} must be a float, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"RewardShapingConfig.{name} must be finite, got {value!r}")
        if not self.beta > -1.0:
            raise ValueError(
                f"RewardShapingConfig.beta={self.beta!r} is out of range: beta must be > -1 so "
                "that the positive weight p**(1 - (1 - p)**beta) stays finite as p -> 1 "
                "(the paper's precision setting is beta=-0.25)"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"RewardShapingConfig.top_k must be an int, got {self.top_k!r}")
        if self.uses_top_k and self.top_k < 1:
            raise ValueError(
                f"RewardShapingConfig.top_k={self.top_k!r} must be >= 1 when lambda_head or "
                "lambda_tail is non-zero (the paper uses top_k=100)"
            )

    @property
    def uses_top_k(self) -> bool:
        """Whether the negative rewards depend on the top-k set (a lambda is non-zero)."""
        return self.lambda_head != 0.0 or self.lambda_tail != 0.0

    @property
    def needs_rank_split(self) -> bool:
        """Whether head and tail negatives get different rewards (the top-k set must be found)."""
        return self.lambda_head != self.lambda_tail

    @property
    def is_cross_entropy(self) -> bool:
        """Whether this configuration is exactly standard cross-entropy."""
        return self.beta == 0.0 and not self.uses_top_k

    @classmethod
    def preset(cls, name: str) -> RewardShapingConfig:
        """A paper setting: ce, precision, diversity, tail_suppression or head_preservation."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown reward-shaping preset {name!r}; choose one of {', '.join(PRESETS)}"
            ) from None


PRESETS: dict[str, RewardShapingConfig] = {
    "ce": RewardShapingConfig(),
    "precision": RewardShapingConfig(beta=-0.25),
    "diversity": RewardShapingConfig(beta=0.5),
    "tail_suppression": RewardShapingConfig(lambda_tail=-0.1, top_k=100),
    "head_preservation": RewardShapingConfig(lambda_head=0.1, top_k=100),
}
assert tuple(PRESETS) == RewardShapingConfig.PRESET_NAMES
