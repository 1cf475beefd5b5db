"""Statistics over seeds for the preset comparison: means, Student t intervals, ordering verdicts.

Pure functions on numbers (no files, no training); run_configs.report formats them.

The interval of a metric over n seeds is the two-sided 95% Student t interval of its mean,

    mean +- t(0.975, n - 1) * s / sqrt(n),      s = the sample standard deviation (n - 1 divisor),

which assumes the seeds' values are independent draws of a roughly normal quantity. With one seed
there is no interval (s is undefined). t comes from a table for n - 1 = 1..30 (scipy is not a
dependency of this project) and from the Cornish-Fisher expansion beyond 30 (within 2e-6 there).

The entropy-ordering verdict of two presets A and B, where the objective makes A's entropy
expected below B's (`entropy_shift`), compares their entropy intervals:

- "holds": A's interval lies wholly below B's (A.high < B.low);
- "reversed": B's interval lies wholly below A's (B.high < A.low);
- "not resolved": the intervals overlap or touch, or either preset has one seed (no interval).

Two 95% intervals that do not overlap is a stricter test than a two-sample t test at the 5% level,
so "holds" is conservative; "not resolved" says only that these seeds cannot tell, not that the
ordering is false. Pairs whose expected shifts are equal (precision and tail_suppression both
lower the entropy) or unknown get "no expected order".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

__all__ = [
    "HOLDS",
    "NOT_RESOLVED",
    "NO_EXPECTATION",
    "REVERSED",
    "Interval",
    "PairVerdict",
    "entropy_shift",
    "entropy_verdicts",
    "mean_interval",
    "ordering_verdict",
    "t_quantile",
]

HOLDS = "holds"
NOT_RESOLVED = "not resolved"
REVERSED = "reversed"
NO_EXPECTATION = "no expected order"

_T_975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
    2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
    2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
    2.048407, 2.045230, 2.042272,
)  # fmt: skip
"""The 0.975 quantile of Student's t for 1..30 degrees of freedom (6 decimals; the tests check
each against a numerical integration of the t density)."""

_Z_975 = 1.959963984540054
"""The 0.975 quantile of the standard normal."""


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (two-sided 95%).

    A table for df = 1..30; beyond, the Cornish-Fisher expansion of t around the normal quantile
    to the third order in 1/df (Abramowitz and Stegun 26.7.5), within 2e-6 of the exact value.

    Raises:
        ValueError: df < 1.
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an int >= 1, got {df!r}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Interval:
    """A mean over seeds and its 95% Student t interval."""

    mean: float
    """The mean of the seeds' values."""
    n: int
    """How many seeds."""
    low: float | None
    """Lower end of the interval (None with one seed: no interval)."""
    high: float | None
    """Upper end of the interval (None with one seed)."""

    @property
    def has_interval(self) -> bool:
        """Whether there is an interval (two seeds or more)."""
        return self.low is not None and self.high is not None

    def map(self, fn: Callable[[float], float]) -> Interval:
        """The interval of fn(metric) for an increasing fn, e.g. perplexity = exp(CE): fn of the
        mean and of both ends (for exp, the geometric mean of the seeds' perplexities)."""
        return Interval(
            mean=fn(self.mean),
            n=self.n,
            low=None if self.low is None else fn(self.low),
            high=None if self.high is None else fn(self.high),
        )


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of `values` (one per seed) and its two-sided 95% Student t interval.

    Raises:
        ValueError: no values.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("no values to average: a metric needs at least one seed")
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean=mean, n=1, low=None, high=None)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Interval(mean=mean, n=n, low=mean - half, high=mean + half)


def ordering_verdict(lower: Interval, higher: Interval) -> str:
    """Whether `lower` lies below `higher` beyond their intervals: HOLDS when lower.high <
    higher.low, REVERSED when higher.high < lower.low, else NOT_RESOLVED (overlapping or touching
    intervals, a NaN, or a side with one seed)."""
    if not (lower.has_interval and higher.has_interval):
        return NOT_RESOLVED
    if lower.high < higher.low:
        return HOLDS
    if higher.high < lower.low:
        return REVERSED
    return NOT_RESOLVED


class _Shaping(Protocol):
    beta: float
    lambda_head: float
    lambda_tail: float


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def entropy_shift(shaping: _Shaping) -> int | None:
    """The direction a loss moves the predictive entropy from cross-entropy's, as the objective
    describes it (docs/objective.md section 2): -1 lower, 0 none (cross-entropy), +1 higher, None
    when its terms disagree.

    Each non-zero term votes: beta < 0 amplifies the target's reward (lower), beta > 0 attenuates
    it (higher); lambda_head > 0 keeps the top-k alternatives alive (higher), < 0 pushes them down
    (lower); lambda_tail < 0 pushes the tail down (lower), > 0 lifts it (higher).
    """
    votes = {_sign(shaping.beta), _sign(shaping.lambda_head), _sign(shaping.lambda_tail)} - {0}
    if not votes:
        return 0
    return votes.pop() if len(votes) == 1 else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairVerdict:
    """The entropy ordering of two presets."""

    lower: str
    """The preset whose entropy is expected lower (with no expectation: the first of the pair)."""
    higher: str
    """The preset whose entropy is expected higher (with no expectation: the second)."""
    expected: bool
    """Whether the objective predicts an order (entropy_shift differs and is known for both)."""
    verdict: str
    """HOLDS, NOT_RESOLVED or REVERSED; NO_EXPECTATION when `expected` is False."""


def entropy_verdicts(
    entropy: Mapping[str, Interval], shaping: Mapping[str, _Shaping]
) -> list[PairVerdict]:
    """The verdict of every pair of names, in the order of `entropy` (name -> entropy over
    seeds); `shaping` gives each name's loss configuration (a RewardShapingConfig; a name it
    lacks has no expected direction)."""
    names = list(entropy)
    shifts = {n: entropy_shift(shaping[n]) if n in shaping else None for n in names}
    out = []
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = shifts[first], shifts[second]
            if a is None or b is None or a == b:
                out.append(
                    PairVerdict(lower=first, higher=second, expected=False, verdict=NO_EXPECTATION)
                )
                continue
            lower, higher = (first, second) if a < b else (second, first)
            verdict = ordering_verdict(entropy[lower], entropy[higher])
            out.append(PairVerdict(lower=lower, higher=higher, expected=True, verdict=verdict))
    return out
