"""Compare training runs from the trainer's JSONL metrics: a markdown table and a PNG plot.

Each run folder holds logs/metrics.jsonl (megatron_ext.training's LoggingConfig.log_dir), one
JSON record per logged step with the per-token means of the shaped loss (`loss`), cross-entropy
(`ce_loss`), perplexity (`ppl` = exp(ce_loss)), predictive entropy (`entropy`, nats), target
probability (`target_prob`) and top-k mass (`topk_mass`), plus `val_*` at validation steps.

    python -m run_configs report outputs/compare/ce outputs/compare/precision ... --out DIR
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_ext.loss import RewardShapingConfig

__all__ = [
    "ReportPaths",
    "RunSummary",
    "load_metrics",
    "markdown_table",
    "plot_runs",
    "summarize",
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


def summarize(name: str, records: Sequence[Mapping[str, Any]]) -> RunSummary:
    """A run's summary from its records (see RunSummary)."""
    last = list(records[-_TRAIN_WINDOW:])
    train = {
        k: sum(float(r[k]) for r in last) / len(last) for k in _FIELDS if all(k in r for r in last)
    }
    if "ce_loss" in train:
        train["ppl"] = math.exp(train["ce_loss"])
    val: dict[str, float] = {}
    val_step = None
    for record in reversed(records):
        if "val_ce_loss" in record:
            val = {k: float(record[f"val_{k}"]) for k in (*_FIELDS, "ppl") if f"val_{k}" in record}
            val_step = int(record["step"])
            break
    return RunSummary(
        name=name, steps=int(records[-1]["step"]), train=train, val=val, val_step=val_step
    )


def _shaping_cells(name: str) -> list[str]:
    if name not in RewardShapingConfig.PRESET_NAMES:
        return ["-"] * 4
    cfg = RewardShapingConfig.preset(name)
    k = str(cfg.top_k) if cfg.uses_top_k else "-"
    return [f"{cfg.beta:g}", f"{cfg.lambda_head:g}", f"{cfg.lambda_tail:g}", k]


def _fmt(values: Mapping[str, float], key: str, spec: str) -> str:
    return format(values[key], spec) if key in values else "-"


def markdown_table(summaries: Sequence[RunSummary]) -> str:
    """The comparison table: loss settings, then validation and training perplexity, entropy,
    target probability and top-k mass."""
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
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [
            f"`{s.name}`",
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
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Plot perplexity (log scale) and entropy over steps for every run to a PNG: training as a
    moving average (thin lines), validation as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, records) in enumerate(histories.items()):
        color = colors[i % len(colors)]
        steps = [int(r["step"]) for r in records]
        window = max(1, len(records) // 20)
        for ax, key in ((axes[0], "ppl"), (axes[1], "entropy")):
            if all(key in r for r in records):
                values = [float(r[key]) for r in records]
                if key == "ppl":  # average log-perplexity, not perplexity
                    values = [math.exp(v) for v in _smooth([math.log(x) for x in values], window)]
                else:
                    values = _smooth(values, window)
                ax.plot(steps, values, color=color, lw=1.0, alpha=0.8, label=f"{name} (train)")
            val = [r for r in records if f"val_{key}" in r]
            if val:
                ax.plot(
                    [int(r["step"]) for r in val],
                    [float(r[f"val_{key}"]) for r in val],
                    color=color,
                    marker="o",
                    ms=4,
                    ls="--",
                    lw=0.8,
                    label=f"{name} (val)",
                )
    axes[0].set_yscale("log")
    axes[0].set_title("perplexity exp(CE)")
    axes[1].set_title("predictive entropy (nats)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportPaths:
    """Files written by write_report."""

    markdown: Path
    """The table (report.md)."""
    plot: Path
    """The plot (report.png)."""
    summary: Path
    """The summaries as JSON (report.json)."""
    table: str
    """The table's text."""


def write_report(runs: Mapping[str, str | Path], out_dir: str | Path) -> ReportPaths:
    """Write out_dir/report.md, report.png and report.json comparing `runs` (name -> run folder
    or metrics file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    histories = {name: load_metrics(path) for name, path in runs.items()}
    summaries = [summarize(name, records) for name, records in histories.items()]
    table = markdown_table(summaries)
    plot = plot_runs(histories, out / "report.png")
    md = out / "report.md"
    md.write_text(
        "# Loss presets side by side\n\n"
        f"Validation: the last validation of each run; training: means over the last "
        f"{_TRAIN_WINDOW} logged steps. Perplexity is exp(cross-entropy) whatever the training "
        "loss; entropy is the predictive entropy in nats.\n\n"
        f"{table}\n![perplexity and entropy over steps](report.png)\n"
    )
    summary = out / "report.json"
    summary.write_text(json.dumps([dataclasses.asdict(s) for s in summaries], indent=2) + "\n")
    return ReportPaths(markdown=md, plot=plot, summary=summary, table=table)
