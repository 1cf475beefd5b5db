"""The small training run the trainer tests start from: the tiny model on synthetic data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from megatron_ext.models import ModelConfig, model_preset
from megatron_ext.training import DataConfig, LoggingConfig, OptimizerConfig, TrainConfig


def tiny_run_config(
    data_prefix: str, model: str | ModelConfig = "tiny", **overrides: Any
) -> TrainConfig:
    """8 steps of 8 sequences (micro-batches of 2) at a learning rate the tiny model learns at,
    without console output; `overrides` replaces any TrainConfig field."""
    base: dict[str, Any] = {
        "model": model_preset(model) if isinstance(model, str) else model,
        "data": DataConfig(paths=(data_prefix,), split="90,10,0"),
        "optimizer": OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=0),
        "logging": LoggingConfig(console=False),
        "train_steps": 8,
        "global_batch_size": 8,
        "micro_batch_size": 2,
    }
    base.update(overrides)
    return TrainConfig(**base)


_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def standalone_env(*drop: str) -> dict[str, str]:
    """This process's environment without the torchrun variables (a test's gloo group may have
    set some) and without `drop`: for a subprocess that starts on its own."""
    return {k: v for k, v in os.environ.items() if k not in (*_LAUNCHER_VARIABLES, *drop)}


def run_training_cli(
    *argv: str,
    timeout: float = 240,
    cwd: str | os.PathLike[str] | None = None,
    python_flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`python [python_flags] -m megatron_ext.training *argv` as a single process (no torchrun
    variables inherited), from `cwd` (default: the repository root); output captured, exit code
    not checked."""
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "megatron_ext.training", *argv],
        check=False,
        cwd=cwd if cwd is not None else Path(__file__).resolve().parents[1],
        env=standalone_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
