"""Where a run starts (megatron_ext.training.start): relaunches resume, nothing restarts silently.

Each case that used to lose or restart a run without a word (a mistyped --load, a relaunch into
the same --save, a new run in an old run's folders, a rollback with --load-step) is now a resume
or an error naming the fix; with checkpoint.overwrite the stale checkpoints and log records go
first, and `latest` never names a missing folder. No process group is needed: the plan is made
from the folders alone, as the command line does before importing torch.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from megatron_ext.core.checkpoint_layout import (
    checkpoint_dir,
    latest_step,
    nearest_checkpoint_roots,
)
from megatron_ext.models import model_preset
from megatron_ext.training import CheckpointConfig, ConfigError, LoggingConfig, TrainConfig
from megatron_ext.training.start import apply_start_plan, plan_start
from tests.tiny_run import run_training_cli

ROOT = Path(__file__).resolve().parents[1]


def _run_dir(root: Path, steps: tuple[int, ...], logged: int = 0) -> Path:
    """A run folder: step folders, `latest` at the last one, metrics of steps 1..logged."""
    for step in steps:
        checkpoint_dir(root / "ckpt", step).mkdir(parents=True)
    if steps:
        (root / "ckpt" / "latest").write_text(f"{steps[-1]}\n")
    if logged:
        (root / "logs").mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, logged + 1)]
        (root / "logs" / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9')  # cut off
    return root


def _config(root: Path, **checkpoint) -> TrainConfig:
    checkpoint.setdefault("save_dir", str(root / "ckpt"))
    return TrainConfig(
        model=model_preset("tiny"),
        checkpoint=CheckpointConfig(**checkpoint),
        logging=LoggingConfig(log_dir=str(root / "logs")),
        train_steps=20,
    )


def _logged_steps(root: Path) -> list[int]:
    text = (root / "logs" / "metrics.jsonl").read_text()
    return [json.loads(line)["step"] for line in text.splitlines()]


def test_first_launch_starts_from_scratch(tmp_path):
    plan = plan_start(_config(tmp_path))
    assert (plan.kind, plan.root, plan.start_step) == ("scratch", None, 0)
    # An existing, empty --load folder is a first launch too.
    (tmp_path / "empty").mkdir()
    plan = plan_start(_config(tmp_path, load_dir=str(tmp_path / "empty")))
    assert plan.kind == "scratch" and "first launch" in plan.message


def test_relaunch_resumes_from_its_own_checkpoints_and_drops_redone_records(tmp_path):
    """The README's command relaunched without --load: before, it started again at step 1 and
    moved `latest` back; now it resumes, and the records of steps after the checkpoint (written
    by the attempt that died) are dropped, so every step has one record."""
    root = _run_dir(tmp_path, (4, 8), logged=10)
    plan = plan_start(_config(root))
    assert (plan.kind, plan.step, plan.start_step, plan.full_state) == ("resume", 8, 8, True)
    apply_start_plan(plan, _config(root))
    assert _logged_steps(root) == list(range(1, 9))
    assert latest_step(root / "ckpt") == 8


def test_save_dir_wins_over_load_dir_once_it_has_checkpoints(tmp_path):
    """A mid-training run relaunched: its own checkpoints, not the pre-training ones again."""
    pre = _run_dir(tmp_path / "pre", (100,))
    mid = _run_dir(tmp_path / "mid", (3,))
    config = _config(mid, load_dir=str(pre / "ckpt"), load_optimizer=False)
    plan = plan_start(config)
    assert (plan.kind, plan.root, plan.step) == ("resume", str(mid / "ckpt"), 3)
    assert "only read while save_dir is empty" in plan.message
    # Before its first save it loads the pre-training weights, from step 0.
    fresh = _config(tmp_path / "mid2", load_dir=str(pre / "ckpt"), load_optimizer=False)
    plan = plan_start(fresh)
    assert (plan.kind, plan.step, plan.full_state, plan.start_step) == ("load", 100, False, 0)


@pytest.mark.parametrize(
    ("typo", "nearest"),
    [
        ("runs/tinyy", "runs/tiny"),
        ("outputs/main/train/checkpoint", "outputs/main/train/checkpoints"),
    ],
)
def test_missing_load_dir_is_an_error_naming_the_nearest_checkpoint(
    tmp_path, monkeypatch, typo, nearest
):
    """Before: 'starting from scratch' and exit 0."""
    monkeypatch.chdir(tmp_path)
    _run_dir(tmp_path / "real", (5,))
    (tmp_path / nearest).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "real" / "ckpt").rename(tmp_path / nearest)
    assert nearest_checkpoint_roots(typo) == [nearest]
    with pytest.raises(ConfigError) as info:
        plan_start(_config(tmp_path / "new", load_dir=typo))
    assert f"checkpoint.load_dir={typo} does not exist" in str(info.value)
    assert f"nearest checkpoint folders: {nearest}" in str(info.value)


def test_a_folder_that_is_no_checkpoint_is_refused(tmp_path):
    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    (tmp_path / "run" / "ckpt" / "latest").write_text("2\n")
    checkpoint_dir(tmp_path / "run" / "ckpt", 2).mkdir()
    with pytest.raises(ConfigError, match=r"holds no checkpoint \(no 'latest' file.*nearest"):
        plan_start(_config(tmp_path / "new", load_dir=str(tmp_path / "run")))


def test_new_run_in_an_old_runs_folders_needs_overwrite(tmp_path):
    """Another run pointed at the same --save: refused with the flag named; with it, the old
    checkpoints and metrics are removed first and `latest` never names a missing folder."""
    root = _run_dir(tmp_path, (4, 8), logged=8)
    pre = _run_dir(tmp_path / "pre", (50,))
    config = _config(root, load_dir=str(pre / "ckpt"), load_step=50, load_optimizer=False)
    with pytest.raises(ConfigError) as info:
        plan_start(config)
    message = str(info.value)
    assert "holds checkpoints of steps up to 8" in message and "move 'latest' back" in message
    assert "--overwrite (checkpoint.overwrite=true)" in message
    config = _config(
        root, load_dir=str(pre / "ckpt"), load_step=50, load_optimizer=False, overwrite=True
    )
    plan = plan_start(config)
    assert plan.remove_steps == (4, 8) and plan.start_step == 0
    apply_start_plan(plan, config)
    assert not (root / "ckpt" / "latest").exists()
    assert [p.name for p in (root / "ckpt").iterdir()] == ["config.json"]  # this run's
    assert (root / "logs" / "metrics.jsonl").read_text() == ""
    # The same command relaunched (a requeue) after its first saves resumes: --overwrite
    # removed the earlier run once, never this run's own checkpoints.
    checkpoint_dir(root / "ckpt", 3).mkdir()
    (root / "ckpt" / "latest").write_text("3\n")
    again = plan_start(config)
    assert (again.kind, again.step, again.remove_steps) == ("resume", 3, ())


def test_rollback_with_load_step_keeps_the_earlier_checkpoints(tmp_path):
    root = _run_dir(tmp_path, (4, 8, 12), logged=12)
    with pytest.raises(ConfigError, match="up to 12, and this run starts at step 8"):
        plan_start(_config(root, load_step=8))
    config = _config(root, load_step=8, overwrite=True)
    plan = plan_start(config)
    assert (plan.kind, plan.root, plan.step, plan.remove_steps) == (
        "load",
        str(root / "ckpt"),
        8,
        (12,),
    )
    apply_start_plan(plan, config)
    assert latest_step(root / "ckpt") == 8
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == [
        "config.json",
        "iter_0000004",
        "iter_0000008",
        "latest",
    ]
    assert _logged_steps(root) == list(range(1, 9))
    # Requeued with the same --load-step: resumes from its own later saves, no second rollback.
    checkpoint_dir(root / "ckpt", 10).mkdir()
    (root / "ckpt" / "latest").write_text("10\n")
    assert plan_start(config).kind == "resume" and plan_start(config).step == 10


def test_metrics_of_another_run_are_not_mixed(tmp_path):
    """log_dir with an earlier run's metrics but no checkpoint to resume: refused."""
    root = _run_dir(tmp_path, (), logged=5)
    with pytest.raises(ConfigError, match=r"metrics.jsonl records of steps 1-5 of an earlier run"):
        plan_start(_config(root))
    assert plan_start(_config(root, overwrite=True)).trim_logs


def test_relaunch_before_the_first_checkpoint_replaces_its_own_records(tmp_path):
    """A run killed before its first save: the same command starts again from scratch and
    replaces its records; another run (a different lr) is refused instead."""
    root = _run_dir(tmp_path, ())
    config = _config(root)
    apply_start_plan(plan_start(config), config)  # the first launch records its config
    _run_dir(tmp_path, (), logged=3)
    plan = plan_start(config)
    assert plan.kind == "scratch" and plan.trim_logs and "saved no checkpoint" in plan.message
    other = dataclasses.replace(config, seed=7)
    with pytest.raises(ConfigError, match="records of steps 1-3 of an earlier run"):
        plan_start(other)


def test_load_step_that_does_not_exist(tmp_path):
    root = _run_dir(tmp_path, (4,))
    with pytest.raises(
        ConfigError, match=r"load_step=3: .*iter_0000003 does not exist.*iter_0000004"
    ):
        plan_start(_config(tmp_path / "new", load_dir=str(root / "ckpt"), load_step=3))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_training_cli(*args, timeout=120, cwd=cwd, python_flags=("-X", "importtime"))


def test_command_line_refuses_before_importing_torch(tmp_path):
    """The training command line reports a mistyped --load (and a missing data prefix) as one
    `error:` line, without importing torch or megatron-core (10-15 s before)."""
    work = tmp_path / "clean" / "here"  # no checkpoint folder anywhere near (other tests' are)
    work.mkdir(parents=True)
    out = _cli(
        "--nproc-per-node", "2", "--model", "tiny", "--tp", "2", "--data-path", "data/x",
        "--load", "runs/tinyy", "--save", "runs/tiny", cwd=work,
    )  # fmt: skip
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1, out.stderr[-2000:]
    assert errors == [
        (
            "error: checkpoint.load_dir=runs/tinyy does not exist; no checkpoint folder (one "
            "with a 'latest' file) was found near it [flag: --load]"
        )
    ]
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "megatron.core" not in imported
    assert "Traceback" not in out.stderr


def test_command_line_names_the_flag_of_a_bad_value(tmp_path):
    (tmp_path / "d.bin").write_bytes(b"")
    (tmp_path / "d.idx").write_bytes(b"")
    out = _cli("--model", "tiny", "--data-path", "d", "--train-steps", "10", "--warmup-steps", "10",
               cwd=tmp_path)  # fmt: skip
    assert out.returncode == 1
    assert "optimizer.warmup_steps=10 must be smaller than the schedule length 10" in out.stderr
    assert "[flag: --warmup-steps]" in out.stderr
    out = _cli("--model", "tiny", "--data-path", "data/default/train_text_document", cwd=tmp_path)
    assert "python -m megatron_ext.data.default_corpus --out DIR" in out.stderr


def test_default_warmup_fits_short_runs():
    config = TrainConfig(model=model_preset("tiny"), train_steps=100)
    assert config.optimizer.warmup_for(100) == 10
    assert config.optimizer.warmup_for(1_000_000) == 2000
