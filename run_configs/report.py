"""Compare training runs from the trainer's JSONL metrics: markdown tables and a PNG plot.

Each run folder holds logs/metrics.jsonl (megatron_ext.training's LoggingConfig.log_dir), one
JSON record per logged step with the per-token means of the shaped loss (`loss`), cross-entropy
(`ce_loss`), perplexity (`ppl` = exp(ce_loss)), predictive entropy (`entropy`, nats), target
probability (`target_prob`) and top-k mass (`topk_mass`), plus `val_*` at validation steps.

A name may have several runs, one per seed: the report then gives each metric as the mean over
seeds with its 95% Student t interval, a verdict per pair of presets on whether the entropy
ordering the objective predicts holds beyond the intervals (run_configs.seed_stats defines both),
and the plot shows the spread over seeds as bands.

    python -m run_configs report outputs/compare/ce outputs/compare/precision ... --out DIR
    python -m run_configs report ce=runs/ce/seed1234 ce=runs/ce/seed1235 precision=... --out DIR
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_ext.loss import RewardShapingConfig
from run_configs.seed_stats import Interval, PairVerdict, entropy_verdicts, mean_interval

__all__ = [
    "SEED_METRICS",
    "ReportPaths",
    "RunSummary",
    "SeedSummary",
    "load_metrics",
    "markdown_table",
    "metric_source",
    "over_seeds",
    "plot_runs",
    "seeds_table",
    "summarize",
    "verdict_table",
    "write_report",
]

_TRAIN_WINDOW = 10
"""Training metrics in the table are means over the last this many logged steps (one step's
batch of 16 x 128 tokens is noisy); validation metrics are from the last validation."""


def metrics_path(run: str | Path) -> Path:
    """The metrics file of a run folder (run/logs/metrics.jsonl), or `run` if it is the file."""
    run = Path(run)
    if run.is_file():
        return run
    for candidate in (run / "logs" / "metrics.jsonl", run / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no metrics.jsonl under {str(run)!r} (looked in logs/ and itself)")


def load_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of a run, one per step in step order (a resumed run's later record wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    path = metrics_path(run)
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if "step" not in record:
            raise ValueError(f"{path}:{number}: record without 'step'")
        by_step[int(record["step"])] = record
    if not by_step:
        raise ValueError(f"{path} holds no records")
    return [by_step[s] for s in sorted(by_step)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSummary:
    """The numbers of one run in the comparison table."""

    name: str
    """Run name (the loss preset in the preset comparison)."""
    seed: str | None = None
    """Which of the name's runs this is when it has several: its folder's name (seed1235)."""
    steps: int
    """Last step logged."""
    train: dict[str, float]
    """Means over the last steps: loss, ce_loss, ppl (exp of the mean ce), entropy,
    target_prob, topk_mass."""
    val: dict[str, float]
    """The last validation's loss, ce_loss, ppl, entropy, target_prob, topk_mass (empty if none)."""
    val_step: int | None
    """Step of that validation."""


_FIELDS = ("loss", "ce_loss", "entropy", "target_prob", "topk_mass")


def summarize(
    name: str, records: Sequence[Mapping[str, Any]], seed: str | None = None
) -> RunSummary:
    """A run's summary from its records (see RunSummary)."""
    last = list(records[-_TRAIN_WINDOW:])
    train = {
        k: sum(float(r[k]) for r in last) / len(last) for k in _FIELDS if all(k in r for r in last)
    }
    if "ce_loss" in train:
        train["ppl"] = _exp(train["ce_loss"])
    val: dict[str, float] = {}
    val_step = None
    for record in reversed(records):
        if "val_ce_loss" in record:
            val = {k: float(record[f"val_{k}"]) for k in (*_FIELDS, "ppl") if f"val_{k}" in record}
            val_step = int(record["step"])
            break
    return RunSummary(
        name=name,
        seed=seed,
        steps=int(records[-1]["step"]),
        train=train,
        val=val,
        val_step=val_step,
    )


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _shaping_cells(name: str) -> list[str]:
    if name not in RewardShapingConfig.PRESET_NAMES:
        return ["-"] * 4
    cfg = RewardShapingConfig.preset(name)
    k = str(cfg.top_k) if cfg.uses_top_k else "-"
    return [f"{cfg.beta:g}", f"{cfg.lambda_head:g}", f"{cfg.lambda_tail:g}", k]


def _fmt(values: Mapping[str, float], key: str, spec: str) -> str:
    return format(values[key], spec) if key in values else "-"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(summaries: Sequence[RunSummary]) -> str:
    """The table of runs, one row each: loss settings, then validation and training perplexity,
    entropy, target probability and top-k mass."""
    header = [
        "run",
        "beta",
        "lambda_head",
        "lambda_tail",
        "k",
        "steps",
        "val ppl",
        "val entropy",
        "val CE",
        "val p(x)",
        "val top-k mass",
        f"train ppl (last {_TRAIN_WINDOW})",
        "train entropy",
        "train loss",
    ]
    rows = [_row(header), "|" + "---|" * len(header)]
    for s in summaries:
        cells = [
            f"`{s.name}`" + (f" {s.seed}" if s.seed else ""),
            *_shaping_cells(s.name),
            str(s.steps),
            _fmt(s.val, "ppl", ".2f"),
            _fmt(s.val, "entropy", ".3f"),
            _fmt(s.val, "ce_loss", ".4f"),
            _fmt(s.val, "target_prob", ".4f"),
            _fmt(s.val, "topk_mass", ".4f"),
            _fmt(s.train, "ppl", ".2f"),
            _fmt(s.train, "entropy", ".3f"),
            _fmt(s.train, "loss", ".4f"),
        ]
        rows.append(_row(cells))
    return "\n".join(rows) + "\n"


# -- over seeds -----------------------------------------------------------------------------------

SEED_METRICS = (
    ("ce_loss", "CE", ".4f"),
    ("ppl", "ppl", ".2f"),
    ("entropy", "entropy", ".3f"),
    ("target_prob", "p(x)", ".4f"),
    ("topk_mass", "top-k mass", ".4f"),
    ("tail_mass", "tail mass", ".4f"),
)
"""The metrics given over seeds (key, column title, format): cross-entropy, perplexity = exp(CE),
predictive entropy, target probability, top-k mass and tail mass = 1 - top-k mass."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeedSummary:
    """One name's metrics over its seeds."""

    name: str
    """The name (loss preset)."""
    seeds: int
    """How many runs (seeds)."""
    source: str
    """Where the values come from: "val" (each run's last validation) or "train" (each run's
    means over its last logged steps)."""
    metrics: dict[str, Interval]
    """SEED_METRICS keys -> mean over seeds and 95% interval (metrics every run logged)."""


def metric_source(summaries: Iterable[RunSummary]) -> str:
    """Where the metrics over seeds come from: "val" when every run was validated, else "train"
    (one source for every name, so that all are compared on the same data)."""
    return "val" if all(s.val for s in summaries) else "train"


def over_seeds(name: str, runs: Sequence[RunSummary], source: str = "val") -> SeedSummary:
    """A name's metrics over its runs (one per seed) from their `source` values ("val" or
    "train"): perplexity is exp of the CE mean and of its interval's ends (the geometric mean of
    the seeds' perplexities); tail mass is 1 - top-k mass, seed by seed."""
    if source not in ("val", "train"):
        raise ValueError(f"source must be 'val' or 'train', got {source!r}")
    values = [getattr(r, source) for r in runs]
    metrics: dict[str, Interval] = {}
    for key in ("ce_loss", "entropy", "target_prob", "topk_mass"):
        if values and all(key in v for v in values):
            metrics[key] = mean_interval([v[key] for v in values])
    if "ce_loss" in metrics:
        metrics["ppl"] = metrics["ce_loss"].map(_exp)
    if "topk_mass" in metrics:
        metrics["tail_mass"] = mean_interval([1.0 - v["topk_mass"] for v in values])
    ordered = {key: metrics[key] for key, _, _ in SEED_METRICS if key in metrics}
    return SeedSummary(name=name, seeds=len(runs), source=source, metrics=ordered)


def _fmt_interval(interval: Interval | None, spec: str) -> str:
    if interval is None:
        return "-"
    if not interval.has_interval:
        return format(interval.mean, spec)
    return f"{interval.mean:{spec}} [{interval.low:{spec}}, {interval.high:{spec}}]"


def seeds_table(stats: Sequence[SeedSummary]) -> str:
    """The table over seeds, one row per name: loss settings, seeds, then every SEED_METRICS
    metric as "mean [low, high]" (the 95% interval; the mean alone with one seed)."""
    source = stats[0].source if stats else "val"
    header = [
        "preset",
        "beta",
        "lambda_head",
        "lambda_tail",
        "k",
        "seeds",
        *(f"{source} {title}" for _, title, _ in SEED_METRICS),
    ]
    rows = [_row(header), "|" + "---|" * len(header)]
    for s in stats:
        cells = [
            f"`{s.name}`",
            *_shaping_cells(s.name),
            str(s.seeds),
            *(_fmt_interval(s.metrics.get(key), spec) for key, _, spec in SEED_METRICS),
        ]
        rows.append(_row(cells))
    return "\n".join(rows) + "\n"


def verdict_table(verdicts: Sequence[PairVerdict], entropy: Mapping[str, Interval]) -> str:
    """One row per pair of names: the expected entropy order ("`a` < `b`", or "`a` vs `b`" when
    none is expected), the verdict and both entropies over seeds."""
    rows = [
        _row(["expected entropy order", "verdict", "entropy (first)", "entropy (second)"]),
        "|---|---|---|---|",
    ]
    for v in verdicts:
        order = f"`{v.lower}` {'<' if v.expected else 'vs'} `{v.higher}`"
        first, second = (_fmt_interval(entropy[n], ".3f") for n in (v.lower, v.higher))
        rows.append(_row([order, v.verdict, first, second]))
    return "\n".join(rows) + "\n"


def _seed_text(stats: Sequence[SeedSummary]) -> str:
    counts = sorted({s.seeds for s in stats})
    where = (
        "the last validation of each run"
        if stats and stats[0].source == "val"
        else f"each run's means over its last {_TRAIN_WINDOW} logged steps (not every run has "
        "a validation)"
    )
    if counts == [1]:
        return (
            f"One seed per preset, so there is no interval over seeds (it needs two or more: "
            f"`compare --seeds N`): each cell is that seed's value, from {where}.\n"
        )
    n = " or ".join(str(c) for c in counts)
    return (
        f"{n} seeds per preset, values from {where}. Each cell is the mean over seeds and, in "
        "brackets, its 95% Student t interval: mean +- t(0.975, n - 1) * s / sqrt(n), with s the "
        "standard deviation over the n seeds (t from a table, run_configs/seed_stats.py). A cell "
        "without brackets has one seed, which gives no interval. Perplexity is exp of the mean CE "
        "and of the interval's ends; tail mass is 1 - top-k mass (k = each run's top_k, 100 for "
        "every preset).\n"
    )


_VERDICT_TEXT = (
    "The objective moves the predictive entropy away from cross-entropy's: beta < 0 and "
    "lambda_tail < 0 lower it, beta > 0 and lambda_head > 0 raise it. For two presets that move "
    "it differently, `a` < `b` is the expected order of their entropies; it **holds** when `a`'s "
    "interval lies wholly below `b`'s, is **reversed** when `b`'s lies wholly below `a`'s, and "
    "is **not resolved** when the intervals overlap or touch or a preset has one seed (no "
    "interval). Non-overlapping 95% intervals are a stricter test than a 5% two-sample test: "
    '"not resolved" says that these seeds cannot tell, not that the order is false. Presets '
    "that move the entropy the same way have no expected order (`a` vs `b`).\n"
)


# -- plot -----------------------------------------------------------------------------------------


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _metric(record: Mapping[str, Any], key: str, prefix: str = "") -> float | None:
    """A record's metric, tail_mass as 1 - top-k mass, perplexity as log (averaged in log space)."""
    if key == "tail_mass":
        value = record.get(f"{prefix}topk_mass")
        return None if value is None else 1.0 - float(value)
    value = record.get(f"{prefix}{key}")
    if value is None:
        return None
    return math.log(float(value)) if key == "ppl" else float(value)


def _train_curve(records: Sequence[Mapping[str, Any]], key: str) -> dict[int, float]:
    """step -> the moving average of a training metric (empty if some step lacks it)."""
    values = [_metric(r, key) for r in records]
    if any(v is None for v in values):
        return {}
    smooth = _smooth(values, max(1, len(records) // 20))  # type: ignore[arg-type]
    return dict(zip((int(r["step"]) for r in records), smooth, strict=True))


def _val_curve(records: Sequence[Mapping[str, Any]], key: str) -> dict[int, float]:
    """step -> a validation metric, at the validation steps."""
    out = {}
    for r in records:
        value = _metric(r, key, "val_")
        if value is not None:
            out[int(r["step"])] = value
    return out


def _band(
    curves: Sequence[Mapping[int, float]],
) -> tuple[list[int], list[float], list[float], list[float]]:
    """The steps every curve has, with the mean, minimum and maximum over the curves there."""
    if not curves or not all(curves):
        return [], [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    mean = [math.fsum(c[s] for c in curves) / len(curves) for s in steps]
    low = [min(c[s] for c in curves) for s in steps]
    high = [max(c[s] for c in curves) for s in steps]
    return steps, mean, low, high


_PANELS = (
    ("ppl", "perplexity exp(CE)"),
    ("entropy", "predictive entropy (nats)"),
    ("tail_mass", "tail mass 1 - top-k mass"),
)


def plot_runs(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], path: str | Path
) -> Path:
    """Plot perplexity (log scale), entropy and tail mass over steps for every name to a PNG.

    `histories` maps a name to its runs' records, one list per seed. Training is a moving
    average (lines), validation markers; with several seeds the line is the mean over seeds
    (perplexity: the geometric mean) and a band (training) or bars (validation) span the seeds'
    minimum to maximum.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(_PANELS), figsize=(17, 4.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runs) in enumerate(histories.items()):
        color = colors[i % len(colors)]
        n = len(runs)
        seeds = f", {n} seeds" if n > 1 else ""
        for ax, (key, _) in zip(axes, _PANELS, strict=True):
            back = math.exp if key == "ppl" else (lambda x: x)
            steps, mean, low, high = _band([_train_curve(r, key) for r in runs])
            if steps:
                ax.plot(
                    steps,
                    [back(v) for v in mean],
                    color=color,
                    lw=1.0,
                    alpha=0.8,
                    label=f"{name} (train{seeds})",
                )
                if n > 1:
                    lo, hi = [back(v) for v in low], [back(v) for v in high]
                    ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
            steps, mean, low, high = _band([_val_curve(r, key) for r in runs])
            if steps:
                y = [back(v) for v in mean]
                yerr = None
                if n > 1:  # (max: the mean of equal values may be an ulp off them)
                    yerr = [
                        [max(0.0, m - back(v)) for m, v in zip(y, low, strict=True)],
                        [max(0.0, back(v) - m) for m, v in zip(y, high, strict=True)],
                    ]
                ax.errorbar(
                    steps,
                    y,
                    yerr=yerr,
                    color=color,
                    marker="o",
                    ms=4,
                    ls="--",
                    lw=0.8,
                    capsize=2,
                    label=f"{name} (val{seeds})",
                )
    axes[0].set_yscale("log")
    for ax, (_, title) in zip(axes, _PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    if any(len(r) > 1 for r in histories.values()):
        fig.suptitle("lines: mean over seeds; bands and bars: minimum to maximum over seeds")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the report -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportPaths:
    """Files written by write_report."""

    markdown: Path
    """The tables (report.md)."""
    plot: Path
    """The plot (report.png)."""
    summary: Path
    """The runs, the metrics over seeds and the verdicts as JSON (report.json)."""
    table: str
    """The table of runs, one row each."""
    seeds_table: str
    """The table over seeds, one row per name."""
    verdicts: list[PairVerdict]
    """The entropy-ordering verdict of every pair of names (empty when no entropy was logged)."""


def _run_label(path: str | Path) -> str:
    """The name of a run's folder (that of its metrics file's run when given the file)."""
    folder = metrics_path(path).parent
    return folder.parent.name if folder.name == "logs" else folder.name


def write_report(
    runs: Mapping[str, str | Path | Sequence[str | Path]], out_dir: str | Path
) -> ReportPaths:
    """Write out_dir/report.md, report.png and report.json comparing `runs`: name -> a run folder
    (or metrics file), or a list of them, one per seed."""
    grouped = {
        name: [paths] if isinstance(paths, (str, Path)) else list(paths)
        for name, paths in runs.items()
    }
    empty = [name for name, paths in grouped.items() if not paths]
    if not grouped:
        raise ValueError("no runs to report")
    if empty:
        raise ValueError(f"no runs given for {', '.join(empty)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    histories = {name: [load_metrics(p) for p in paths] for name, paths in grouped.items()}
    summaries = {
        name: [
            summarize(name, records, seed=_run_label(p) if len(paths) > 1 else None)
            for p, records in zip(paths, histories[name], strict=True)
        ]
        for name, paths in grouped.items()
    }
    table = markdown_table([s for runs_ in summaries.values() for s in runs_])
    source = metric_source(s for runs_ in summaries.values() for s in runs_)
    stats = [over_seeds(name, runs_, source) for name, runs_ in summaries.items()]
    entropy = {s.name: s.metrics["entropy"] for s in stats if "entropy" in s.metrics}
    verdicts: list[PairVerdict] = []
    if len(entropy) == len(stats):
        presets = RewardShapingConfig.PRESET_NAMES
        shaping = {n: RewardShapingConfig.preset(n) for n in entropy if n in presets}
        verdicts = entropy_verdicts(entropy, shaping)
        order = _VERDICT_TEXT + "\n" + verdict_table(verdicts, entropy)
    else:
        order = "Some runs logged no entropy (megatron-core's native cross-entropy): no verdicts.\n"
    seeds = seeds_table(stats)
    plot = plot_runs(histories, out / "report.png")
    md = out / "report.md"
    md.write_text(
        "# Loss presets side by side\n\n"
        f"## Over seeds\n\n{_seed_text(stats)}\n{seeds}\n"
        f"## Entropy ordering\n\n{order}\n"
        "## Runs\n\n"
        f"Validation: the last validation of each run; training: means over the last "
        f"{_TRAIN_WINDOW} logged steps. Perplexity is exp(cross-entropy) whatever the training "
        "loss; entropy is the predictive entropy in nats.\n\n"
        f"{table}\n![perplexity, entropy and tail mass over steps](report.png)\n"
    )
    summary = out / "report.json"
    summary.write_text(
        json.dumps(
            {
                "runs": [dataclasses.asdict(s) for runs_ in summaries.values() for s in runs_],
                "over_seeds": [dataclasses.asdict(s) for s in stats],
                "entropy_order": [dataclasses.asdict(v) for v in verdicts],
            },
            indent=2,
        )
        + "\n"
    )
    return ReportPaths(
        markdown=md,
        plot=plot,
        summary=summary,
        table=table,
        seeds_table=seeds,
        verdicts=verdicts,
    )
