"""Launching recipes with NeMo-Run: one run, its dry run, and the five loss presets side by side.

`launch` wraps a task in a `run.Experiment` (so the state of every job is known when it returns),
`dryrun` materializes what would run without running it (the torchrun command line for a local
executor, the sbatch script for Slurm) and `compare_presets` runs the tiny recipe once per loss
preset and seed, one after the other, then writes the comparison report (run_configs.report).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fiddle as fdl
import nemo_run as run

from run_configs.executors import check_world, executor_world_size, runs_here
from run_configs.recipes import PRESETS, pretrain_task, tiny_pretrain

__all__ = [
    "DryRun",
    "LaunchResult",
    "compare_presets",
    "comparison_runs",
    "dryrun",
    "job_logs",
    "launch",
    "preset_tasks",
    "seed_values",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchResult:
    """The outcome of `launch` / `compare_presets`."""

    experiment_id: str
    """NeMo-Run's experiment id (`run.Experiment.from_id` reopens it)."""
    experiment_dir: str
    """NeMo-Run's folder of the experiment (configs, job logs)."""
    states: dict[str, str]
    """Final state of every job by name (SUCCEEDED, FAILED, ...)."""

    @property
    def succeeded(self) -> bool:
        """Whether every job succeeded."""
        return bool(self.states) and all(s == "SUCCEEDED" for s in self.states.values())


@dataclasses.dataclass(frozen=True, kw_only=True)
class DryRun:
    """What a launch would do, materialized without running anything."""

    experiment_dir: str
    """NeMo-Run's folder of the dry run (job configs, the sbatch script for Slurm)."""
    scripts: dict[str, str]
    """Per job: the sbatch script (Slurm) or the command line with its environment (local)."""
    script_paths: dict[str, str]
    """Per job: where the sbatch script was written (Slurm only)."""


def _state_name(state: Any) -> str:
    return getattr(state, "name", str(state))


def _result(exp: run.Experiment) -> LaunchResult:
    executor = exp.jobs[0].executor
    return LaunchResult(
        experiment_id=executor.experiment_id,
        experiment_dir=executor.experiment_dir,
        states={job.id: _state_name(job.state) for job in exp.jobs},
    )


def launch(
    task: run.Partial,
    executor: run.Executor,
    *,
    name: str,
    tail_logs: bool = True,
    detach: bool = False,
    check: bool = True,
) -> LaunchResult:
    """Run one task on an executor and wait for it (unless detached); validate it first.

    Args:
        task: a run.Partial(pretrain, config=...) (recipes.pretrain_task).
        executor: a local or Slurm executor (run_configs.executors).
        name: the experiment and job name.
        tail_logs: stream the job's output.
        detach: return once submitted (Slurm).
        check: validate the configuration against the executor's world size first.
    """
    if check:
        check_world(
            task.config, executor_world_size(executor), check_environment=runs_here(executor)
        )
    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        exp.add(task, name=name, tail_logs=tail_logs)
        exp.run(detach=detach, tail_logs=tail_logs)
    return _result(exp)


def dryrun(
    tasks: dict[str, run.Partial],
    executor: run.Executor,
    *,
    name: str,
    check: bool = True,
) -> DryRun:
    """Materialize the launch of `tasks` (name -> task) on `executor` without running them.

    NeMo-Run writes the job files under NEMORUN_HOME/experiments/<name>/<id>/ as for a real
    launch; for Slurm that includes `<job>_sbatch.sh`, the script sbatch would get.
    """
    world = executor_world_size(executor)
    if check:
        for task in tasks.values():
            check_world(task.config, world, check_environment=runs_here(executor))
    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        for job_name, task in tasks.items():
            exp.add(task, name=job_name)
        exp.dryrun(log=False, delete_exp_dir=False)
    scripts: dict[str, str] = {}
    paths: dict[str, str] = {}
    for job in exp.jobs:
        ex = job.executor
        if isinstance(ex, run.SlurmExecutor):
            path = os.path.join(ex.experiment_dir, f"{ex.job_name}_sbatch.sh")
            paths[job.id] = path
            scripts[job.id] = Path(path).read_text()
        else:
            scripts[job.id] = _local_command(job)
    return DryRun(
        experiment_dir=exp.jobs[0].executor.experiment_dir, scripts=scripts, script_paths=paths
    )


def _local_command(job: Any) -> str:
    info = getattr(job, "_dryrun_info", None)
    request = getattr(info, "request", None)
    lines = []
    for replicas in getattr(request, "role_params", {}).values():
        for params in replicas:
            env = {k: v for k, v in params.env.items() if k in _SHOWN_ENV}
            lines.append(" ".join([*(f"{k}={v}" for k, v in sorted(env.items())), *params.args]))
    return "\n".join(lines) if lines else str(info)


_SHOWN_ENV = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_MAX_CONNECTIONS", "PATH")


# -- the five loss presets side by side -----------------------------------------------------------


def seed_values(seeds: int, base: int) -> list[int]:
    """The recipe seeds of a comparison with `seeds` seeds per preset: base, base + 1, ...

    Raises:
        ValueError: seeds is not an int >= 1.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(
            f"seeds={seeds!r}: a comparison needs at least one seed per preset (1 runs each "
            "preset once; 2 or more give intervals over seeds)"
        )
    return [base + i for i in range(seeds)]


def comparison_runs(
    *,
    out_dir: str | Path,
    presets: Sequence[str] = PRESETS,
    seeds: int = 1,
    recipe: Callable[..., fdl.Config] = tiny_pretrain,
    **recipe_kwargs: Any,
) -> dict[str, dict[int, tuple[Path, fdl.Config]]]:
    """Every run of a comparison: preset -> recipe seed -> (run folder, its config).

    With one seed a preset's run is out_dir/<preset>/ and uses the recipe's seed (`seed` in
    recipe_kwargs, else the recipe's default); with N seeds the runs are
    out_dir/<preset>/seed<S>/ for S = that seed + 0, 1, ..., N - 1. The seed sets the weight
    initialisation; data, its order and the schedule are the same for every run.
    """
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")
    seed_values(seeds, 0)  # refuses a bad count before anything is built
    out = Path(out_dir)
    kwargs = {k: v for k, v in recipe_kwargs.items() if k != "seed"}
    runs: dict[str, dict[int, tuple[Path, fdl.Config]]] = {}
    for preset in presets:
        base = recipe(preset=preset, out_dir=out / preset, **recipe_kwargs)
        if seeds == 1:
            runs[preset] = {base.seed: (out / preset, base)}
            continue
        runs[preset] = {
            seed: (
                out / preset / f"seed{seed}",
                recipe(preset=preset, out_dir=out / preset / f"seed{seed}", seed=seed, **kwargs),
            )
            for seed in seed_values(seeds, base.seed)
        }
    return runs


def _job_name(preset: str, seed: int, seeds: int) -> str:
    return preset if seeds == 1 else f"{preset}-seed{seed}"


def preset_tasks(
    *,
    out_dir: str | Path,
    presets: Sequence[str] = PRESETS,
    seeds: int = 1,
    recipe: Callable[..., fdl.Config] = tiny_pretrain,
    **recipe_kwargs: Any,
) -> dict[str, run.Partial]:
    """One pretrain task per loss preset and seed, named <preset> with one seed (writing to
    out_dir/<preset>/) and <preset>-seed<S> with more (out_dir/<preset>/seed<S>/); the same
    data and schedule everywhere, the same seed across presets (comparison_runs)."""
    runs = comparison_runs(
        out_dir=out_dir, presets=presets, seeds=seeds, recipe=recipe, **recipe_kwargs
    )
    return {
        _job_name(preset, seed, seeds): pretrain_task(config)
        for preset, by_seed in runs.items()
        for seed, (_, config) in by_seed.items()
    }


def compare_presets(
    *,
    out_dir: str | Path,
    executor: run.Executor,
    presets: Sequence[str] = PRESETS,
    seeds: int = 1,
    title: str = "preset_comparison",
    tail_logs: bool = False,
    report: bool = True,
    **recipe_kwargs: Any,
) -> LaunchResult:
    """Run the tiny recipe once per loss preset and seed, sequentially, in one run.Experiment;
    then write out_dir/report.md, report.png and report.json (run_configs.report: with several
    seeds, every metric's mean and 95% interval over seeds and the entropy-ordering verdicts).

    Args:
        out_dir: folder of the runs (out_dir/<preset>/ with one seed, out_dir/<preset>/seed<S>/
            with more; each with checkpoints/ and logs/metrics.jsonl).
        executor: where each run goes (e.g. local_executor(1) on a CPU).
        presets: which presets, in order.
        seeds: runs per preset, at the recipe's seed + 0, 1, ..., seeds - 1.
        title: the experiment's name.
        tail_logs: stream every run's output.
        report: write the report when every run succeeded.
        **recipe_kwargs: passed to tiny_pretrain (data_dir, vocab_size, train_steps, ...).
    """
    runs = comparison_runs(out_dir=out_dir, presets=presets, seeds=seeds, **recipe_kwargs)
    world = executor_world_size(executor)
    for by_seed in runs.values():
        for _, config in by_seed.values():
            check_world(config, world, check_environment=runs_here(executor))
    with run.Experiment(title, executor=executor, log_level="WARN") as exp:
        for preset, by_seed in runs.items():
            for seed, (_, config) in by_seed.items():
                name = _job_name(preset, seed, seeds)
                exp.add(pretrain_task(config), name=name, tail_logs=tail_logs)
        exp.run(sequential=True, tail_logs=tail_logs)
    result = _result(exp)
    if report and result.succeeded:
        from run_configs.report import write_report

        folders = {p: [folder for folder, _ in by_seed.values()] for p, by_seed in runs.items()}
        write_report(folders, Path(out_dir))
    return result


def job_logs(result: LaunchResult, job: str) -> list[str]:
    """Paths of NeMo-Run's log files of one job of a launch (for error messages)."""
    return sorted(glob.glob(os.path.join(result.experiment_dir, job, "log*")))
