"""Command line of the trainer: `python -m megatron_ext.training --config run.toml [flags]`.

`--nproc-per-node N` starts N ranks on this machine through torchrun's launcher (torch.distributed.run)
and reports a failure as the ranks' one `error:` line. Multi-node jobs launch one process per rank
with torchrun or Slurm as usual (e.g. `torchrun --nnodes 2 --nproc-per-node 8 ... -m
megatron_ext.training --config run.toml`); a single process runs without any launcher. The file
(JSON or TOML) holds the nested fields of TrainConfig; flags override it, and `--set
section.field=value` overrides any field (values are parsed as JSON when they can be).

Everything that can be checked without torch is checked first (the configuration, the parallel
layout against the world size, where the run starts, that the data files exist), so that a
mistake is reported in well under a second instead of after the 10-15 s megatron-core takes to
import. A default-corpus folder's manifest (megatron_ext.data.default_corpus) gives the model's
vocabulary size and the end-of-document id unless they are set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from megatron_ext.core.checkpoint_layout import CheckpointError
from megatron_ext.data.errors import DataError
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
    "vp": ("parallel", "virtual_pipeline"),
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
    "vocab_size": ("model", "vocab_size"),
    "save": ("checkpoint", "save_dir"),
    "save_interval": ("checkpoint", "save_interval"),
    "load": ("checkpoint", "load_dir"),
    "init_from": ("checkpoint", "init_from"),
    "load_step": ("checkpoint", "load_step"),
    "log_dir": ("logging", "log_dir"),
    "eod_id": ("data", "eod_id"),
    "split": ("data", "split"),
    "num_workers": ("data", "num_workers"),
    "device": (None, "device"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the trainer's command line."""
    p = argparse.ArgumentParser(
        prog="python -m megatron_ext.training",
        description="Pre-train a Qwen3-style model with the reward-shaped loss on megatron-core.",
    )
    p.add_argument("--config", type=Path, help="JSON or TOML file with TrainConfig fields")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help="start this many ranks on this machine (torchrun's launcher, run from here: a "
        "failed run ends with its one error line, without torchrun's report)",
    )
    p.add_argument("--model", help="model preset (tiny, tiny_moe, dense_1b, dense_4b, moe_...)")
    p.add_argument("--shaping", help="reward-shaping preset (ce, precision, diversity, ...)")
    p.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (no .bin/.idx)")
    p.add_argument("--data-weights", nargs="+", type=float, help="blend weights of --data-path")
    p.add_argument("--tp", type=int, help="tensor-parallel size")
    p.add_argument("--pp", type=int, help="pipeline-parallel size")
    p.add_argument(
        "--vp",
        type=int,
        help="model chunks per pipeline stage (virtual pipeline, interleaved 1F1B; needs --pp 2+)",
    )
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
    p.add_argument("--warmup-steps", type=int, help="default: 2000, at most a tenth of the run")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="the model's vocabulary (default: the data folder's manifest.json, else the preset's)",
    )
    p.add_argument(
        "--save",
        help="checkpoint folder; a run whose folder holds checkpoints resumes from the latest",
    )
    p.add_argument("--save-interval", type=int)
    p.add_argument(
        "--load",
        help="checkpoint folder to start from while --save holds none (must exist)",
    )
    p.add_argument(
        "--init-from",
        help="checkpoint root whose weights start the run from step 0 while --save holds none "
        "(e.g. tools/import_hf.py's output); without --model or a model table, the model is "
        "the checkpoint's (its config.json)",
    )
    p.add_argument("--load-step", type=int, help="load this step instead of the latest")
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start anew although --save / --log-dir hold an earlier run's checkpoints / "
        "metrics (they are removed)",
    )
    p.add_argument("--log-dir", help="folder for metrics.jsonl and TensorBoard")
    p.add_argument("--eod-id", type=int)
    p.add_argument("--split", help="train,valid,test split, e.g. 98,2,0")
    p.add_argument(
        "--num-workers",
        type=int,
        help="data-loader worker processes per rank (0: read in the training process; "
        "default: 2 on CUDA, 0 on CPU)",
    )
    p.add_argument("--bf16", action="store_true", default=None)
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        help="auto (default): CUDA when torch sees a GPU, refused when CUDA_VISIBLE_DEVICES names "
        "GPUs torch cannot see; cuda: GPUs or an error; cpu: gloo on the CPU, even with a GPU",
    )
    p.add_argument(
        "--native-cross-entropy",
        action="store_true",
        default=None,
        help="baseline: megatron-core's own cross-entropy instead of the shaped loss",
    )
    p.add_argument(
        "--fused-output-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="output layer and loss in one chunked step, no logits in memory (default: on)",
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


def config_from_args(args: argparse.Namespace, announce: bool = True) -> TrainConfig:
    """The TrainConfig from a config file (optional) and the flags; with `announce`, rank 0 says
    which values came from a default corpus's manifest."""
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
    if args.fused_output_loss is not None:
        values["fused_output_loss"] = args.fused_output_loss
    if args.overwrite:
        _put(values, "checkpoint", "overwrite", True)
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
    _init_from_model(values)
    _corpus_defaults(values, announce)
    return config_from_dict(values)


def _init_from_model(values: dict[str, Any]) -> None:
    """Without a model preset, the model of checkpoint.init_from (the `model` table of the
    config.json beside its checkpoints, as tools/import_hf.py and every training run write it),
    with the model fields set here on top."""
    checkpoint = values.get("checkpoint")
    root = checkpoint.get("init_from") if isinstance(checkpoint, dict) else None
    model = values.get("model", {})
    if not root or not isinstance(model, dict) or "preset" in model:
        return
    from megatron_ext.training.start import RUN_CONFIG, check_init_from, recorded_run_config

    saved = (recorded_run_config(root) or {}).get("model")
    if isinstance(saved, dict):
        values["model"] = {**saved, **model}
    elif "model" not in values:
        check_init_from(root)  # a path that is no checkpoint: that error first
        raise ConfigError(
            f"checkpoint.init_from={root} has no {RUN_CONFIG} with a model table to take the "
            "model from; give the model (--model, or a model table in --config)"
        )


def _corpus_defaults(values: dict[str, Any], announce: bool) -> None:
    """The model's vocabulary size and the end-of-document id from the manifest.json of the
    first data prefix's folder (a default corpus), where neither the file nor a flag set them."""
    data = values.get("data")
    paths = data.get("paths") if isinstance(data, dict) else None
    if not paths:
        return
    from megatron_ext.data.default_corpus import MANIFEST_NAME, corpus_tokens

    folder = Path(paths[0]).parent
    found = corpus_tokens(folder)
    if not found:
        return
    vocab, eod, manifest = found["vocab_size"], found["eod_id"], folder / MANIFEST_NAME
    model = values.get("model")
    if isinstance(model, str):
        model = values["model"] = {"preset": model}
    taken = []
    if isinstance(model, dict) and "vocab_size" not in model:
        model["vocab_size"] = vocab
        taken.append(f"model.vocab_size={vocab}")
    if "eod_id" not in data:
        data["eod_id"] = eod
        taken.append(f"data.eod_id={eod}")
    if taken and announce and int(os.environ.get("RANK", "0")) == 0:
        print(f"{' and '.join(taken)} from {manifest}", flush=True)


def _flag_hints(message: str) -> str:
    """The message with the command-line flag of every field it names, e.g. optimizer.lr ->
    (--lr), added to the line that names it."""
    flags = {
        f"{section}.{field}" if section else field: "--" + flag.replace("_", "-")
        for flag, (section, field) in _FLAGS.items()
    }
    flags["data.paths"] = "--data-path"
    lines = []
    for line in message.split("\n"):
        named = [flag for name, flag in flags.items() if f"{name}=" in line and flag not in line]
        lines.append(f"{line} [flag: {', '.join(dict.fromkeys(named))}]" if named else line)
    return "\n".join(lines)


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line less its --nproc-per-node option (in either spelling)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            out.append(item)
    return out


_CHECK_ERRORS = (ConfigError, DataError, CheckpointError)
"""What the checks before launch raise: one `error:` line each."""


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Check the run as N ranks would, then start them with torchrun's launcher; a failure is
    reported by the ranks themselves (rank 0's `error:` line), not by a launcher traceback."""
    nproc = args.nproc_per_node
    if nproc < 1:
        print(f"error: --nproc-per-node must be >= 1, got {nproc}", file=sys.stderr)
        return 1
    world = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(nproc)
    try:
        check_before_launch(config_from_args(args, announce=False))
    except _CHECK_ERRORS as exc:
        print(f"error: {_flag_hints(str(exc))}", file=sys.stderr, flush=True)
        return 1
    finally:
        if world is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = world
    # One intra-op thread per rank unless asked otherwise (what torchrun does, without its
    # banner); torchrun's agent logs at WARNING.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("LOGLEVEL", "WARNING")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args
    from torch.distributed.run import run

    launch = torchrun_args(
        ["--nproc-per-node", str(nproc), "-m", "megatron_ext.training", *_without_nproc(argv)]
    )
    try:
        run(launch)
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        print(
            f"{len(exc.failures)} of {nproc} ranks exited with status {codes}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_before_launch(config: TrainConfig) -> None:
    """The checks that need neither torch nor a process group, run before the slow imports:
    the layout against the world size, where the run starts, and that the data files exist.

    Raises:
        ConfigError: one of them fails (the message names the value and the fix).
    """
    from megatron_ext.data.validate import check_files_exist
    from megatron_ext.training.start import plan_start

    config.validate(_world_size())
    try:
        plan_start(config)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    check_files_exist(list(config.data.paths))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m megatron_ext.training`.

    Returns 0 when the run finished or stopped on SIGTERM after saving, 1 on a configuration,
    data, checkpoint or non-finite-loss error (printed as one message, without a traceback, by
    rank 0: every rank raises the same one).
    """
    args = parse_args(argv)
    if args.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
        return _launch(args, list(sys.argv[1:] if argv is None else argv))
    # FileNotFoundError: a checkpoint folder removed while the run started.
    expected: tuple[type[Exception], ...] = (*_CHECK_ERRORS, FileNotFoundError)
    try:
        config = config_from_args(args)
        if args.print_config:
            print(json.dumps(config_to_dict(config), indent=2))
            return 0
        check_before_launch(config)
        from megatron_ext.core.heap import freeze_imported_objects
        from megatron_ext.training.checkpoint import NonFiniteWeightsError
        from megatron_ext.training.trainer import NonFiniteError, pretrain

        expected += (NonFiniteError, NonFiniteWeightsError)
        freeze_imported_objects()  # collections during the run skip them (megatron_ext.core.heap)
        pretrain(config)
    except Exception as exc:
        if not isinstance(exc, expected):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {_flag_hints(str(exc))}", file=sys.stderr, flush=True)
        return 1
    return 0
