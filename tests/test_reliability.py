"""Faults a multi-day run meets, injected into real runs on CPU/gloo, and what survives them.

- NaN loss, NaN gradients and NaN weights (in-process ranks of the test pools): the step is
  skipped or the run stops naming the step and ranks; a checkpoint with NaN weights is never
  written.
- kill -9 of the whole job at random moments, SIGTERM, and a kill in the middle of a checkpoint
  save (torchrun jobs of two ranks, data parallel with the distributed optimizer), with
  synchronous and asynchronous saves (checkpoint.async_save): every resumed run must reproduce
  the uninterrupted run's losses bit for bit and its data order sample for sample.

Every test records what it injected and measured in docs/reliability.md (tests/reliability_report).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from megatron_ext.core.checkpoint_layout import TMP_SUFFIX
from megatron_ext.export.checkpoint import load_full_model_tensors
from megatron_ext.models import model_preset
from megatron_ext.training import (
    CheckpointConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_ext.training.synthetic import write_synthetic_dataset
from tests import _workers_reliability as w
from tests._fault_entry import RANK_MODULES
from tests._torchrun import start_job
from tests.distributed import free_port
from tests.reliability_report import record
from tests.tiny_run import tiny_run_config

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]
STEPS = 16
SAVE_INTERVAL = 4


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory) -> str:
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "synthetic", vocab_size=256, num_documents=300
    )


# -- non-finite loss, gradients and weights -----------------------------------------------------


def _config(data_prefix: str, tmp_path: Path, **overrides) -> TrainConfig:
    checkpoint = CheckpointConfig(save_dir=str(tmp_path / "ckpt"), save_interval=2)
    return tiny_run_config(data_prefix, **{"checkpoint": checkpoint, "train_steps": 6, **overrides})


def _nan_checkpoints(save_dir: Path) -> int:
    """How many checkpoints under save_dir hold a NaN or infinite weight (each one read back)."""
    folders = sorted(p for p in save_dir.glob("iter_*") if p.is_dir())
    assert folders, f"no checkpoint under {save_dir}"
    layers = model_preset("tiny").num_layers
    return sum(
        any(
            not bool(torch.isfinite(t).all())
            for t in load_full_model_tensors(f, num_layers=layers).values()
        )
        for f in folders
    )


def _record_nonfinite(save_dir: Path, **fields) -> None:
    """Check that no checkpoint under save_dir holds a non-finite weight, then report the fault
    with that count."""
    nan_checkpoints = _nan_checkpoints(save_dir)
    assert nan_checkpoints == 0
    record("nonfinite", **fields, nan_checkpoints_written=nan_checkpoints)


def test_nonfinite_loss_skips_the_step(pool2, data_prefix, tmp_path):
    config = _config(data_prefix, tmp_path)  # data parallel: 2 ranks
    outs = pool2.run(w.train_with_faults, config, [{"kind": "nan_logits", "step": 3, "rank": 1}])
    for out in outs:
        assert out["error"] is None, out["error"]
        assert out["skipped_steps"] == [3]
        record3 = out["records"][2]
        assert (
            record3["skipped"]
            == "non-finite loss on rank(s) [1]; non-finite gradients on rank(s) [0, 1]"
        )
        assert math.isnan(record3["loss"]) and math.isnan(record3["grad_norm"])
        # the skipped step left the weights as they were; the steps after it trained on
        assert out["checksums"][3] == out["checksums"][2]
        assert out["checksums"][4] != out["checksums"][3]
        later = [r["loss"] for r in out["records"][3:]]
        assert all(math.isfinite(x) for x in later)
        assert out["final_step"] == 6
        # checkpoints of steps 2, 4, 6: none of them holds NaN (the save refuses non-finite
        # weights, and the skip kept them finite)
        assert out["save_dir"] == [
            "config.json",  # the run's configuration (training.start)
            "iter_0000002",
            "iter_0000004",
            "iter_0000006",
            "latest",
        ]
    _record_nonfinite(
        tmp_path / "ckpt",
        fault="NaN logits at step 3 on rank 1 (DP=2)",
        policy="skip",
        detected_at_step=3,
        ranks_named=outs[0]["records"][2]["skipped"],
        outcome="step skipped, weights unchanged, run finished 6/6 steps",
    )


def test_nonfinite_gradients_stop_the_run(pool2, data_prefix, tmp_path):
    config = _config(
        data_prefix,
        tmp_path,
        parallel=ParallelConfig(tensor=2),
        on_nonfinite="stop",
        checkpoint=CheckpointConfig(save_dir=str(tmp_path / "ckpt"), save_interval=1),
    )
    outs = pool2.run(w.train_with_faults, config, [{"kind": "nan_grad", "step": 2, "rank": 0}])
    for out in outs:
        kind, message = out["error"]
        assert kind == "NonFiniteError"
        assert message.startswith("step 2: non-finite gradients on rank(s) [0]; stopping")
        assert "loss" not in message.split(";")[0]  # the loss itself was finite
        assert out["checksums"][2] == out["checksums"][1]  # not applied
        assert out["save_dir"] == ["config.json", "iter_0000001", "latest"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "1"
    _record_nonfinite(
        tmp_path / "ckpt",
        fault="NaN gradient of one weight at step 2 on rank 0 (TP=2)",
        policy="stop",
        detected_at_step=2,
        ranks_named="non-finite gradients on rank(s) [0]",
        outcome="NonFiniteError on both ranks; last checkpoint step 1",
    )


def test_repeated_nonfinite_steps_stop_the_run(pool2, data_prefix, tmp_path):
    config = _config(data_prefix, tmp_path, max_consecutive_skips=2)
    faults = [{"kind": "nan_logits", "step": s, "rank": 0} for s in range(2, 7)]
    outs = pool2.run(w.train_with_faults, config, faults)
    for out in outs:
        kind, message = out["error"]
        assert kind == "NonFiniteError"
        assert message.startswith("step 4: non-finite loss on rank(s) [0]")
        assert "3 steps in a row were not finite (max_consecutive_skips=2)" in message
        assert out["checksums"][4] == out["checksums"][1]
        assert out["save_dir"] == ["config.json", "iter_0000002", "latest"]
    _record_nonfinite(
        tmp_path / "ckpt",
        fault="NaN logits at every step from step 2 on rank 0",
        policy="skip, max_consecutive_skips=2",
        detected_at_step="2, 3, 4",
        ranks_named="non-finite loss on rank(s) [0]",
        outcome="steps 2-3 skipped, NonFiniteError at step 4",
    )


def test_nan_weights_are_never_saved(pool2, data_prefix, tmp_path):
    config = _config(data_prefix, tmp_path)
    outs = pool2.run(w.train_with_faults, config, [{"kind": "nan_weight", "step": 4, "rank": 1}])
    for out in outs:
        kind, message = out["error"]
        assert kind == "NonFiniteWeightsError"
        assert message.startswith(
            "checkpoint of step 4: the weights on rank(s) [1] hold NaN or infinite values"
        )
        assert out["save_dir"] == [
            "config.json",
            "iter_0000002",
            "latest",
        ]  # no iter_0000004, no staging
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "2"
    _record_nonfinite(
        tmp_path / "ckpt",
        fault="a weight set to NaN after step 4 on rank 1, save due at step 4",
        policy="skip",
        detected_at_step=4,
        ranks_named="weights on rank(s) [1]",
        outcome="save refused (NonFiniteWeightsError), latest stays at step 2",
    )


# -- whole-job faults: kill -9, SIGTERM, killed saves ---------------------------------------------


class Job:
    """One torchrun job of two CPU ranks running the trainer's command line (tests/_fault_entry.py
    adds the faults), in a session of its own so that it can be killed whole: torchrun's agent
    with its ranks forked from it, the job forked from a fork server that imported the trainer
    once (tests/_torchrun.py). With fork_ranks=False the ranks are `python -u` processes of
    their own, as torchrun starts them from a script."""

    def __init__(
        self,
        data_prefix: str,
        root: Path,
        env: dict[str, str] | None = None,
        async_save: bool = False,
        fork_ranks: bool = True,
    ) -> None:
        self.root = root
        self.log = root / "logs"
        self.ckpt = root / "ckpt"
        args = [
            "--nproc-per-node", "2",
            "--master-port", str(free_port()), str(REPO / "tests" / "_fault_entry.py"),
            "--model", "tiny", "--data-path", data_prefix, "--split", "90,10,0",
            "--train-steps", str(STEPS), "--global-batch-size", "8", "--micro-batch-size", "2",
            "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "0", "--distributed-optimizer",
            "--save", str(self.ckpt), "--save-interval", str(SAVE_INTERVAL), "--load", str(self.ckpt),
            "--log-dir", str(self.log), "--set", "logging.log_samples=true",
            "--set", "logging.tensorboard=false",
            "--set", f"checkpoint.async_save={str(async_save).lower()}",
        ]  # fmt: skip
        output = root / "output.txt"
        output.touch()
        self.seen = output.stat().st_size  # output of earlier jobs
        self.start = time.monotonic()
        self.proc = start_job(
            args,
            fork_ranks=fork_ranks,
            preload=RANK_MODULES,
            env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)},
            cwd=REPO,
            output=output,
        )

    def last_step(self) -> int:
        """The last step this job logged (rank 0's console line `step N | ...`; 0 before its
        first). metrics.jsonl cannot tell: a resume first drops the records of the steps after
        its checkpoint, which it then writes again."""
        with open(self.root / "output.txt") as f:
            f.seek(self.seen)
            steps = re.findall(r"^(?:\S+ )?step (\d+) \|", f.read(), flags=re.MULTILINE)
        return int(steps[-1]) if steps else 0

    def output_text(self) -> str:
        """This job's console output (both ranks', and torchrun's)."""
        with open(self.root / "output.txt") as f:
            f.seek(self.seen)
            return f.read()

    def resume_step(self) -> int:
        """The step this job resumes from (its checkpoint's, 0 without one)."""
        latest = self.ckpt / "latest"
        return int(latest.read_text()) if latest.exists() else 0

    def wait_for_step(self, step: int, timeout: float = 300) -> bool:
        """Wait until metrics.jsonl shows `step` or later; False when the job ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.last_step() >= step:
                return True
            time.sleep(0.02)
        raise TimeoutError(f"step {step} not reached in {timeout} s; see {self.root}/output.txt")

    def signal(self, sig: int) -> bool:
        """Send `sig` to every process of the job; False when it had already ended."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return False
        return self.proc.poll() is None or self.proc.returncode < 0

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)


def _read_jsonl(path: Path) -> list[dict]:
    """The complete records of a JSONL file (a line cut short by a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _final(path: Path) -> dict[int, dict]:
    """Per step, the record written last (a resumed run rewrites the steps after its checkpoint)."""
    return {r["step"]: r for r in _read_jsonl(path)}


def _run_to_end(data_prefix: str, root: Path, async_save: bool = False) -> None:
    job = Job(data_prefix, root, async_save=async_save)
    code = job.wait()
    assert code == 0, (root / "output.txt").read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(data_prefix, tmp_path_factory) -> dict[str, dict[int, dict]]:
    """The uninterrupted run: per step its metrics and its samples."""
    root = tmp_path_factory.mktemp("reference")
    _run_to_end(data_prefix, root)
    metrics = _final(root / "logs" / "metrics.jsonl")
    samples = _final(root / "logs" / "samples.jsonl")
    assert sorted(metrics) == list(range(1, STEPS + 1))
    return {"metrics": metrics, "samples": samples}


def _compare(reference: dict, root: Path) -> dict[str, object]:
    """How a resumed run's surviving trajectory compares with the reference."""
    metrics = _final(root / "logs" / "metrics.jsonl")
    samples = _final(root / "logs" / "samples.jsonl")
    ref_m, ref_s = reference["metrics"], reference["samples"]
    diffs = [abs(metrics[s]["loss"] - ref_m[s]["loss"]) for s in ref_m if s in metrics]
    trained = [i for s in sorted(samples) for i in samples[s]["samples"]]
    expected = [i for s in sorted(ref_s) for i in ref_s[s]["samples"]]
    return {
        "steps_compared": len(diffs),
        "identical": sorted(metrics) == sorted(ref_m)
        and all(metrics[s]["loss"] == ref_m[s]["loss"] for s in ref_m)
        and all(metrics[s]["grad_norm"] == ref_m[s]["grad_norm"] for s in ref_m)
        and all(samples[s] == ref_s[s] for s in ref_s),
        "samples_lost": len(set(expected) - set(trained)),
        "samples_repeated": len(trained) - len(set(trained)),
        "max_loss_diff": max(diffs) if diffs else math.nan,
    }


@pytest.mark.slow
def test_kill9_at_random_moments_resumes_exactly(data_prefix, reference, tmp_path):
    """A chain of jobs, each killed (SIGKILL to every process, as when a node dies) at a random
    moment after a random step, each next one resuming from the latest checkpoint. The first job
    saves synchronously, the next ones asynchronously (checkpoint.async_save), where a kill often
    lands while a forked writer is still writing a checkpoint that is not published yet; a last
    job runs to the end and the chain must match the uninterrupted run. (Synchronous saves are
    killed in the middle of a save below as well.)"""
    wanted = {False: 1, True: 4}  # kills per save mode: 5 at random moments in all
    max_trials = 3
    rng = random.Random(20261123)
    results: list[dict] = []
    kills = {False: 0, True: 0}
    in_a_save = {False: 0, True: 0}  # kills that found a staging folder (a save not published)
    # (a job may finish before its kill: then another chain follows, until every kill landed)
    for trial in range(max_trials):
        if all(kills[m] >= wanted[m] for m in wanted):
            break
        root = tmp_path / f"trial{trial}"
        root.mkdir()
        while True:
            async_save = kills[False] >= wanted[False]
            job = Job(data_prefix, root, async_save=async_save)
            first = job.resume_step() + 1
            # Done killing, or the last kill came after the final save: no step is left to kill.
            if all(kills[m] >= wanted[m] for m in wanted) or first > STEPS - 1:
                assert job.wait() == 0, (root / "output.txt").read_text()[-3000:]
                break
            # (at least a few steps and the final save ahead: the kill lands before the run ends)
            target = rng.randint(first, max(first, STEPS - 3))
            if job.wait_for_step(target):
                time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside a step, or a save
                killed = job.signal(signal.SIGKILL)
                code = job.wait()
                if killed and code != 0:
                    kills[async_save] += 1
                    in_a_save[async_save] += bool(list(job.ckpt.glob(f"*{TMP_SUFFIX}")))
                    continue
            assert job.wait() == 0  # the job finished before the kill
            break
        result = _compare(reference, root)
        assert result["identical"], (kills, result)
        assert result["samples_lost"] == 0 and result["samples_repeated"] == 0
        assert not list(job.ckpt.glob(f"*{TMP_SUFFIX}"))  # the resume removed the staging folder
        results.append(result)
    assert all(kills[m] >= wanted[m] for m in wanted), kills
    record(
        "kill9",
        run=f"tiny, DP=2, distributed optimizer, {STEPS} steps, save every {SAVE_INTERVAL}",
        async_save=f"no for the first {kills[False]} kill, yes for the next {kills[True]}",
        trials=len(results),
        kills=sum(kills.values()),
        kills_in_a_save=f"{in_a_save[False]} sync, {in_a_save[True]} async",
        identical_trials=sum(r["identical"] for r in results),
        steps_compared=sum(r["steps_compared"] for r in results),
        samples_lost=sum(r["samples_lost"] for r in results),
        samples_repeated=sum(r["samples_repeated"] for r in results),
        max_loss_diff=max(r["max_loss_diff"] for r in results),
    )


KILLS_DURING_SAVE = [
    ("rank 1 killed as it starts writing step 8", {"FAULT_KILL_IN_WRITE": "8"}, False),
    ("rank 1 killed while its async writer writes step 8", {"FAULT_KILL_IN_ASYNC_WRITE": "8"}, True),
    ("rank 0 killed after all wrote step 8 (async), before publishing", {"FAULT_KILL_BEFORE_PUBLISH": "8"}, True),
]  # fmt: skip


@pytest.mark.slow
def test_kills_during_a_save_keep_the_previous_checkpoint(data_prefix, reference, tmp_path):
    """Three jobs in a row die in the middle of the step-8 save, each in its own way: the first
    from scratch, each next one resuming from what the one before left (step 4, after removing
    the unpublished save). A last relaunch finishes and matches the uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    rows = []
    partial = False  # the job before left a staging folder
    for fault, env, async_save in KILLS_DURING_SAVE:
        job = Job(data_prefix, tmp_path, env, async_save=async_save)
        code = job.wait()
        output = job.output_text()
        assert code != 0, f"{fault}: the job did not die\n{output[-3000:]}"  # fmt: skip
        if partial:
            assert "removed the incomplete checkpoint" in output, output[-3000:]
        if rows:
            assert f"resuming from {ckpt} at step 4" in output, output[-3000:]
        if "FAULT_KILL_IN_ASYNC_WRITE" in env:  # the training process died, its writer alive
            assert "FAULT: rank 1 killed with its writer process writing" in output
        assert (ckpt / "latest").read_text().strip() == "4", fault
        assert (ckpt / "iter_0000004").is_dir()
        assert not (ckpt / "iter_0000008").exists(), fault  # the partial save never published
        partial = (ckpt / f"iter_0000008{TMP_SUFFIX}").exists()
        rows.append((fault, async_save, partial))
    last = Job(data_prefix, tmp_path, async_save=True)  # resumes from step 4, to the end
    assert last.wait() == 0, last.output_text()[-3000:]
    assert f"resuming from {ckpt} at step 4" in last.output_text()
    if partial:
        assert "removed the incomplete checkpoint" in last.output_text()
    assert not list(ckpt.glob(f"*{TMP_SUFFIX}"))
    result = _compare(reference, tmp_path)
    assert result["identical"], result
    assert result["samples_lost"] == 0 and result["samples_repeated"] == 0
    for fault, async_save, left in rows:
        record(
            "kill_during_save",
            fault=fault,
            async_save=async_save,
            previous_checkpoint_usable="yes (latest = 4)",
            resumed_from=4,
            losses_identical=result["identical"],
            partial_left_published="no" + (" (staging folder removed on resume)" if left else ""),
        )


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes_exactly(data_prefix, reference, tmp_path):
    """SIGTERM to every process of the job (what Slurm does before preemption): the ranks finish
    their step, save, and exit; the resumed run matches the uninterrupted one. torchrun's agent,
    signalled itself, forwards SIGTERM to the ranks, waits for them and exits with 1. The saves are
    asynchronous: the one made on SIGTERM is published before the ranks return. The ranks are
    script processes here, as torchrun starts them (see tests/_torchrun.py)."""
    codes = tmp_path / "exit_codes"
    codes.mkdir()
    job = Job(
        data_prefix, tmp_path, {"EXIT_CODE_DIR": str(codes)}, async_save=True, fork_ranks=False
    )
    signal_step = 6
    assert job.wait_for_step(signal_step)
    sent = time.monotonic()
    job.signal(signal.SIGTERM)
    code = job.wait(timeout=120)
    seconds = time.monotonic() - sent
    output = (tmp_path / "output.txt").read_text()
    saved = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert f"SIGTERM: stopped after step {saved} (saved to" in output, output[-3000:]
    assert signal_step <= int(saved) < STEPS
    assert (tmp_path / "ckpt" / f"iter_{int(saved):07d}").is_dir()
    assert seconds < 60
    rank_codes = [int((codes / str(r)).read_text()) for r in range(2)]
    assert rank_codes == [0, 0]  # both ranks returned normally
    assert not list((tmp_path / "ckpt").glob(f"*{TMP_SUFFIX}"))  # nothing left unpublished
    _run_to_end(data_prefix, tmp_path, async_save=True)
    result = _compare(reference, tmp_path)
    assert result["identical"], result
    record(
        "sigterm",
        run=f"tiny, DP=2, distributed optimizer, torchrun, async save every {SAVE_INTERVAL}",
        signal_at_step=signal_step,
        saved_step=int(saved),
        exit_code=f"ranks {rank_codes}, torchrun {code}",
        seconds_to_exit=seconds,
        resumed_identical=result["identical"],
    )
