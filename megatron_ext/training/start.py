"""Where a run starts: its own latest checkpoint, another run's checkpoint, or from scratch.

The rules (CheckpointConfig's fields; torchtitan's checkpointer and NeMo's resume_if_exists work
the same way):

1. save_dir holds checkpoints: the run resumes from its latest one, whole (weights, optimizer,
   scheduler, RNG, data position). Relaunching the same command continues the run; load_dir is
   only read while save_dir is still empty.
2. Otherwise load_dir (it must exist; an existing, empty folder means a first launch): its latest
   checkpoint, or load_step, whole or (load_optimizer=False) as weights only from step 0.
3. Otherwise init_from: its latest checkpoint's weights, from step 0 with a fresh optimizer and
   schedule (a model imported from Hugging Face, or another run's weights). It must be a
   checkpoint root; that is checked on every start, so a mistyped path fails at once.
4. Otherwise from scratch.

A start that is not a resume of save_dir's latest checkpoint (a rollback with load_step, a new
run pointed at an old run's folders) would move save_dir's `latest` back or mix two runs' rows in
log_dir's metrics.jsonl. Such a start is refused unless `overwrite` is set; then the checkpoints
after the starting step and the log records of those steps are removed first. A resume drops the
log records of steps after its checkpoint (they were written by the attempt that died and are
redone exactly), so metrics.jsonl holds one record per step; so does a relaunch of a run that died
before its first checkpoint (the same configuration, apart from its checkpoint and logging
sections, as log_dir/config.json records). A relaunch of the very same command (save_dir's
config.json, a Slurm requeue) resumes even when that command has overwrite or load_step: only
its first launch removes or rolls back anything.

Only the standard library is used: the command line checks a run's start before importing torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from megatron_ext.core.checkpoint_layout import (
    LATEST,
    RUN_CONFIG,
    checkpoint_dir,
    checkpoint_steps,
    latest_step,
    missing_root_message,
    nearest_checkpoint_roots,
    step_folders,
    write_latest,
)
from megatron_ext.training.config import ConfigError, TrainConfig, config_to_dict

__all__ = [
    "LOG_FILES",
    "RUN_CONFIG",
    "StartPlan",
    "apply_start_plan",
    "check_init_from",
    "plan_start",
    "recorded_run_config",
]

LOG_FILES = ("metrics.jsonl", "samples.jsonl")
"""The per-step record files of log_dir, each line a JSON object with a 'step'."""
# RUN_CONFIG (checkpoint_layout): the run's configuration (config_to_dict), written into save_dir
# and log_dir when it starts; a relaunch of the same command is told apart from another run by it.

_OVERWRITE = "--overwrite (checkpoint.overwrite=true)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StartPlan:
    """How a run starts, decided before any work (plan_start) and carried out by the trainer."""

    kind: str
    """'resume' (save_dir's own checkpoint), 'load' (load_dir's), 'init' (init_from's weights)
    or 'scratch'."""
    root: str | None = None
    """The checkpoint root to load from (None: scratch)."""
    step: int | None = None
    """The step to load."""
    full_state: bool = False
    """Restore optimizer, scheduler, RNG and data position too (else the weights only)."""
    start_step: int = 0
    """The step the run continues from (0 unless the full state is loaded)."""
    remove_steps: tuple[int, ...] = ()
    """Checkpoints of save_dir removed first (overwrite)."""
    trim_logs: bool = False
    """Drop log_dir's records of steps after start_step first."""
    message: str = ""
    """What rank 0 prints about the start."""


def _log_steps(log_dir: str | None) -> dict[str, list[int]]:
    """Per record file of log_dir, the steps of its records (unreadable lines are skipped)."""
    out: dict[str, list[int]] = {}
    if not log_dir:
        return out
    for name in LOG_FILES:
        path = Path(log_dir) / name
        if not path.is_file():
            continue
        steps = []
        for line in path.read_text().splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
        out[name] = steps
    return out


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


def check_init_from(root: str) -> int:
    """The step checkpoint.init_from starts from (its latest), after checking that it is a
    checkpoint root; ConfigError naming the path and what to pass instead."""
    name = f"checkpoint.init_from={root}"
    path = Path(root)
    if not path.exists():
        raise ConfigError(missing_root_message("checkpoint.init_from", root))
    if not path.is_dir():
        raise ConfigError(f"{name} is a file, not a checkpoint folder")
    step = latest_step(path)
    if step is None:
        if (path / "metadata.json").is_file():
            hint = (
                f"it is one checkpoint folder: name the root holding it and its '{LATEST}' file "
                f"({path.parent})"
            )
        elif (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            hint = (
                "it is a Hugging Face model directory: import it first with "
                f"`python tools/import_hf.py --hf {root} --out CKPT`, then pass --init-from CKPT"
            )
        else:
            near = nearest_checkpoint_roots(path)
            hint = f"folders in it: {step_folders(path) or 'none'}" + (
                f"; nearest checkpoint folders: {', '.join(near)}" if near else ""
            )
        raise ConfigError(f"{name} is not a checkpoint (no '{LATEST}' file); {hint}")
    if not (checkpoint_dir(path, step) / "metadata.json").is_file():
        raise ConfigError(
            f"{name}: its '{LATEST}' file names step {step}, but {checkpoint_dir(path, step)} is "
            f"missing or incomplete (folders: {step_folders(path) or 'none'})"
        )
    return step


def recorded_run_config(root: str | os.PathLike[str]) -> dict | None:
    """The run configuration recorded beside a checkpoint root's checkpoints (its config.json,
    as tools/import_hf.py and every training run write it: the `model` table, ...), or None when
    there is none or it is unreadable."""
    try:
        recorded = json.loads((Path(root) / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _load_plan(config: TrainConfig) -> StartPlan:
    """Rules 2 to 4 of the module docstring (save_dir holds nothing to resume from)."""
    ckpt = config.checkpoint
    root = ckpt.load_dir
    if root is None and ckpt.load_step is not None:
        root = ckpt.save_dir
    if root is None and ckpt.init_from is not None:
        step = check_init_from(ckpt.init_from)
        return StartPlan(
            kind="init",
            root=ckpt.init_from,
            step=step,
            message=f"initialising from {ckpt.init_from} step {step} (weights only, from step 0)",
        )
    if root is None:
        return StartPlan(kind="scratch", message="starting from scratch")
    path = Path(root)
    if not path.exists():  # load_dir is save_dir (a missing other load_dir was refused before)
        if ckpt.load_step is None:
            return StartPlan(kind="scratch", message="starting from scratch")
        raise ConfigError(f"checkpoint.load_step={ckpt.load_step}: {root} does not exist")
    if ckpt.load_step is not None:
        step = ckpt.load_step
        if not checkpoint_dir(path, step).is_dir():
            raise ConfigError(
                f"checkpoint.load_step={step}: {checkpoint_dir(path, step)} does not exist "
                f"(checkpoints under {root}: {step_folders(path) or 'none'})"
            )
    else:
        step = latest_step(path)
        if step is None:
            if _is_empty_dir(path) or _same(root, ckpt.save_dir):
                return StartPlan(
                    kind="scratch",
                    message=f"no checkpoint under {root} yet: starting from scratch (first launch)",
                )
            near = nearest_checkpoint_roots(path)
            raise ConfigError(
                f"checkpoint.load_dir={root} holds no checkpoint (no '{LATEST}' file; folders: "
                f"{step_folders(path) or 'none'})"
                + (f"; nearest checkpoint folders: {', '.join(near)}" if near else "")
                + "; an empty folder would mean a first launch"
            )
    full = ckpt.load_optimizer
    what = "whole" if full else "weights only, from step 0"
    return StartPlan(
        kind="load",
        root=str(root),
        step=step,
        full_state=full,
        start_step=step if full else 0,
        message=f"loading {root} step {step} ({what})",
    )


def plan_start(config: TrainConfig) -> StartPlan:
    """Decide how the run starts (module docstring); reads the folders, changes nothing.

    Raises:
        ConfigError: load_dir or load_step names no checkpoint (with the nearest ones), or the
            start would move save_dir's `latest` back or mix log_dir's metrics with an earlier
            run's, without checkpoint.overwrite.
        CheckpointError: save_dir's or load_dir's `latest` file is unreadable.
    """
    ckpt = config.checkpoint
    if (
        ckpt.load_dir
        and not Path(ckpt.load_dir).exists()
        and not _same(ckpt.load_dir, ckpt.save_dir)
    ):
        # Even when save_dir's checkpoints make it unused now: the next fresh start needs it.
        raise ConfigError(missing_root_message("checkpoint.load_dir", ckpt.load_dir))
    if ckpt.init_from is not None:
        check_init_from(ckpt.init_from)  # the same, for the checkpoint to initialise from
    save_steps = checkpoint_steps(ckpt.save_dir) if ckpt.save_dir else []
    saved_latest = latest_step(ckpt.save_dir) if ckpt.save_dir else None
    # The same command relaunched (a Slurm requeue) resumes, even one that started with
    # overwrite or load_step: only its first launch removes or rolls back anything.
    relaunch = _recorded(ckpt.save_dir, config, ignore=("logging",))
    if saved_latest is not None and (
        relaunch or not (ckpt.overwrite or ckpt.load_step is not None)
    ):
        note = ""
        if ckpt.load_dir and not _same(ckpt.load_dir, ckpt.save_dir):
            note = f"; checkpoint.load_dir={ckpt.load_dir} is only read while save_dir is empty"
        elif ckpt.init_from:
            note = f"; checkpoint.init_from={ckpt.init_from} is only read while save_dir is empty"
        return StartPlan(
            kind="resume",
            root=ckpt.save_dir,
            step=saved_latest,
            full_state=True,
            start_step=saved_latest,
            trim_logs=True,
            message=f"resuming from {ckpt.save_dir} at step {saved_latest} (its latest "
            f"checkpoint){note}",
        )
    plan = _load_plan(config)
    later = tuple(s for s in save_steps if s > plan.start_step)
    logged = {
        name: [s for s in steps if s > plan.start_step]
        for name, steps in _log_steps(config.logging.log_dir).items()
    }
    logged = {name: steps for name, steps in logged.items() if steps}
    if not later and not logged:
        return plan
    if not later and plan.start_step == 0 and _recorded(config.logging.log_dir, config):
        return dataclasses.replace(
            plan,
            trim_logs=True,
            message=f"{plan.message} (a relaunch of the run logged in {config.logging.log_dir}, "
            "which saved no checkpoint: its records are replaced)",
        )
    if not ckpt.overwrite:
        if later:
            what = (
                f"checkpoint.save_dir={ckpt.save_dir} holds checkpoints of steps up to "
                f"{max(later)}, and this run starts at step {plan.start_step} "
                f"({plan.message}): its saves would move 'latest' back"
            )
        else:
            name, steps = next(iter(logged.items()))
            what = (
                f"logging.log_dir={config.logging.log_dir} holds {name} records of steps "
                f"{min(steps)}-{max(steps)} of an earlier run, and this run starts at step "
                f"{plan.start_step} ({plan.message}): the two runs' records would mix"
            )
        raise ConfigError(
            f"{what}; pass {_OVERWRITE} to remove them and start anew, or use another save and "
            "log folder"
        )
    removed = f"; removing checkpoints of steps {list(later)}" if later else ""
    if logged:
        removed += " and the log records after step " + str(plan.start_step)
    return dataclasses.replace(
        plan, remove_steps=later, trim_logs=True, message=f"{plan.message} (overwrite{removed})"
    )


def _recorded(
    folder: str | None, config: TrainConfig, ignore: tuple[str, ...] = ("checkpoint", "logging")
) -> bool:
    """Whether the config.json that a start wrote in `folder` (save_dir or log_dir) is this
    run's configuration, apart from the sections in `ignore`."""
    if not folder:
        return False
    try:
        recorded = json.loads((Path(folder) / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    current = json.loads(json.dumps(config_to_dict(config)))  # tuples as lists, as in the file
    if not isinstance(recorded, dict):
        return False
    return all(recorded.get(k) == v for k, v in current.items() if k not in ignore) and set(
        recorded
    ) == set(current)


def _write_run_config(folder: str, config: TrainConfig) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = Path(folder) / f".{RUN_CONFIG}.tmp"
    tmp.write_text(json.dumps(config_to_dict(config), indent=2, default=str) + "\n")
    tmp.replace(Path(folder) / RUN_CONFIG)


def _trim_records(path: Path, last_step: int) -> int:
    """Keep the records of steps <= last_step (atomically); returns how many were dropped."""
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False  # a line cut short by a kill
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    return dropped


def apply_start_plan(plan: StartPlan, config: TrainConfig) -> None:
    """Remove what the plan says is stale (one rank only, before any save or log write).

    save_dir's `latest` is pointed at the newest remaining checkpoint (or removed) before any
    folder goes, so that it never names a missing one.
    """
    save_dir = config.checkpoint.save_dir
    if plan.remove_steps and save_dir:
        remaining = [s for s in checkpoint_steps(save_dir) if s not in plan.remove_steps]
        if remaining:
            write_latest(save_dir, max(remaining))
        else:
            (Path(save_dir) / LATEST).unlink(missing_ok=True)
        for step in plan.remove_steps:
            shutil.rmtree(checkpoint_dir(save_dir, step), ignore_errors=True)
    log_dir = config.logging.log_dir
    if plan.trim_logs and log_dir:
        for name in LOG_FILES:
            path = Path(log_dir) / name
            if path.is_file():
                _trim_records(path, plan.start_step)
    for folder in (save_dir, log_dir):
        if folder:
            _write_run_config(folder, config)
