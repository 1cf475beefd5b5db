"""The comparison statistics over seeds (no training): the t quantiles, the intervals against
hand-computed values, the entropy-ordering verdicts, one seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_ext.loss import RewardShapingConfig
from run_configs.seed_stats import (
    HOLDS,
    NO_EXPECTATION,
    NOT_RESOLVED,
    REVERSED,
    Interval,
    entropy_shift,
    entropy_verdicts,
    mean_interval,
    ordering_verdict,
    t_quantile,
)


def _t_cdf(q: float, df: int) -> float:
    """P(T <= q) for q >= 0 by Simpson's rule on the t density (independent of the table)."""
    x = np.linspace(0.0, q, 200_001)
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    y = norm * (1 + x * x / df) ** (-(df + 1) / 2)
    h = x[1] - x[0]
    return 0.5 + h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())


@pytest.mark.parametrize("df", [*range(1, 31), 31, 45, 100, 1000])
def test_t_quantile_is_the_975_quantile(df):
    """The table (df <= 30) and the expansion beyond: P(T <= t) = 0.975 to 1e-6."""
    assert _t_cdf(t_quantile(df), df) == pytest.approx(0.975, abs=1e-6)


def test_t_quantile_refuses_no_degrees_of_freedom():
    with pytest.raises(ValueError, match="degrees of freedom must be an int >= 1, got 0"):
        t_quantile(0)


def test_mean_interval_by_hand():
    # 1, 2, 3: mean 2, s = 1, t(0.975, 2) = 4.302653, half width 4.302653 / sqrt(3) = 2.484138
    iv = mean_interval([1.0, 2.0, 3.0])
    assert (iv.n, iv.mean) == (3, 2.0)
    assert iv.low == pytest.approx(2.0 - 2.484138, abs=1e-6)
    assert iv.high == pytest.approx(2.0 + 2.484138, abs=1e-6)
    # 0.5, 0.7, 0.6, 0.8: mean 0.65, s^2 = 0.05 / 3, s / 2 = 0.0645497, t(3) = 3.182446 -> 0.205426
    iv = mean_interval([0.5, 0.7, 0.6, 0.8])
    assert iv.mean == pytest.approx(0.65, abs=1e-12)
    assert (iv.low, iv.high) == pytest.approx((0.65 - 0.205426, 0.65 + 0.205426), abs=1e-6)
    # identical seeds: a zero-width interval
    assert mean_interval([2.5, 2.5]) == Interval(mean=2.5, n=2, low=2.5, high=2.5)
    # perplexity from CE: exp of the mean and of both ends
    ppl = mean_interval([1.0, 2.0, 3.0]).map(math.exp)
    assert (ppl.mean, ppl.low) == pytest.approx((math.exp(2.0), math.exp(2.0 - 2.484138)))


def test_one_seed_has_no_interval():
    iv = mean_interval([3.25])
    assert (iv.mean, iv.n, iv.low, iv.high, iv.has_interval) == (3.25, 1, None, None, False)
    assert iv.map(math.exp).low is None
    with pytest.raises(ValueError, match="at least one seed"):
        mean_interval([])


def _iv(low: float, high: float, n: int = 3) -> Interval:
    return Interval(mean=(low + high) / 2, n=n, low=low, high=high)


def test_ordering_verdict_needs_intervals_apart():
    assert ordering_verdict(_iv(1.0, 2.0), _iv(2.5, 3.0)) == HOLDS
    assert ordering_verdict(_iv(2.5, 3.0), _iv(1.0, 2.0)) == REVERSED
    assert ordering_verdict(_iv(1.0, 2.6), _iv(2.5, 3.0)) == NOT_RESOLVED  # overlap
    assert ordering_verdict(_iv(1.0, 2.5), _iv(2.5, 3.0)) == NOT_RESOLVED  # touching
    # the means are in order but one side has one seed: nothing is resolved
    one = Interval(mean=1.0, n=1, low=None, high=None)
    assert ordering_verdict(one, _iv(2.5, 3.0)) == NOT_RESOLVED
    assert ordering_verdict(mean_interval([float("nan"), 1.0]), _iv(2.5, 3.0)) == NOT_RESOLVED


def test_entropy_shift_of_the_presets():
    names = RewardShapingConfig.PRESET_NAMES
    shifts = {n: entropy_shift(RewardShapingConfig.preset(n)) for n in names}
    assert shifts == {
        "ce": 0,
        "precision": -1,
        "diversity": 1,
        "tail_suppression": -1,
        "head_preservation": 1,
    }
    assert entropy_shift(RewardShapingConfig(beta=-0.25, lambda_head=0.1)) is None  # terms disagree
    assert entropy_shift(RewardShapingConfig(beta=-0.25, lambda_tail=-0.1)) == -1


def test_entropy_verdicts_orient_each_pair():
    shaping = {n: RewardShapingConfig.preset(n) for n in ("ce", "precision", "tail_suppression")}
    entropy = {
        "ce": _iv(3.0, 3.2),
        "precision": _iv(2.0, 2.2),  # below ce: holds
        "tail_suppression": _iv(3.3, 3.5),  # expected below ce, lies above: reversed
    }
    got = {(v.lower, v.higher): (v.expected, v.verdict) for v in entropy_verdicts(entropy, shaping)}
    assert got == {
        ("precision", "ce"): (True, HOLDS),
        ("tail_suppression", "ce"): (True, REVERSED),
        ("precision", "tail_suppression"): (False, NO_EXPECTATION),  # both lower the entropy
    }
    # a name that is no preset has no expected direction
    (only,) = entropy_verdicts({"ce": _iv(3.0, 3.2), "mine": _iv(1.0, 1.1)}, shaping)
    assert (only.expected, only.verdict) == (False, NO_EXPECTATION)
