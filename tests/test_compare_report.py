"""The comparison report over seeds on synthetic metrics records (no training): the t quantiles,
the intervals against hand-computed values, the entropy-ordering verdicts, one seed, --seeds 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.loss import RewardShapingConfig
from run_configs.report import write_report
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


# -- the report from metrics files ----------------------------------------------------------------


def _write_run(folder: Path, *, ce: float, entropy: float, topk: float, steps: int = 20) -> Path:
    """A run's logs/metrics.jsonl: training records every step, validations at 10 and 20 whose
    last one holds the given CE, entropy and top-k mass (p(x) = 0.1 + topk / 10)."""
    path = folder / "logs" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        late = step / steps  # the earlier validation is further from the final values
        rec = {"step": step, "loss": ce + 1, "ce_loss": ce + 1, "ppl": math.exp(ce + 1)}
        rec.update(entropy=entropy + 1, target_prob=0.05, topk_mass=topk / 2)
        if step % 10 == 0:
            rec.update(val_loss=ce, val_ce_loss=ce + 1 - late, val_ppl=math.exp(ce + 1 - late))
            rec.update(val_entropy=entropy + 1 - late, val_target_prob=0.1 + topk / 10)
            rec.update(val_topk_mass=topk)
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return folder


# The last validation per preset and seed: (CE, entropy, top-k mass) for 3 seeds each.
SEEDS = {
    "ce": [(4.0, 3.0, 0.6), (4.2, 3.1, 0.7), (4.4, 3.2, 0.8)],
    "precision": [(4.1, 2.0, 0.7), (4.2, 2.1, 0.7), (4.3, 2.2, 0.7)],
    "diversity": [(4.1, 3.05, 0.6), (4.2, 3.15, 0.6), (4.3, 3.25, 0.6)],
    "tail_suppression": [(4.1, 3.7, 0.6), (4.2, 3.8, 0.6), (4.3, 3.9, 0.6)],
}
HALF_3 = 0.248414  # t(0.975, 2) * s / sqrt(3) with s = 0.1: 4.302653 * 0.1 / 1.7320508


def _cells(markdown: str, section: str, first: str) -> list[str]:
    body = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    (row,) = [line for line in body.splitlines() if line.startswith(f"| {first} |")]
    return [c.strip() for c in row.strip("|").split("|")]


def test_report_over_three_seeds(tmp_path, capsys):
    from run_configs.cli import main

    argv = ["report"]
    for preset, seeds in SEEDS.items():
        for i, (ce, entropy, topk) in enumerate(seeds):
            folder = _write_run(tmp_path / preset / f"seed{1234 + i}", ce=ce, entropy=entropy,
                                topk=topk)  # fmt: skip
            argv.append(f"{preset}={folder}")
    assert main([*argv, "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert md in capsys.readouterr().out

    ce = _cells(md, "Over seeds", "`ce`")
    assert ce[:6] == ["`ce`", "0", "0", "0", "-", "3"]
    assert ce[6] == f"4.2000 [{4.2 - 2 * HALF_3:.4f}, {4.2 + 2 * HALF_3:.4f}]"  # s = 0.2
    ppl = (math.exp(4.2), math.exp(4.2 - 2 * HALF_3), math.exp(4.2 + 2 * HALF_3))
    assert ce[7] == "{:.2f} [{:.2f}, {:.2f}]".format(*ppl)
    assert ce[8] == "3.100 [2.852, 3.348]"
    assert ce[9] == f"0.1700 [{0.17 - HALF_3 / 10:.4f}, {0.17 + HALF_3 / 10:.4f}]"
    assert ce[10] == "0.7000 [0.4516, 0.9484]"
    assert ce[11] == "0.3000 [0.0516, 0.5484]"  # tail mass = 1 - top-k mass
    # equal seeds give a zero-width interval, not a missing one
    assert _cells(md, "Over seeds", "`precision`")[10] == "0.7000 [0.7000, 0.7000]"

    verdicts = {
        tuple(_cells(md, "Entropy ordering", f"`{a}` {op} `{b}`")[:2])
        for a, op, b in [
            ("precision", "<", "ce"),
            ("ce", "<", "diversity"),
            ("tail_suppression", "<", "ce"),
            ("precision", "<", "diversity"),
            ("precision", "vs", "tail_suppression"),
            ("tail_suppression", "<", "diversity"),
        ]
    }
    assert verdicts == {
        ("`precision` < `ce`", HOLDS),
        ("`ce` < `diversity`", NOT_RESOLVED),  # 3.100 [2.852, 3.348] vs 3.150 [2.902, 3.398]
        ("`tail_suppression` < `ce`", REVERSED),  # 3.800 [3.552, 4.048] above ce
        ("`precision` < `diversity`", HOLDS),
        ("`precision` vs `tail_suppression`", NO_EXPECTATION),
        ("`tail_suppression` < `diversity`", REVERSED),
    }
    assert _cells(md, "Entropy ordering", "`precision` < `ce`")[2:] == [
        "2.100 [1.852, 2.348]",
        "3.100 [2.852, 3.348]",
    ]
    # every seed is a row of the runs table, named by its folder
    runs = [line for line in md.split("## Runs\n", 1)[1].splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in runs[:3]] == [
        "`ce` seed1234", "`ce` seed1235", "`ce` seed1236"
    ]  # fmt: skip
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(summary["runs"]) == 12 and len(summary["entropy_order"]) == 6
    over = {s["name"]: s for s in summary["over_seeds"]}
    assert over["ce"]["seeds"] == 3 and over["ce"]["source"] == "val"
    assert over["ce"]["metrics"]["entropy"]["low"] == pytest.approx(3.1 - HALF_3, abs=1e-6)
    assert (tmp_path / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_with_one_seed_says_there_is_no_interval(tmp_path):
    runs = {
        preset: _write_run(tmp_path / preset, ce=seeds[0][0], entropy=seeds[0][1], topk=seeds[0][2])
        for preset, seeds in SEEDS.items()
    }
    paths = write_report(runs, tmp_path / "report")
    md = paths.markdown.read_text()
    assert "One seed per preset, so there is no interval over seeds" in md
    assert _cells(md, "Over seeds", "`ce`")[5:9] == ["1", "4.0000", f"{math.exp(4.0):.2f}", "3.000"]
    assert {v.verdict for v in paths.verdicts if v.expected} == {NOT_RESOLVED}
    assert "seed" not in paths.table  # one run per preset: today's table, rows named by preset
    rows = [line for line in paths.table.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == [f"`{p}`" for p in SEEDS]


def test_report_refuses_a_name_without_runs(tmp_path):
    with pytest.raises(ValueError, match="no runs given for ce"):
        write_report({"ce": []}, tmp_path)


def test_compare_refuses_zero_seeds(tmp_path, capsys):
    from run_configs.cli import main

    assert main(["compare", "--seeds", "0", "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "error: --seeds 0: a comparison needs at least one seed per preset" in err
    assert "pass --seeds 1" in err
