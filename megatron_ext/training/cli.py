"""Command line of the trainer: `python -m megatron_ext.training --config run.toml [flags]`.

Launch one process per rank with torchrun (e.g. `torchrun --nproc-per-node 4 -m
megatron_ext.training --config run.toml`); a single process runs without torchrun. The file
(JSON or TOML) holds the nested fields of TrainConfig; flags override it, and `--set
section.field=value` overrides any field (values are parsed as JSON when they can be).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from megatron_ext.training.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    read_config_file,
)

__all__ = ["config_from_args", "main", "parse_args"]

# flag -> (section or None, field)
_FLAGS: dict[str, tuple[str | None, str]] = {
    "tp": ("parallel", "tensor"),
    "pp": ("parallel", "pipeline"),
    "ep": ("parallel", "expert"),
    "train_steps": (None, "train_steps"),
    "global_batch_size": (None, "global_batch_size"),
    "micro_batch_size": (None, "micro_batch_size"),
    "eval_interval": (None, "eval_interval"),
    "eval_iters": (None, "eval_iters"),
    "seed": (None, "seed"),
    "lr": ("optimizer", "lr"),
    "min_lr": ("optimizer", "min_lr"),
    "warmup_steps": ("optimizer", "warmup_steps"),
    "save": ("checkpoint", "save_dir"),
    "save_interval": ("checkpoint", "save_interval"),
    "load": ("checkpoint", "load_dir"),
    "log_dir": ("logging", "log_dir"),
    "eod_id": ("data", "eod_id"),
    "split": ("data", "split"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the trainer's command line."""
    p = argparse.ArgumentParser(
        prog="python -m megatron_ext.training",
        description="Pre-train a Qwen3-style model with the reward-shaped loss on megatron-core.",
    )
    p.add_argument("--config", type=Path, help="JSON or TOML file with TrainConfig fields")
    p.add_argument("--model", help="model preset (tiny, tiny_moe, dense_1b, dense_4b, moe_...)")
    p.add_argument("--shaping", help="reward-shaping preset (ce, precision, diversity, ...)")
    p.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (no .bin/.idx)")
    p.add_argument("--data-weights", nargs="+", type=float, help="blend weights of --data-path")
    p.add_argument("--tp", type=int, help="tensor-parallel size")
    p.add_argument("--pp", type=int, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, help="expert-parallel size")
    p.add_argument("--distributed-optimizer", action="store_true", default=None)
    p.add_argument("--train-steps", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--eval-interval", type=int)
    p.add_argument("--eval-iters", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--save", help="checkpoint folder to write")
    p.add_argument("--save-interval", type=int)
    p.add_argument("--load", help="checkpoint folder to resume from")
    p.add_argument("--log-dir", help="folder for metrics.jsonl and TensorBoard")
    p.add_argument("--eod-id", type=int)
    p.add_argument("--split", help="train,valid,test split, e.g. 98,2,0")
    p.add_argument("--bf16", action="store_true", default=None)
    p.add_argument(
        "--native-cross-entropy",
        action="store_true",
        default=None,
        help="baseline: megatron-core's own cross-entropy instead of the shaped loss",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any field, e.g. --set optimizer.wsd_decay_steps=100 (repeatable)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    return p.parse_args(argv)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _shaping_fields(preset: str) -> dict[str, Any]:
    import dataclasses

    from megatron_ext.loss import RewardShapingConfig

    return dataclasses.asdict(RewardShapingConfig.preset(preset))


def _put(values: dict[str, Any], section: str | None, field: str, value: Any) -> None:
    if section is None:
        values[field] = value
        return
    table = values.setdefault(section, {})
    if isinstance(table, str) and section == "model":
        table = values[section] = {"preset": table}
    elif isinstance(table, str) and section == "shaping":
        table = values[section] = _shaping_fields(table)
    if not isinstance(table, dict):
        raise ConfigError(f"cannot set {section}.{field}: {section} is {table!r}, not a table")
    table[field] = value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig from a config file (optional) and the flags."""
    values: dict[str, Any] = {}
    if args.config is not None:
        values = read_config_file(args.config)
    if args.model is not None:
        model = values.get("model")
        if isinstance(model, dict):
            values["model"] = {**model, "preset": args.model}
        else:
            values["model"] = args.model
    if args.shaping is not None:
        values["shaping"] = args.shaping
    if args.data_path is not None:
        _put(values, "data", "paths", list(args.data_path))
    if args.data_weights is not None:
        _put(values, "data", "weights", list(args.data_weights))
    if args.distributed_optimizer:
        _put(values, "parallel", "distributed_optimizer", True)
    if args.bf16:
        values["bf16"] = True
    if args.native_cross_entropy:
        values["native_cross_entropy"] = True
    for flag, (section, field) in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            _put(values, section, field, value)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not SECTION.FIELD=VALUE")
        section, dot, field = key.rpartition(".")
        _put(values, section if dot else None, field, _parse_value(raw))
    return config_from_dict(values)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m megatron_ext.training`.

    Returns 0 when the run finished or stopped on SIGTERM after saving, 1 on a configuration,
    data, checkpoint or non-finite-loss error (printed as one message, without a traceback, by
    rank 0: every rank raises the same one).
    """
    import os
    import sys

    from megatron_ext.data.errors import DataError
    from megatron_ext.training.checkpoint import CheckpointError, NonFiniteWeightsError

    args = parse_args(argv)
    try:
        config = config_from_args(args)
        if args.print_config:
            print(json.dumps(config_to_dict(config), indent=2))
            return 0
        from megatron_ext.training.trainer import NonFiniteError, pretrain

        try:
            pretrain(config)
        except (
            DataError,
            CheckpointError,
            NonFiniteError,
            NonFiniteWeightsError,
            FileNotFoundError,  # checkpoint.load_dir/load_step naming no checkpoint
        ) as exc:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
    except ConfigError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
