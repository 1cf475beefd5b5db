"""Command line: `python -m run_configs COMMAND [options] [key=value ...]`.

    python -m run_configs pretrain --recipe tiny --preset precision --executor local --nproc 2 tp=2
    python -m run_configs pretrain --recipe dense_4b --preset precision --executor slurm \\
        --account ACC --partition batch --nodes 16 --container-image IMG \\
        --mount /lustre/data:/data --mount /lustre/results:/results --dryrun
    python -m run_configs midtrain --recipe dense_4b --preset precision --executor slurm ...
    python -m run_configs midtrain --recipe tiny --init-from CKPT --preset precision --nproc 2 tp=2
    python -m run_configs compare --data-dir outputs/main/corpus --out outputs/compare --steps 200
    python -m run_configs compare --presets ce precision --seeds 3 --out outputs/compare3
    python -m run_configs rl-probe --compare-dir outputs/compare --data-dir outputs/main/corpus
    python -m run_configs report outputs/compare/ce outputs/compare/precision --out DIR
    python -m run_configs recipes

Overrides use NeMo-Run's CLI syntax (`key=value`, `key*=2`, `key+=1`, `[a,b]`, `None`): a recipe
argument by name (`train_steps=50`, `tensor=2`, or the short names tp, pp, ep, cp, steps, gbs, mbs,
lr, min_lr, seq) rebuilds the recipe with it, so values derived from it follow (the decay length
from the step count); any TrainConfig field by its dotted path (`optimizer.lr=1e-4`,
`model.num_layers=4`, `data.paths=[/d/a,/d/b]`, `checkpoint.load_dir=DIR`) is set in the built
run.Config tree as is; `executor.FIELD=VALUE` sets an executor field (`executor.time=08:00:00`).
`--dryrun` validates everything and prints the resolved configuration, the parallel layout and
what would run (the torchrun command line, or the sbatch script) without running it. `midtrain`
starts from a pre-training run (`--load`) or from a model imported from Hugging Face
(`--init-from CKPT`, made by tools/import_hf.py: its weights from step 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_ext.data.default_corpus import corpus_tokens

__all__ = ["main"]


# -- commands -------------------------------------------------------------------------------------


def _ensure_corpus(data_dir: str) -> None:
    """Build the embedded default corpus in data_dir unless it is there (15-30 s)."""
    if (Path(data_dir) / "manifest.json").is_file():
        return
    from megatron_ext.data import build_default_corpus

    print(
        f"building the default corpus in {data_dir} (none there yet; --data-dir DIR reuses "
        "another build, e.g. make demo's outputs/main/corpus)",
        flush=True,
    )
    build_default_corpus(data_dir)


def _recipe(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The recipe function and its arguments from the command-line options."""
    from run_configs.recipes import get_recipe

    recipe = get_recipe(args.recipe, args.command)
    if args.preset is None:
        args.preset = _continued_preset(args)
    kwargs: dict[str, Any] = {"preset": args.preset}
    if args.out is not None:
        kwargs["out_dir"] = args.out
    if args.recipe == "tiny":
        kwargs["data_dir"] = args.data_dir
        kwargs.update(corpus_tokens(args.data_dir))
        if args.data:
            raise ValueError("--data is for the paper recipes; the tiny recipe takes --data-dir")
    elif args.data:
        kwargs["data_paths"] = list(args.data)
    if args.load:
        kwargs["load_dir"] = args.load
    if args.init_from:
        kwargs["init_from"] = args.init_from
    return recipe, kwargs


def _precheck(args: argparse.Namespace) -> None:
    """The argument checks that need neither NeMo-Run nor megatron-core (10-25 s to import).

    Raises:
        ValueError: naming the option and the fix.
    """
    if args.command == "compare":
        if args.seeds < 1:
            raise ValueError(
                f"--seeds {args.seeds}: a comparison needs at least one seed per preset; pass "
                "--seeds 1 (each preset once, the default) or more (--seeds 3: a mean and a 95% "
                "interval over seeds for every metric)"
            )
        if args.rl_probe:
            _require_trl()
            _rl_config(args)  # refuses bad settings before the comparison's runs
        found = _earlier_comparison(args)
        if found and not args.overwrite and not args.dryrun:
            raise ValueError(
                f"--out {args.out} holds an earlier comparison "
                f"({', '.join(p.name for p in found)}); pass --overwrite to remove it and start "
                "clean, or choose another --out"
            )
        return
    if args.command == "rl-probe":
        _precheck_rl_probe(args)
        return
    if args.command not in ("pretrain", "midtrain"):
        return
    from megatron_ext.core.checkpoint_layout import missing_root_message

    fields = {item.partition("=")[0] for item in args.overrides}
    if args.recipe == "tiny" and args.data:
        raise ValueError("--data is for the paper recipes; the tiny recipe takes --data-dir")
    if args.recipe != "tiny" and not args.data and "data.paths" not in fields:
        raise ValueError(
            f"--recipe {args.recipe} needs --data PREFIX [PREFIX ...]: the indexed datasets as "
            f"the job sees them (e.g. /data/{args.command}_text_document; "
            "tools/preprocess_data.py makes them)"
        )
    if args.command == "pretrain" and args.load:
        raise ValueError(
            "--load is for midtrain; a pretrain run resumes from its own checkpoint folder, and "
            "checkpoint.load_dir=DIR starts it from another run's"
        )
    if args.command == "pretrain" and args.init_from:
        raise ValueError(
            "--init-from is for midtrain; a pretrain run starts from another checkpoint's weights "
            "with checkpoint.init_from=DIR"
        )
    if args.load and args.init_from:
        raise ValueError(
            f"--load {args.load} and --init-from {args.init_from} both name where mid-training "
            "starts: --load continues a pre-training run, --init-from takes a model imported with "
            "tools/import_hf.py; pass one"
        )
    if args.command == "midtrain" and args.recipe == "tiny" and not (args.load or args.init_from):
        raise ValueError(
            "midtrain --recipe tiny needs --load (the pre-training checkpoints) or --init-from "
            "(a model imported with tools/import_hf.py)"
        )
    if args.load and args.executor == "local" and not Path(args.load).exists():
        raise ValueError(missing_root_message("--load", args.load))
    if args.init_from and args.executor == "local":
        from megatron_ext.training.start import check_init_from

        check_init_from(args.init_from)  # a typo, a Hugging Face directory not imported yet
    if args.executor == "slurm" and args.packager == "git":
        inside = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False
        )
        if inside.returncode != 0:
            raise ValueError(
                f"--packager git ships the committed HEAD of the repository this runs in, but "
                f"{os.getcwd()} is not inside a git checkout: run from the repository, or pass "
                "--packager none when the container image has the code"
            )


def _precheck_rl_probe(args: argparse.Namespace) -> None:
    """The RL probe's checks before anything slow: TRL, the folders, the settings."""
    _require_trl()
    if not Path(args.compare_dir).is_dir():
        raise ValueError(
            f"--compare-dir {args.compare_dir} does not exist: run `python -m run_configs "
            f"compare --out {args.compare_dir}` first"
        )
    if not (Path(args.data_dir) / "manifest.json").is_file():
        raise ValueError(
            f"--data-dir {args.data_dir} holds no built corpus (manifest.json): pass the corpus "
            "the comparison was trained on (make demo builds outputs/main/corpus)"
        )
    _rl_config(args)  # refuses bad settings


def _require_trl() -> None:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise ValueError(
            "the RL probe needs TRL, which is not installed: pip install -e '.[rl]' (the "
            "project's rl extra; tools/bootstrap.sh installs it)"
        )


def _rl_config(args: argparse.Namespace) -> Any:
    from run_configs.rl_probe import RLProbeConfig

    return RLProbeConfig(
        train_prompts=args.prompts,
        eval_prompts=args.eval_prompts,
        steps=args.rl_steps,
        prompts_per_step=args.prompts_per_step,
        num_generations=args.generations,
        learning_rate=args.rl_lr,
        eval_samples=args.samples,
        seed=args.rl_seed,
    )


def _rl_probe(args: argparse.Namespace) -> int:
    from run_configs.names import PRESETS
    from run_configs.rl_probe import run_rl_probe

    presets = args.presets or [p for p in PRESETS if (Path(args.compare_dir) / p).is_dir()]
    if not presets:
        raise ValueError(
            f"--compare-dir {args.compare_dir} holds no preset run ({', '.join(PRESETS)}): run "
            f"`python -m run_configs compare --out {args.compare_dir}` first"
        )
    report = run_rl_probe(
        args.compare_dir,
        args.data_dir,
        presets=presets,
        config=_rl_config(args),
        out_dir=args.rl_out,
    )
    print(report.markdown.read_text())
    print(f"RL probe report: {report.markdown}, {report.plot}")
    return 0


def _continued_preset(args: argparse.Namespace) -> str:
    """midtrain without --preset: the loss preset of the checkpoint it continues."""
    from megatron_ext.core.checkpoint_layout import checkpoint_dir, latest_step
    from megatron_ext.export.from_training import training_run_config
    from megatron_ext.loss.config import RewardShapingConfig

    load = args.load or getattr(args, "init_from", None)
    step = latest_step(load) if load and Path(load).is_dir() else None
    if step is None:
        raise ValueError(
            f"midtrain needs --preset: the checkpoint it continues ({load or 'the recipe default'})"
            " cannot be read here to take the pre-training's preset from it"
        )
    shaping = training_run_config(checkpoint_dir(load, step)).get("shaping")
    if shaping is None:
        raise ValueError(
            f"midtrain needs --preset: {load} (step {step}) records no loss, as a model imported "
            f"from Hugging Face does; choose one of {', '.join(RewardShapingConfig.PRESET_NAMES)}"
        )
    for name in RewardShapingConfig.PRESET_NAMES:
        values = dataclasses.asdict(RewardShapingConfig.preset(name))
        if all(shaping.get(k) == v for k, v in values.items()):
            print(f"loss preset {name!r}: the one {load} (step {step}) was trained with")
            return name
    raise ValueError(
        f"{load} (step {step}) was trained with a loss that is no preset ({shaping}); pass "
        "--preset, and shaping.FIELD=VALUE overrides for the rest"
    )


def _executor(args: argparse.Namespace) -> Any:
    import nemo_run as run

    from run_configs.executors import local_executor, slurm_executor
    from run_configs.recipes import PAPER_LAYOUTS

    if args.executor == "local":
        gpu = None if args.device == "auto" else args.device == "gpu"
        return local_executor(args.nproc, gpu=gpu)
    if not args.account:
        raise ValueError("--executor slurm needs --account")
    default = PAPER_LAYOUTS.get((args.recipe, args.command))
    nodes = args.nodes or (default.nodes if default else 1)
    gpus = args.gpus_per_node or (default.gpus_per_node if default else 1)
    return slurm_executor(
        account=args.account,
        partition=args.partition,
        nodes=nodes,
        gpus_per_node=gpus,
        container_image=args.container_image,
        container_mounts=args.mount or (),
        time=args.time,
        job_dir=args.job_dir,
        ssh_host=args.ssh_host,
        ssh_user=args.ssh_user,
        qos=args.qos,
        packager=run.Packager() if args.packager == "none" else None,
    )


def _train(args: argparse.Namespace) -> int:
    import fiddle as fdl

    from megatron_ext.training import config_to_dict
    from run_configs.executors import (
        check_world,
        executor_world_size,
        override_executor,
        runs_here,
        use_nemorun_home,
    )
    from run_configs.experiments import dryrun, launch
    from run_configs.overrides import apply_overrides, split_overrides
    from run_configs.recipes import pretrain_task

    if args.nemorun_home:
        use_nemorun_home(args.nemorun_home)
    if args.recipe == "tiny" and not args.dryrun:
        _ensure_corpus(args.data_dir)
    recipe, kwargs = _recipe(args)
    overrides = split_overrides(args.overrides, recipe)
    config = apply_overrides(recipe(**kwargs, **overrides.recipe), overrides.config)
    if args.overwrite:
        config.checkpoint.overwrite = True
    executor = override_executor(_executor(args), overrides.executor)
    if args.executor == "slurm" and args.packager == "git":
        _warn_uncommitted()
    world = executor_world_size(executor)
    layout = check_world(config, world, check_environment=runs_here(executor))
    name = args.name or f"{args.command}-{args.recipe}-{args.preset}"
    task = pretrain_task(config)
    print(f"{name}: {type(executor).__name__}, {layout}")
    if args.dryrun:
        print("resolved configuration:")
        print(json.dumps(config_to_dict(fdl.build(config)), indent=2, default=str))
        result = dryrun({name: task}, executor, name=name, check=False)
        for job, script in result.scripts.items():
            where = result.script_paths.get(job)
            print(f"--- {job}: {'sbatch script ' + where if where else 'command'} ---")
            print(script)
        print(f"dry run: nothing was launched (job files in {result.experiment_dir})")
        return 0
    outputs = f"checkpoints {config.checkpoint.save_dir}, metrics {config.logging.log_dir}"
    print(f"run folders: {outputs}", flush=True)
    outcome = launch(task, executor, name=name, detach=args.detach, check=False)
    for job, state in outcome.states.items():
        print(f"{job}: {state}")
    print(f"experiment {outcome.experiment_id}: {outcome.experiment_dir}")
    if outcome.succeeded:
        print(f"outputs: {outputs}/metrics.jsonl")
    return 0 if outcome.succeeded or args.detach else 1


def _warn_uncommitted() -> None:
    """The git packager ships the committed HEAD: say so when the working tree differs."""
    try:
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=normal"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return
    if changed:
        shown = ", ".join(line[3:] for line in changed[:3]) + (", ..." if len(changed) > 3 else "")
        print(
            f"warning: the working tree has {len(changed)} uncommitted change(s) ({shown}); the "
            f"git packager ships the committed HEAD {head} only: commit them, or pass "
            "--packager none when the image has the code",
            file=sys.stderr,
            flush=True,
        )


def _compare(args: argparse.Namespace) -> int:
    from run_configs.executors import local_executor, use_nemorun_home
    from run_configs.experiments import compare_presets, dryrun, preset_tasks

    if args.nemorun_home:
        use_nemorun_home(args.nemorun_home)
    data_dir = args.data_dir
    if not args.dryrun:
        _clear_comparison(args)
        _ensure_corpus(data_dir)
    kwargs: dict[str, Any] = {
        "data_dir": data_dir,
        "train_steps": args.steps,
        "tensor": args.tp,
        **corpus_tokens(data_dir),
    }
    executor = local_executor(args.nproc, gpu=False if args.device == "cpu" else None)
    if args.dryrun:
        tasks = preset_tasks(out_dir=args.out, presets=args.presets, seeds=args.seeds, **kwargs)
        result = dryrun(tasks, executor, name="preset_comparison")
        for job, script in result.scripts.items():
            print(f"--- {job} ---\n{script}")
        return 0
    outcome = compare_presets(
        out_dir=args.out,
        executor=executor,
        presets=args.presets,
        seeds=args.seeds,
        tail_logs=args.tail_logs,
        **kwargs,
    )
    for job, state in outcome.states.items():
        print(f"{job}: {state}")
    if not outcome.succeeded:
        print(f"some runs failed; logs under {outcome.experiment_dir}", file=sys.stderr)
        return 1
    print((Path(args.out) / "report.md").read_text())
    print(f"report: {Path(args.out) / 'report.md'}, {Path(args.out) / 'report.png'}")
    if args.rl_probe:
        args.compare_dir, args.rl_out = args.out, None
        return _rl_probe(args)
    return 0


def _earlier_comparison(args: argparse.Namespace) -> list[Path]:
    """What an earlier comparison left in --out: its preset runs and report files."""
    out = Path(args.out)
    from run_configs.names import PRESETS

    return [
        p
        for p in [
            *(out / name for name in PRESETS),
            *(out / f"report.{e}" for e in _REPORT_EXT),
            out / "rl_probe",
        ]
        if p.exists()
    ]


_REPORT_EXT = ("md", "png", "json")


def _clear_comparison(args: argparse.Namespace) -> None:
    """With --overwrite, remove an earlier comparison's runs and report from --out."""
    import shutil

    found = _earlier_comparison(args)
    if found and args.overwrite:
        print(f"--overwrite: removing the earlier comparison in {args.out}", flush=True)
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _report(args: argparse.Namespace) -> int:
    from run_configs.report import write_report

    runs: dict[str, list[str]] = {}
    for item in args.runs:  # a name given more than once: its runs are seeds
        name, sep, path = item.partition("=")
        runs.setdefault(name if sep else Path(item).name, []).append(path if sep else item)
    paths = write_report(runs, args.out)
    print(paths.markdown.read_text())
    print(f"report: {paths.markdown}, {paths.plot}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    import fiddle as fdl

    from run_configs.recipes import PAPER_LAYOUTS, PAPER_MODELS, PRESETS, get_recipe

    print(f"loss presets: {', '.join(PRESETS)}")
    print("tiny: 2 layers x 64, embedded default corpus, CPU (pretrain, midtrain)")
    for model in PAPER_MODELS:
        for stage in ("pretrain", "midtrain"):
            cfg = fdl.build(get_recipe(model, stage)())
            lay = PAPER_LAYOUTS[(model, stage)]
            dp = lay.world_size // (lay.tensor * lay.pipeline * lay.context)
            print(
                f"{model:>14} {stage:<8}: seq {cfg.model.seq_length}, rope {cfg.model.rope_base:g},"
                f" {cfg.train_steps} steps x {cfg.global_batch_size} seqs, "
                f"{lay.nodes} nodes x {lay.gpus_per_node} GPUs, TP={lay.tensor} PP={lay.pipeline} "
                f"CP={lay.context} DP={dp} EP={lay.expert}, mbs {cfg.micro_batch_size}"
            )
    return 0


_CORPUS_DIR = "outputs/main/corpus"
"""Where `make demo` builds the default corpus; the launcher's default too (one copy)."""


def _parser() -> argparse.ArgumentParser:
    from run_configs.names import PRESETS, RECIPE_NAMES

    p = argparse.ArgumentParser(
        prog="python -m run_configs",
        description="NeMo-Run launcher of megatron_ext.training: recipes, executors, experiments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True)
    for stage in ("pretrain", "midtrain"):
        s = sub.add_parser(stage, help=f"{stage} with a recipe on an executor")
        s.add_argument("--recipe", required=True, choices=RECIPE_NAMES)
        if stage == "pretrain":
            s.add_argument("--preset", default="ce", choices=PRESETS, help="loss preset (ce)")
        else:
            s.add_argument(
                "--preset",
                choices=PRESETS,
                help="loss preset (default: the one the --load or --init-from checkpoint was "
                "trained with; an import from Hugging Face needs it)",
            )
        s.add_argument("--executor", default="local", choices=("local", "slurm"))
        s.add_argument("--name", help="experiment/job name")
        s.add_argument("--out", help="run output folder (checkpoints/, logs/)")
        s.add_argument(
            "--data-dir",
            default=_CORPUS_DIR,
            help="tiny: default-corpus folder, built first if missing (%(default)s)",
        )
        s.add_argument("--data", nargs="+", help="paper recipes: indexed dataset prefixes")
        s.add_argument("--load", help="midtrain: the pre-training checkpoint folder")
        s.add_argument(
            "--init-from",
            metavar="CKPT",
            help="midtrain: instead of --load, a checkpoint root made by tools/import_hf.py (its "
            "weights, from step 0); the tiny recipe takes its model, a paper recipe checks it",
        )
        s.add_argument("--dryrun", action="store_true", help="validate and print, run nothing")
        s.add_argument(
            "--overwrite",
            action="store_true",
            help="start anew although --out holds an earlier run (its checkpoints are removed)",
        )
        s.add_argument("--detach", action="store_true", help="Slurm: return once submitted")
        s.add_argument("--nemorun-home", help="NeMo-Run's folder (default $NEMORUN_HOME)")
        g = s.add_argument_group("local executor")
        g.add_argument("--nproc", type=int, default=1, help="ranks (torchrun processes)")
        g.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
        g = s.add_argument_group("slurm executor")
        g.add_argument("--account")
        g.add_argument("--partition")
        g.add_argument("--nodes", type=int, help="default: the recipe's layout")
        g.add_argument("--gpus-per-node", type=int, help="default: the recipe's layout (8)")
        g.add_argument("--container-image")
        g.add_argument("--mount", action="append", metavar="SRC:DST", help="repeatable")
        g.add_argument("--time", default="04:00:00")
        g.add_argument("--qos")
        g.add_argument(
            "--job-dir",
            help="NeMo-Run's job folder (packaged code, configs, sbatch logs) on storage every "
            "node sees (default: $NEMORUN_HOME/jobs; needed with --ssh-host; /tmp is "
            "refused for more than one node)",
        )
        g.add_argument("--ssh-host", help="submit through this login node")
        g.add_argument("--ssh-user")
        g.add_argument(
            "--packager",
            choices=("git", "none"),
            default="git",
            help="git: ship this repository's HEAD (git archive); none: the image has the code",
        )
        s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
        s.set_defaults(func=_train)

    c = sub.add_parser("compare", help="the five loss presets side by side on the tiny recipe")
    c.add_argument("--data-dir", default=_CORPUS_DIR, help="built first if missing")
    c.add_argument("--out", default="outputs/compare")
    c.add_argument(
        "--overwrite", action="store_true", help="remove an earlier comparison in --out first"
    )
    c.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    c.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per preset, at the recipe's seed + 0, 1, ...; 2 or more: means and 95%% "
        "intervals over seeds, the entropy-ordering verdicts (%(default)s)",
    )
    c.add_argument("--steps", type=int, default=200)
    c.add_argument("--nproc", type=int, default=1)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--device", choices=("auto", "cpu"), default="cpu")
    c.add_argument("--tail-logs", action="store_true")
    c.add_argument("--dryrun", action="store_true")
    c.add_argument("--nemorun-home")
    c.add_argument(
        "--rl-probe",
        action="store_true",
        help="then run the RL probe on the runs (rl-probe; its options below)",
    )
    _rl_options(c)
    c.set_defaults(func=_compare)

    q = sub.add_parser(
        "rl-probe",
        help="GRPO (TRL) from each preset's exported checkpoint of a comparison, before/after",
        description="Export every run of a comparison to Hugging Face format and give each the "
        "same short GRPO run on next-word completion of the corpus (run_configs/rl_probe.py); "
        "report reward, pass@1, pass@8 and the policy entropy before, during and after RL per "
        "preset, over seeds.",
    )
    q.add_argument("--compare-dir", default="outputs/compare", help="compare's --out")
    q.add_argument("--data-dir", default=_CORPUS_DIR, help="the comparison's corpus")
    q.add_argument(
        "--presets", nargs="+", choices=PRESETS, help="default: every preset in --compare-dir"
    )
    q.add_argument("--out", dest="rl_out", help="report folder (default <compare-dir>/rl_probe)")
    _rl_options(q)
    q.set_defaults(func=_rl_probe)

    r = sub.add_parser("report", help="table and plot from runs' metrics.jsonl")
    r.add_argument(
        "runs", nargs="+", metavar="[NAME=]RUN_DIR", help="a NAME given more than once: its seeds"
    )
    r.add_argument("--out", required=True)
    r.set_defaults(func=_report)

    sub.add_parser("recipes", help="list the recipes and their layouts").set_defaults(func=_recipes)
    return p


def _rl_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("RL probe")
    g.add_argument("--rl-steps", type=int, default=40, help="GRPO steps (%(default)s)")
    g.add_argument("--prompts", type=int, default=64, help="GRPO prompts (%(default)s)")
    g.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts (%(default)s)")
    g.add_argument(
        "--prompts-per-step", type=int, default=4, help="GRPO prompts per step (%(default)s)"
    )
    g.add_argument("--generations", type=int, default=8, help="GRPO group size (%(default)s)")
    g.add_argument("--rl-lr", type=float, default=1e-3, help="GRPO learning rate (%(default)s)")
    g.add_argument(
        "--samples", type=int, default=16, help="samples per held-out prompt (%(default)s)"
    )
    g.add_argument("--rl-seed", type=int, default=0, help="prompts and sampling (%(default)s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m run_configs`."""
    from megatron_ext.core.checkpoint_layout import CheckpointError
    from megatron_ext.training.config import ConfigError

    args = _parser().parse_args(argv)
    try:
        _precheck(args)
        return args.func(args)
    except (ValueError, ConfigError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
