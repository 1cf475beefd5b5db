"""Bad configuration and bad input give clear errors before any training work.

Every case checks the type of the error, that its message names the offending values and the fix,
and, where it goes through `pretrain` on two gloo ranks, that every rank raised the same error
before the work it guards (process groups, parallel state, model, steps) started. Each case adds a
row to the `bad_input` section of docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from megatron_ext.loss import RewardShapingConfig
from megatron_ext.models import ModelConfig, model_preset
from megatron_ext.training import (
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    ParallelConfig,
    TrainConfig,
    config_from_dict,
    load_config,
)
from megatron_ext.training.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_step,
    load_checkpoint,
)
from megatron_ext.training.cli import main
from megatron_ext.training.synthetic import write_synthetic_dataset
from tests import _workers_config_errors as w
from tests.reliability_report import record
from tests.tiny_run import run_training_cli, tiny_run_config

pytestmark = pytest.mark.reliability

VOCAB = 256  # the tiny model's and the synthetic dataset's vocabulary
NO_WORK = {"init_distributed": 0, "initialize_model_parallel": 0, "build_model": 0, "train_step": 0}
"""Call counts of a run refused by its configuration: nothing was set up."""


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory) -> str:
    """A small valid dataset, shared by the module (copied before any corruption)."""
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "synthetic", vocab_size=VOCAB, num_documents=300
    )


@pytest.fixture(scope="module")
def trained_tiny(pool2, data_prefix, tmp_path_factory) -> str:
    """The checkpoint folder of `tiny` trained 2 steps on 2 ranks (its `latest` says 2)."""
    save_dir = tmp_path_factory.mktemp("trained") / "ckpt"
    config = _config(data_prefix, checkpoint=CheckpointConfig(save_dir=str(save_dir)))
    outcomes = pool2.run(w.pretrain_outcome, config)
    assert [o["error"] for o in outcomes] == [None, None], outcomes
    assert latest_step(save_dir) == 2
    return str(save_dir)


def _config(data_prefix: str, model: str | ModelConfig = "tiny", **overrides: Any) -> TrainConfig:
    """A 2-step run of a tiny model on the synthetic data (2 data-parallel ranks fit it)."""
    overrides = {"train_steps": 2, "global_batch_size": 4, **overrides}
    return tiny_run_config(data_prefix, model, **overrides)


def _summary(message: str) -> str:
    """The first line of an error message, temporary folders cut from its paths, <= 120 chars.

    A first line that only introduces a list ("...:") is joined with the list's first item (the
    list of TrainConfig.validate alone: its heading says nothing).
    """
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip()]
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        first = f"{first} {lines[1]}".removeprefix("invalid training configuration: ")
    first = re.sub(r"/\S*/(?=[^/\s]+)", "", first)
    return first if len(first) <= 120 else first[:117] + "..."


def _record(description: str, message: str) -> None:
    """Add the case to the reliability report."""
    record("bad_input", input=description, error=_summary(message))


def _assert_names(message: str, *parts: str) -> None:
    """Every part (offending values and the fix) appears in the message."""
    missing = [part for part in parts if part not in message]
    assert not missing, f"{missing} not in the message:\n{message}"


def _same_error_on_every_rank(outcomes: list[dict[str, Any]], error: str) -> str:
    """Check that every rank raised `error` with the same message; return the message."""
    assert [o["error"] for o in outcomes] == [error] * len(outcomes), outcomes
    messages = {o["message"] for o in outcomes}
    assert len(messages) == 1, messages
    return messages.pop()


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command line in this process; check it failed with one `error:` line, no
    traceback; return stderr."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    assert "Traceback" not in err, err
    return err


# -- 1. parallel sizes that do not fit the model -------------------------------------------------

# description -> (model, config overrides, the values the message must name, its fix)
LAYOUTS_ON_TWO_RANKS: dict[str, tuple[ModelConfig, dict[str, Any], tuple[str, ...], str]] = {
    "tensor=2, tiny with 3 heads and 3 kv groups": (
        model_preset("tiny", num_attention_heads=3, num_query_groups=3),
        {"parallel": ParallelConfig(tensor=2)},
        ("parallel.tensor=2", "model.num_attention_heads=3", "model.num_query_groups=3"),
        "(sizes that do: 1, 3)",
    ),
    "tensor=2, tiny with 1 kv group": (
        model_preset("tiny", num_query_groups=1),
        {"parallel": ParallelConfig(tensor=2)},
        ("parallel.tensor=2", "model.num_query_groups=1"),
        "(sizes that do: 1)",
    ),
    "tensor=2, tiny with ffn_hidden_size=189": (
        model_preset("tiny", ffn_hidden_size=189),
        {"parallel": ParallelConfig(tensor=2)},
        ("parallel.tensor=2", "model.ffn_hidden_size=189"),
        "(sizes that do: 1, 3, 7, 9, 21, 27, 63, 189)",
    ),
    "pipeline=2, tiny with 3 layers": (
        model_preset("tiny", num_layers=3),
        {"parallel": ParallelConfig(pipeline=2)},
        ("parallel.pipeline=2", "model.num_layers=3"),
        "(sizes that do: 1, 3)",
    ),
    "expert=2, tiny_moe with 3 experts": (
        model_preset("tiny_moe", num_experts=3),
        {"parallel": ParallelConfig(expert=2)},
        ("parallel.expert=2", "model.num_experts=3"),
        "(sizes that do: 1, 3)",
    ),
    "tensor=4 on 2 ranks (tiny with 4 kv groups)": (
        model_preset("tiny", num_query_groups=4),
        {"parallel": ParallelConfig(tensor=4)},
        ("world_size=2", "parallel.tensor * parallel.pipeline = 4 * 1 = 4"),
        "launch a multiple of 4 ranks",
    ),
    "global_batch_size=6, micro_batch_size=2 on 2 data-parallel ranks": (
        model_preset("tiny"),
        {"global_batch_size": 6, "micro_batch_size": 2},
        ("global_batch_size=6", "micro_batch_size * data-parallel size = 2 * 2 = 4"),
        "use a multiple of 4, e.g. 4 or 8",
    ),
    "seq_length=128, tiny (model.seq_length=64)": (
        model_preset("tiny"),
        {"seq_length": 128},
        ("seq_length=128", "model.seq_length=64"),
        "lower seq_length or raise model.seq_length",
    ),
    "seq_length=63 with tensor=2 and sequence parallelism": (
        model_preset("tiny"),
        {"parallel": ParallelConfig(tensor=2), "seq_length": 63},
        ("parallel.tensor=2", "sequence length 63"),
        "a multiple of 2",
    ),
}


@pytest.mark.parametrize("description", list(LAYOUTS_ON_TWO_RANKS))
def test_layout_refused_by_pretrain_before_any_setup(pool2, data_prefix, description):
    """pretrain on 2 ranks refuses the layout on every rank before creating process groups,
    megatron's parallel state or the model; validate(2) gives the same error."""
    model, overrides, values, fix = LAYOUTS_ON_TWO_RANKS[description]
    config = _config(data_prefix, model, **overrides)
    with pytest.raises(ConfigError) as info:
        config.validate(2)
    _assert_names(str(info.value), *values, fix)
    outcomes = pool2.run(w.pretrain_outcome, config)
    message = _same_error_on_every_rank(outcomes, "ConfigError")
    assert message == str(info.value)
    assert all(o["calls"] == NO_WORK for o in outcomes), [o["calls"] for o in outcomes]
    _record(f"{description}: pretrain on 2 ranks", message)


def _validate_in_this_process(config: TrainConfig, out: Any) -> None:
    """The ConfigError message validating `config` for 2 ranks raises here (None: it validates)."""
    try:
        config.validate(2)
        out.put(None)
    except ConfigError as exc:
        out.put(str(exc))


def test_async_save_refused_in_daemonic_ranks(data_prefix, tmp_path):
    """checkpoint.async_save forks a writer, which a daemonic process (e.g. a rank started by
    a multiprocessing pool) may not: the configuration is refused there before any setup, and
    validates in a process that may fork (this one, torchrun's ranks)."""
    import multiprocessing

    checkpoint = CheckpointConfig(save_dir=str(tmp_path / "ckpt"), async_save=True)
    config = _config(data_prefix, checkpoint=checkpoint)
    config.validate(2)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    rank = context.Process(target=_validate_in_this_process, args=(config, out), daemon=True)
    rank.start()
    message = out.get(timeout=60)
    rank.join(timeout=60)
    assert message is not None, "async_save validated in a daemonic process"
    _assert_names(message, "checkpoint.async_save=True", "daemonic", "checkpoint.async_save=False")
    assert not (tmp_path / "ckpt").exists()
    _record("checkpoint.async_save=True in a daemonic process", message)


# description -> (model, layout, world size, the values the message must name, its fix); layouts
# needing another world size than the pool's, or breaking several rules at once
LAYOUTS_VALIDATED: dict[str, tuple[ModelConfig, ParallelConfig, int, tuple[str, ...], str]] = {
    "tensor=3 on 4 ranks, tiny (4 heads, 2 kv groups, seq 64)": (
        model_preset("tiny"),
        ParallelConfig(tensor=3),
        4,
        (
            "world_size=4",
            "= 3 * 1 = 3",
            "parallel.tensor=3",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "sequence length 64",
        ),
        "(sizes that do: 1, 2, 4)",
    ),
    "tensor=4 on 4 ranks, tiny with 4 kv groups and ffn_hidden_size=190": (
        model_preset("tiny", num_query_groups=4, ffn_hidden_size=190),
        ParallelConfig(tensor=4),
        4,
        ("parallel.tensor=4", "model.ffn_hidden_size=190"),
        "(sizes that do: 1, 2, 5, 10, 19, 38, 95, 190)",
    ),
    "tensor=2, tiny_moe with moe_ffn_hidden_size=63": (
        model_preset("tiny_moe", moe_ffn_hidden_size=63),
        ParallelConfig(tensor=2),
        2,
        ("parallel.tensor=2", "model.moe_ffn_hidden_size=63"),
        "(sizes that do: 1, 3, 7, 9, 21, 63)",
    ),
    "expert=4 on 2 data-parallel ranks, tiny_moe (4 experts)": (
        model_preset("tiny_moe"),
        ParallelConfig(expert=4),
        2,
        ("parallel.expert=4", "data-parallel size 2"),
        "sizes that do: 1, 2",
    ),
    "pipeline=4 on 6 ranks, tiny (2 layers)": (
        model_preset("tiny"),
        ParallelConfig(pipeline=4),
        6,
        ("world_size=6", "parallel.pipeline=4", "model.num_layers=2"),
        "launch a multiple of 4 ranks",
    ),
}


@pytest.mark.parametrize("description", list(LAYOUTS_VALIDATED))
def test_layout_refused_by_validate(data_prefix, description):
    """TrainConfig.validate names every rule a layout breaks, in one error."""
    model, parallel, world, values, fix = LAYOUTS_VALIDATED[description]
    config = _config(data_prefix, model, parallel=parallel)
    with pytest.raises(ConfigError) as info:
        config.validate(world)
    _assert_names(str(info.value), *values, fix)
    _record(f"{description}: validate({world})", str(info.value))


# -- 2. loss configuration outside its valid range -----------------------------------------------

SHAPING_CASES = {
    "beta=-1": ({"beta": -1.0}, ValueError, ("beta=-1.0", "must be > -1"), "beta=-0.25"),
    "beta=-1.5": ({"beta": -1.5}, ValueError, ("beta=-1.5", "must be > -1"), "beta=-0.25"),
    "lambda_head=nan": (
        {"lambda_head": float("nan")},
        ValueError,
        ("lambda_head", "nan"),
        "must be finite",
    ),
    "lambda_tail=-inf": (
        {"lambda_tail": float("-inf")},
        ValueError,
        ("lambda_tail", "-inf"),
        "must be finite",
    ),
    "top_k=0": (
        {"lambda_tail": -0.1, "top_k": 0},
        ValueError,
        ("top_k=0",),
        "must be >= 1",
    ),
    "top_k=1.5": ({"top_k": 1.5}, TypeError, ("top_k", "1.5"), "must be an int"),
}


@pytest.mark.parametrize("name", list(SHAPING_CASES))
def test_shaping_out_of_range_python_api(name):
    """RewardShapingConfig refuses values outside the objective's range at construction."""
    kwargs, error, values, fix = SHAPING_CASES[name]
    with pytest.raises(error) as info:
        RewardShapingConfig(**kwargs)
    _assert_names(str(info.value), *values, fix)
    _record(f"RewardShapingConfig({name})", str(info.value))


def test_shaping_top_k_beyond_vocabulary(data_prefix):
    """A top-k set larger than the vocabulary is refused when the TrainConfig is made."""
    shaping = RewardShapingConfig(lambda_tail=-0.1, top_k=1000)
    with pytest.raises(ConfigError) as info:
        _config(data_prefix, shaping=shaping)
    _assert_names(str(info.value), "shaping.top_k=1000", f"model.vocab_size={VOCAB}", "at most")
    _record(f"TrainConfig: shaping.top_k=1000 with tiny (vocab_size={VOCAB})", str(info.value))


def test_unknown_shaping_preset_python_api():
    """An unknown preset name lists the presets, from the class and from plain config values."""
    with pytest.raises(ValueError) as info:
        RewardShapingConfig.preset("precise")
    _assert_names(str(info.value), "'precise'", "choose one of", *RewardShapingConfig.PRESET_NAMES)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": "tiny", "shaping": "precise", "data": {"paths": ["x"]}})
    _assert_names(str(info.value), "shaping", "'precise'", "precision")
    _record("config_from_dict: shaping='precise' (unknown preset)", str(info.value))


CLI_SHAPING_CASES = {
    "beta": (["--set", "shaping.beta=-1.5"], ("beta=-1.5", "must be > -1")),
    "lambda": (["--set", "shaping.lambda_head=NaN"], ("lambda_head", "nan", "must be finite")),
    "top_k-zero": (
        ["--set", "shaping.lambda_tail=-0.1", "--set", "shaping.top_k=0"],
        ("top_k=0", "must be >= 1"),
    ),
    "top_k-vocab": (
        ["--shaping", "tail_suppression", "--set", "shaping.top_k=300"],
        ("shaping.top_k=300", f"model.vocab_size={VOCAB}", f"at most {VOCAB}"),
    ),
    "preset": (["--shaping", "precise"], ("'precise'", "choose one of", "precision")),
    "field": (["--set", "shaping.betta=0.5"], ("['betta']", "known:", "'beta'")),
}


@pytest.mark.parametrize("name", list(CLI_SHAPING_CASES))
def test_shaping_out_of_range_cli(name, data_prefix, capsys):
    """The command line prints one `error:` line and returns 1, without a traceback."""
    flags, parts = CLI_SHAPING_CASES[name]
    err = _cli(["--model", "tiny", "--data-path", data_prefix, *flags], capsys)
    _assert_names(err, *parts)
    _record(f"CLI {' '.join(flags)}", err.split("error: ", 1)[1])


# -- 3. sequence length --------------------------------------------------------------------------


def test_seq_length_beyond_the_model(data_prefix, capsys):
    """A sample longer than the model's maximum sequence length is refused by validate and by the
    command line, naming both lengths and the fix."""
    model = model_preset("tiny")
    config = _config(data_prefix, seq_length=model.seq_length * 2)
    with pytest.raises(ConfigError) as info:
        config.validate(1)
    _assert_names(
        str(info.value), "seq_length=128", "model.seq_length=64", "raise model.seq_length"
    )
    err = _cli(["--model", "tiny", "--data-path", data_prefix, "--set", "seq_length=128"], capsys)
    _assert_names(err, "seq_length=128", "model.seq_length=64")
    _record("CLI --model tiny --set seq_length=128 (model.seq_length=64)", str(info.value))


# -- 4. corrupt or truncated data through the trainer --------------------------------------------


def _copy_dataset(prefix: str, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx"):
        shutil.copyfile(prefix + ext, str(dst) + ext)
    return str(dst)


def _corrupt(prefix: str, kind: str) -> tuple[str, str, tuple[str, ...]]:
    """Damage the dataset at `prefix`; (description, bad file, what the message must name)."""
    if kind == "truncated-bin":
        path = prefix + ".bin"
        size = os.path.getsize(path)
        os.truncate(path, size - 100)
        return f"truncated .bin (100 of {size} bytes cut)", path, ("100 bytes", "truncated")
    if kind == "truncated-idx":
        path = prefix + ".idx"
        size = os.path.getsize(path)
        os.truncate(path, size - 8)
        return f"truncated .idx (8 of {size} bytes cut)", path, ("8 bytes missing", "truncated")
    path = prefix + ".bin"
    tokens = np.memmap(path, dtype=np.uint16, mode="r+")  # the tiny vocabulary fits uint16
    tokens[1000] = VOCAB
    tokens.flush()
    del tokens
    return (
        f"token id {VOCAB} at token 1000 of the .bin (vocab_size {VOCAB})",
        path,
        (f"token id {VOCAB}", "first at token 1000", f"model.vocab_size >= {VOCAB + 1}"),
    )


@pytest.mark.parametrize("kind", ["truncated-bin", "truncated-idx", "token-id"])
def test_bad_data_stops_pretrain_on_every_rank(pool2, data_prefix, tmp_path, kind):
    """Every rank raises the same DataError naming the file before the model is built: no step,
    no metrics file, no checkpoint folder."""
    prefix = _copy_dataset(data_prefix, tmp_path / "data" / "bad")
    description, bad_file, parts = _corrupt(prefix, kind)
    log_dir, save_dir = tmp_path / "logs", tmp_path / "ckpt"
    config = _config(
        prefix,
        logging=LoggingConfig(console=False, log_dir=str(log_dir)),
        checkpoint=CheckpointConfig(save_dir=str(save_dir)),
    )
    outcomes = pool2.run(w.pretrain_outcome, config)
    message = _same_error_on_every_rank(outcomes, "DataError")
    _assert_names(message, bad_file, *parts)
    for o in outcomes:
        assert o["calls"]["initialize_model_parallel"] == 0, o["calls"]
        assert o["calls"]["build_model"] == 0 and o["calls"]["train_step"] == 0, o["calls"]
    assert not (log_dir / "metrics.jsonl").exists() and not save_dir.exists()
    seconds = max(o["seconds"] for o in outcomes)
    assert seconds < 30, seconds  # a file check, not a training run
    _record(
        f"{description}: pretrain on 2 ranks, DataError on both after {seconds * 1000:.0f} ms",
        message,
    )


def test_bad_data_through_the_command_line(data_prefix, tmp_path):
    """`python -m megatron_ext.training` (one process, no torchrun) exits with 1 and one `error:`
    line naming the file, without a traceback, and trains nothing."""
    prefix = _copy_dataset(data_prefix, tmp_path / "data" / "bad")
    description, bad_file, parts = _corrupt(prefix, "token-id")
    log_dir, save_dir = tmp_path / "logs", tmp_path / "ckpt"
    argv = ["--model", "tiny", "--data-path", prefix, "--train-steps", "2"]
    argv += ["--global-batch-size", "4", "--micro-batch-size", "2", "--warmup-steps", "0"]
    argv += ["--log-dir", str(log_dir), "--save", str(save_dir)]
    start = time.perf_counter()
    out = run_training_cli(*argv)
    seconds = time.perf_counter() - start
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    _assert_names(errors[0], bad_file, *parts)
    assert not log_dir.exists() and not save_dir.exists()
    _record(
        f"CLI, {description}: exit 1 after {seconds:.1f} s (process start included)",
        errors[0].removeprefix("error: "),
    )


# -- 5. resuming from a checkpoint of another model ----------------------------------------------


@pytest.mark.parametrize(
    "changes", [{"hidden_size": 128}, {"num_layers": 4}], ids=["hidden_size", "num_layers"]
)
def test_resume_refuses_another_model(pool2, data_prefix, trained_tiny, changes):
    """Every rank refuses a checkpoint whose weights have other shapes, naming the fields that
    differ and the fix, before any step."""
    config = _config(
        data_prefix,
        model_preset("tiny", **changes),
        train_steps=3,
        checkpoint=CheckpointConfig(load_dir=trained_tiny),
    )
    outcomes = pool2.run(w.pretrain_outcome, config)
    message = _same_error_on_every_rank(outcomes, "CheckpointError")
    base = model_preset("tiny")
    ((field, value),) = changes.items()
    _assert_names(
        message,
        str(checkpoint_dir(trained_tiny, 2)),
        f"{field}: checkpoint {getattr(base, field)!r}, this run {value!r}",
        "use the model configuration it was trained with",
    )
    assert all(o["calls"]["train_step"] == 0 for o in outcomes)
    _record(f"resume tiny's checkpoint with {field}={value}: 2 ranks", message)


def test_architecture_check_reads_the_fields_of_model_config(tmp_path):
    """The weight-shape fields come from ModelConfig itself: a checkpoint's configuration that
    predates a field (moe_dense_layers) has its default, JSON's lists equal tuples, and a field
    that changes no shape (rope_base) may differ."""
    from megatron_ext.training.checkpoint import _check_same_architecture

    moe = model_preset("tiny_moe")
    saved = dataclasses.asdict(moe)
    del saved["moe_dense_layers"]  # an older checkpoint's configuration
    common = {"extra": {"config": {"model": saved}}}
    run = dataclasses.asdict(dataclasses.replace(moe, rope_base=1e6))
    _check_same_architecture(common, run, tmp_path)
    common["extra"]["config"]["model"] = saved | {"moe_dense_layers": [1]}
    _check_same_architecture(common, dataclasses.asdict(moe) | {"moe_dense_layers": (1,)}, tmp_path)
    with pytest.raises(
        CheckpointError, match=r"moe_dense_layers: checkpoint \(1,\), this run \(\)"
    ):
        _check_same_architecture(common, run, tmp_path)


def test_resume_refuses_other_optimizer_state(pool2, data_prefix, trained_tiny):
    """The checkpoint holds non-distributed optimizer state; a run with the distributed optimizer
    cannot take it: CheckpointError on every rank naming the setting and the fix."""
    config = _config(
        data_prefix,
        train_steps=3,
        parallel=ParallelConfig(distributed_optimizer=True),
        checkpoint=CheckpointConfig(load_dir=trained_tiny),
    )
    outcomes = pool2.run(w.pretrain_outcome, config)
    message = _same_error_on_every_rank(outcomes, "CheckpointError")
    _assert_names(
        message,
        "non-distributed optimizer state",
        "parallel.distributed_optimizer=True",
        "checkpoint.load_optimizer=False",
    )
    assert all(o["calls"]["train_step"] == 0 for o in outcomes)
    _record("resume non-distributed optimizer state with the distributed optimizer", message)


def test_resume_with_other_seq_length_and_rope_base_works(pool2, data_prefix, trained_tiny):
    """Positive control: seq_length and rope_base do not change the weights' shapes, so the same
    checkpoint loads (mid-training) and the run goes on from its step. Not a bad input: no row
    in the report."""
    model = model_preset("tiny", seq_length=128, rope_base=1e6)
    config = _config(
        data_prefix, model, train_steps=3, checkpoint=CheckpointConfig(load_dir=trained_tiny)
    )
    outcomes = pool2.run(w.pretrain_outcome, config)
    assert [o["error"] for o in outcomes] == [None, None], outcomes
    assert all(o["start_step"] == 2 and o["final_step"] == 3 for o in outcomes), outcomes
    assert all(o["calls"]["train_step"] == 1 for o in outcomes)


# -- 6. checkpoint tracker problems --------------------------------------------------------------


def _fake_checkpoints(root: Path, steps: tuple[int, ...], latest: str) -> Path:
    """Step folders (empty: these checks come before anything in them is read) and `latest`."""
    for step in steps:
        checkpoint_dir(root, step).mkdir(parents=True)
    (root / "latest").write_text(latest)
    return root


def test_garbage_in_latest(pool2, data_prefix, tmp_path):
    """`latest` not holding a step number: CheckpointError naming the file, what it holds and
    the step folders present, from the function and on every rank of a resumed run."""
    root = _fake_checkpoints(tmp_path / "ckpt", (2, 4), "<html>oops</html>\n")
    with pytest.raises(CheckpointError) as info:
        latest_step(root)
    parts = (str(root / "latest"), "'<html>oops</html>'", "iter_0000002", "iter_0000004")
    _assert_names(str(info.value), *parts, "write the step of the checkpoint to resume from")
    config = _config(data_prefix, checkpoint=CheckpointConfig(load_dir=str(root)))
    outcomes = pool2.run(w.pretrain_outcome, config)
    message = _same_error_on_every_rank(outcomes, "CheckpointError")
    assert message == str(info.value)
    assert all(o["calls"]["train_step"] == 0 for o in outcomes)
    _record("`latest` holding '<html>oops</html>' (folders of steps 2 and 4): 2 ranks", message)


def test_latest_names_a_missing_folder(pool2, data_prefix, tmp_path, monkeypatch, capsys):
    """`latest` naming a step without a folder: FileNotFoundError listing the folders present and
    suggesting checkpoint.load_step, on every rank and as one `error:` line of the command line."""
    root = _fake_checkpoints(tmp_path / "ckpt", (2, 4), "7\n")
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(
            root, model=None, optimizer=None, scheduler=None, distributed_optimizer=False
        )
    message = str(info.value)
    _assert_names(message, "iter_0000007", "iter_0000002", "iter_0000004", "checkpoint.load_step")
    config = _config(data_prefix, checkpoint=CheckpointConfig(load_dir=str(root)))
    outcomes = pool2.run(w.pretrain_outcome, config)
    assert _same_error_on_every_rank(outcomes, "FileNotFoundError") == message
    assert all(o["calls"]["train_step"] == 0 for o in outcomes)

    def pretrain(config: TrainConfig) -> None:  # the resume of pretrain, without the model
        load_checkpoint(
            config.checkpoint.load_dir,
            model=None,
            optimizer=None,
            scheduler=None,
            distributed_optimizer=False,
        )

    monkeypatch.setattr("megatron_ext.training.trainer.pretrain", pretrain)
    err = _cli(["--model", "tiny", "--data-path", data_prefix, "--load", str(root)], capsys)
    assert message in err
    _record("`latest` says 7, folders of steps 2 and 4 only: 2 ranks and CLI", message)


# -- 7. unknown fields and wrong types in config files -------------------------------------------

CONFIG_FILES = {
    "unknown-field": (
        "run.toml",
        'model = "tiny"\ntrain_step = 3\n[data]\npaths = ["x"]\n',
        ("['train_step']", "in the configuration", "known:", "'train_steps'"),
    ),
    "unknown-section-field": (
        "run.toml",
        'model = "tiny"\n[optimizer]\nlearning_rate = 1e-3\n',
        ("['learning_rate']", "in optimizer", "known:", "'lr'"),
    ),
    "unknown-model-field": (
        "run.json",
        json.dumps({"model": {"preset": "tiny", "hidden": 64}}),
        ("['hidden']", "in model", "known:", "'hidden_size'"),
    ),
    "unknown-model-preset": (
        "run.toml",
        'model = "tiny2"\n',
        ("'tiny2'", "choose one of", "tiny_moe"),
    ),
    "int-as-string": (
        "run.toml",
        'model = "tiny"\ntrain_steps = "8"\n',
        ("TrainConfig.train_steps", "'8'", "must be an int"),
    ),
    "bool-as-string": (
        "run.json",
        json.dumps({"model": "tiny", "bf16": "false"}),
        ("bf16", "'false'", "must be true or false"),
    ),
    "model-int-as-string": (
        "run.json",
        json.dumps({"model": {"preset": "tiny", "hidden_size": "64"}}),
        ("ModelConfig.hidden_size", "'64'", "must be an int"),
    ),
    "section-not-table": (
        "run.toml",
        'model = "tiny"\noptimizer = 3\n',
        ("optimizer", "got 3", "must be a table"),
    ),
    "paths-as-string": (
        "run.toml",
        'model = "tiny"\n[data]\npaths = "x"\n',
        ("DataConfig.paths", "'x'", "a sequence of prefixes"),
    ),
    "weights-not-numbers": (
        "run.json",
        json.dumps({"model": "tiny", "data": {"paths": ["x"], "weights": ["a"]}}),
        ("DataConfig.weights", "('a',)", "must be numbers"),
    ),
    "toml-syntax": (
        "run.toml",
        'model = "tiny"\ntrain_steps = = 3\n',
        ("run.toml", "is not valid toml", "line 2"),
    ),
    "json-syntax": (
        "run.json",
        '{"model": "tiny",}',
        ("run.json", "is not valid json", "line 1"),
    ),
    "missing-file": (
        "absent.toml",
        None,
        ("absent.toml", "cannot read config file", "No such file"),
    ),
}


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_bad_config_file(name, tmp_path, capsys):
    """load_config and `--config` refuse the file with a ConfigError naming the field (or the
    file and line) and what it should be."""
    filename, text, parts = CONFIG_FILES[name]
    path = tmp_path / filename
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    _assert_names(str(info.value), *parts)
    err = _cli(["--config", str(path)], capsys)
    _assert_names(err, *parts)
    shown = text.replace("\n", "; ").strip("; ") if text else "a file that does not exist"
    _record(f"config file {filename}: {shown}", str(info.value))


def test_labels_outside_the_vocabulary_stop_the_step(pool2, data_prefix):
    """A label the model cannot predict (one label of rank 1's first micro-batch set to
    1,000,000, the inputs valid): the loss counts it on the device with no host
    synchronisation, the step's all-reduce shows it, and every rank raises the same DataError
    naming the step, the rank, the position and the fix, before any update."""
    outcomes = pool2.run(w.pretrain_with_a_bad_label, _config(data_prefix))
    message = _same_error_on_every_rank(outcomes, "DataError")
    _assert_names(
        message, "step 1:", f"labels outside the vocabulary [0, {VOCAB})", "rank(s) [1]",
        "sequence 0, position 3: label 1000000", "model.vocab_size",
    )  # fmt: skip
    assert all(o["calls"]["train_step"] == 1 for o in outcomes)
    _record("a label of 1,000,000 in rank 1's batch (inputs valid): 2 ranks", message)
