"""The reliability report (docs/reliability.md), written by the tests that inject the faults.

Tests marked `reliability` call `record(section, **row)` with what they injected and what they
measured. When the session ends, the report is rewritten if every reliability test of the suite
was collected and passed (a partial or failing run leaves the committed report alone), and only
when asked: `make reliability-report` sets RELIABILITY_REPORT=docs/reliability.md. A plain
`make test` leaves the committed report (and so the working tree) as it is.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

REPORT = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
"""The committed report."""
REQUEST = "RELIABILITY_REPORT"
"""Environment variable naming the file to write the report to (unset: no report is written)."""

SECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kill9": (
        "Kill -9 at random steps, resumed each time",
        (
            "run",
            "async_save",
            "trials",
            "kills",
            "kills_in_a_save",
            "identical_trials",
            "steps_compared",
            "samples_lost",
            "samples_repeated",
            "max_loss_diff",
        ),
    ),
    "kill_during_save": (
        "Killed in the middle of a checkpoint save",
        (
            "fault",
            "async_save",
            "previous_checkpoint_usable",
            "resumed_from",
            "losses_identical",
            "partial_left_published",
        ),
    ),
    "sigterm": (
        "SIGTERM (Slurm preemption)",
        (
            "run",
            "signal_at_step",
            "saved_step",
            "exit_code",
            "seconds_to_exit",
            "resumed_identical",
        ),
    ),
    "nonfinite": (
        "Non-finite loss or gradients",
        (
            "fault",
            "policy",
            "detected_at_step",
            "ranks_named",
            "outcome",
            "nan_checkpoints_written",
        ),
    ),
    "bad_input": (
        "Bad input and bad configuration (errors raised before any training work)",
        ("input", "error"),
    ),
}

_entries: list[tuple[str, dict[str, Any]]] = []


def record(section: str, **row: Any) -> None:
    """Add one row to a section of the report."""
    if section not in SECTIONS:
        raise KeyError(f"unknown report section {section!r}; known: {sorted(SECTIONS)}")
    _entries.append((section, row))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.3g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The report as markdown."""
    lines = [
        "# Reliability report",
        "",
        "Written by the test suite (`tests/test_reliability.py`, `tests/test_data_validation.py`",
        (
            "and `tests/test_config_errors.py`, marker `reliability`) on "
            f"{datetime.date.today().isoformat()}, {platform.machine()}, CPU ranks over gloo."
        ),
        "Every figure below was measured by the run that wrote it; `make reliability-report`",
        "reruns those tests and rewrites this file.",
        "",
    ]
    counts = {name: sum(1 for s, _ in _entries if s == name) for name in SECTIONS}
    rows = {name: [row for s, row in _entries if s == name] for name in SECTIONS}
    kill9 = rows["kill9"]
    injected = (
        sum(r["kills"] for r in kill9)
        + counts["kill_during_save"]
        + counts["sigterm"]
        + counts["nonfinite"]
    )
    survived = (
        sum(r["kills"] for r in kill9 if r["identical_trials"] == r["trials"])
        + sum(1 for r in rows["kill_during_save"] if r["losses_identical"] is True)
        + sum(1 for r in rows["sigterm"] if r["resumed_identical"] is True)
        + sum(1 for r in rows["nonfinite"] if r["nan_checkpoints_written"] == 0)
    )
    lines += [
        "| faults injected | survived | samples lost | bad inputs tried | clear errors given |",
        "| --- | --- | --- | --- | --- |",
        (
            f"| {injected} | {survived} | {sum(r['samples_lost'] for r in kill9)} | "
            f"{counts['bad_input']} | {sum(1 for r in rows['bad_input'] if r.get('error'))} |"
        ),
        "",
        "Survived: the resumed run reproduced the uninterrupted run's losses, gradient norms and",
        "samples exactly, or (non-finite faults) the run skipped or stopped as configured without",
        "writing a checkpoint with NaN weights. A clear error names the bad value and the fix, and",
        "is raised before any training step.",
        "",
    ]
    for name, (title, columns) in SECTIONS.items():
        rows = [row for s, row in _entries if s == name]
        if not rows:
            continue
        lines += [f"## {title} ({counts[name]})", ""]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + " --- |" * len(columns))
        for row in rows:
            lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def write_if_complete(collected: set[str], passed: set[str], deselected: bool) -> Path | None:
    """Write the report to $RELIABILITY_REPORT when it is set and every reliability test ran and
    passed; returns the file written, or None."""
    target = os.environ.get(REQUEST)
    if not target or not _entries or deselected or not collected or collected != passed:
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    return path
