"""The benchmark tools run end to end on small settings and print their tables (no timing is
checked here: the figures come from full runs, see the README's Benchmarks section)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_run import standalone_env

ROOT = Path(__file__).resolve().parents[1]


def _run_tool(name: str, *argv: str, drop: tuple[str, ...] = ()) -> str:
    """Run tools/<name> on its own (environment less `drop`); its stdout, exit code 0 asserted."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *argv],
        check=False,
        cwd=ROOT,
        env=standalone_env(*drop),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _ratio_rows(out: str) -> dict[str, float]:
    """{method: ratio} from the lines `<method> <number> <ratio>x ...` of a tool's table."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(\w+)\s+[\d.]+\s+([\d.]+)x", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    return rows


@pytest.mark.slow
def test_bench_train_prints_every_loss_against_megatron_ce():
    out = _run_tool(
        "bench_train.py", "--steps", "2", "--warmup", "1", "--presets", "ce", "tail_suppression"
    )
    rows = _ratio_rows(out)
    assert set(rows) == {"megatron_ce", "ce", "tail_suppression"}, out
    assert rows["megatron_ce"] == 1.0
    assert all(r > 0 for r in rows.values())
    assert re.search(r"tail_suppression .*\[[\d.]+, [\d.]+\]", out), out  # the interval


@pytest.mark.slow
def test_bench_loss_prints_time_and_memory_ratios():
    out = _run_tool(
        "bench_loss.py", "--tokens", "64", "--vocab", "512", "--repeats", "1",
        "--presets", "head_preservation",
    )  # fmt: skip
    rows = _ratio_rows(out)
    assert set(rows) == {"megatron_ce", "head_preservation"}, out
    assert rows["megatron_ce"] == 1.0
    assert "peak ratio" in out


@pytest.fixture(scope="module")
def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "tools" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_interval_brackets_the_ratio_of_medians(bench_train):
    base = [1.0, 1.1, 0.9, 1.05, 0.95] * 8
    slower = [t * 1.25 for t in base]  # 0.8x the tokens/s
    low, high = bench_train._ratio_interval(base, slower)
    assert low <= 0.8 <= high and high - low < 0.2
    assert bench_train._ratio_interval(base, base) == bench_train._ratio_interval(base, base)
    same_low, same_high = bench_train._ratio_interval(base, base)
    assert same_low <= 1.0 <= same_high


@pytest.mark.slow
def test_bench_output_loss_prints_time_ratios_and_measures_memory():
    size = ("--tokens", "48", "--vocab", "2048", "--hidden", "16")
    out = _run_tool(
        "bench_output_loss.py", *size, "--repeats", "1", "--presets", "tail_suppression",
        "--no-memory", "--train", "--train-vocab", "512", "--train-steps", "1",
        "--train-warmup", "1",
    )  # fmt: skip
    rows = {m: float(r) for m, r in re.findall(r"^\| ([\w:]+) \| [\d.]+ \| ([\d.]+)x", out, re.M)}
    assert set(rows) == {
        "megatron_ce",
        "unfused:tail_suppression",
        "fused:tail_suppression",
        "recompute:tail_suppression",
    }
    assert rows["megatron_ce"] == 1.0 and all(r > 0 for r in rows.values()), out
    assert "what recompute adds" in out
    assert re.search(r"^\| tail_suppression \| \d+ \| \d+ \| [\d.]+x \| \[", out, re.M), out
    # The peak-memory measurement of one method (a fresh process per method in a full run).
    memory = json.loads(_run_tool("bench_output_loss.py", *size, "--_memory-of", "fused:ce"))
    assert memory["peak_bytes"] > 0 and memory["extra_bytes"] >= 0


def test_gpu_check_report_takes_the_output_loss_table(tmp_path):
    """The GPU check's one table: the output-loss benchmark's JSON brings its own lines, a
    missing step is named."""
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "tools" / "bench_gpu.py")
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    output = tmp_path / "output.json"
    output.write_text(json.dumps({"kind": "output_loss", "markdown": ["| fused:ce | 1.0 |"]}))
    text = bench_gpu.report([str(output), str(tmp_path / "train.json")])
    assert "| fused:ce | 1.0 |" in text
    assert "train.json: missing (that step failed or timed out)" in text
