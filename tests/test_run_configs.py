"""run_configs: NeMo-Run recipes, executors, experiments, report and the main job.

Fast checks build every recipe and validate it with the trainer's own rules against its layout,
materialize the Slurm sbatch script and the local torchrun command without running anything, and
parse command-line overrides. Slow checks (marked `slow`) launch real torchrun jobs on CPU through
NeMo-Run's local executor: the main job at TP=2 on a small default corpus (train, export, load the
export with transformers) and a two-preset experiment with its report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import fiddle as fdl
import nemo_run as run
import pytest

from megatron_ext.loss import RewardShapingConfig
from megatron_ext.training import ConfigError, TrainConfig
from run_configs.executors import (
    ParallelLayout,
    check_world,
    executor_world_size,
    local_executor,
    override_executor,
    slurm_executor,
    use_nemorun_home,
)
from run_configs.experiments import dryrun, preset_tasks
from run_configs.overrides import apply_overrides, split_overrides
from run_configs.recipes import (
    GLOBAL_BATCH_TOKENS,
    PAPER_LAYOUTS,
    PAPER_MODELS,
    PRESETS,
    get_recipe,
    paper_midtrain,
    paper_pretrain,
    pretrain_task,
    tiny_midtrain,
    tiny_pretrain,
)

REPO = Path(__file__).resolve().parents[1]

# Small default corpus for the runs: ~300 KB of stdlib sources, a 512-token BPE vocabulary.
CORPUS_BYTES = 300_000
CORPUS_VOCAB = 512


@pytest.fixture(autouse=True)
def stdin_devnull(monkeypatch):
    """NeMo-Run packages Slurm jobs with invoke, which reads stdin: pytest's captured stdin
    raises on read, so give it an empty one."""
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield


@pytest.fixture(autouse=True)
def nemorun_home(tmp_path, monkeypatch):
    """Every test gets its own NEMORUN_HOME (NeMo-Run's experiment folders)."""
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_run"))
    from nemo_run.config import get_nemorun_home, set_nemorun_home

    before = get_nemorun_home()
    home = use_nemorun_home(tmp_path / "nemo_run")
    yield home
    set_nemorun_home(before)


@pytest.fixture
def shared_dir(tmp_path):
    """A folder outside /tmp, as a multi-node job's folder must be (/tmp is each node's own):
    under the repository's git-ignored outputs/, or, for a checkout that is itself under a
    node-local folder (a CI clone in /tmp), under ~/.cache; removed after the test."""
    from run_configs.executors import NODE_LOCAL_DIRS

    def node_local(path: Path) -> bool:
        text = os.path.normpath(str(path.resolve()))
        return any(text == d or text.startswith(d + "/") for d in NODE_LOCAL_DIRS)

    base = REPO / "outputs" / "test-jobs"
    if node_local(base):
        base = Path.home() / ".cache" / "megatron_ext-test-jobs"
    assert not node_local(base), f"no folder outside {NODE_LOCAL_DIRS} for the job folders"
    path = base / f"{os.getpid()}-{tmp_path.name}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- recipes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["pretrain", "midtrain"])
@pytest.mark.parametrize("model", PAPER_MODELS)
def test_paper_recipes_build_and_validate_at_their_layout(model, stage):
    cfg = fdl.build(get_recipe(model, stage)(preset="precision"))
    assert isinstance(cfg, TrainConfig)
    layout = PAPER_LAYOUTS[(model, stage)]
    world = layout.nodes * layout.gpus_per_node

    # the trainer's own validation: heads, kv groups, FFN, vocabulary, layers, experts, batch
    # (not of this machine: the recipes' /results and /data are the cluster's)
    derived = check_world(cfg, world, check_environment=False)
    assert derived.world_size == world
    assert derived.tensor * derived.pipeline * derived.context * derived.data == world
    assert (derived.tensor, derived.pipeline, derived.expert, derived.context) == (
        layout.tensor,
        layout.pipeline,
        layout.expert,
        layout.context,
    )
    m = cfg.model
    assert m.num_attention_heads % derived.tensor == 0
    assert m.num_query_groups % derived.tensor == 0
    assert m.num_layers % derived.pipeline == 0
    assert m.padded_vocab_size(derived.tensor) % derived.tensor == 0
    if m.is_moe:
        assert m.num_experts % derived.expert == 0 and derived.data % derived.expert == 0
    micro_batches = cfg.global_batch_size // (cfg.micro_batch_size * derived.data)
    assert micro_batches * cfg.micro_batch_size * derived.data == cfg.global_batch_size

    # the paper's schedule (setup.md)
    assert cfg.global_batch_size * m.seq_length == GLOBAL_BATCH_TOKENS == 16_777_216
    opt = cfg.optimizer
    assert (opt.lr, opt.min_lr, opt.weight_decay, opt.clip_grad) == (3e-4, 3e-5, 0.1, 1.0)
    assert cfg.shaping == RewardShapingConfig(beta=-0.25)
    assert cfg.bf16 and cfg.parallel.distributed_optimizer
    # the gradient reduce-scatter overlapped with the backward pass, the parameter all-gather with
    # the forward pass; TE's spec wherever the image has TE
    assert cfg.parallel.overlap_grad_reduce and cfg.parallel.overlap_param_gather
    assert cfg.use_transformer_engine is None
    assert cfg.checkpoint.async_save  # checkpoints written while training goes on
    if stage == "pretrain":
        assert (m.seq_length, m.rope_base, cfg.global_batch_size) == (4096, 1e4, 4096)
        assert cfg.train_steps == 29_802  # 500B tokens / 16M
        assert (opt.warmup_steps, opt.wsd_decay_steps) == (2000, 0)  # stable after warmup
        assert cfg.checkpoint.load_dir is None  # a requeued job resumes from save_dir
        assert cfg.checkpoint.save_dir == f"/results/{model}-precision/checkpoints"
    else:
        assert (m.seq_length, m.rope_base, cfg.global_batch_size) == (16_384, 1e6, 1024)
        assert cfg.train_steps == 5_960  # 100B tokens / 16M
        assert (opt.warmup_steps, opt.wsd_decay_steps) == (0, 5_960)  # 3e-4 -> 3e-5 throughout
        assert cfg.checkpoint.load_dir == f"/results/{model}-precision/checkpoints"
        assert cfg.checkpoint.load_optimizer is False
        assert cfg.recompute == "full"
        # context parallelism where pre-training's layout is not enough (TP stays as it was)
        pre = PAPER_LAYOUTS[(model, "pretrain")]
        assert derived.tensor == pre.tensor
        assert derived.context == (1 if m.is_moe and pre.pipeline == 1 else 2)


@pytest.mark.parametrize(
    ("model", "kwargs", "world", "message"),
    [
        ("moe_20b_a1b", {"tensor": 8}, 256, "does not divide model.num_query_groups=4"),
        (
            "dense_1b",
            {"pipeline": 3},
            96,
            "parallel.pipeline=3 does not divide model.num_layers=28",
        ),
        ("moe_5b_a0.3b", {"expert": 3}, 96, "parallel.expert=3 does not divide model.num_experts"),
        ("dense_4b", {"micro_batch_size": 3}, 128, "global_batch_size=4096 is not divisible"),
    ],
)
def test_paper_recipes_refuse_inconsistent_layouts(model, kwargs, world, message):
    cfg = paper_pretrain(model, **kwargs)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_world(cfg, world)


def test_parallel_layout_is_derived_from_the_world_size():
    layout = ParallelLayout.derive(4 * 8, tensor=2, pipeline=2, expert=4)
    assert (layout.tensor, layout.pipeline, layout.data, layout.expert) == (2, 2, 8, 4)
    assert layout.world_size == 32
    with pytest.raises(ValueError, match=r"tensor \* pipeline = 3 \* 1 = 3 does not divide"):
        ParallelLayout.derive(32, tensor=3)
    with pytest.raises(ValueError, match="expert=3 does not divide the data-parallel size 8"):
        ParallelLayout.derive(32, tensor=2, pipeline=2, expert=3)
    layout = ParallelLayout.derive(128, tensor=2, context=2)
    assert (layout.data, str(layout)) == (32, "TP=2 x PP=1 x CP=2 x DP=32 = 128 ranks (EP=1)")
    with pytest.raises(ValueError, match=r"context = 2 \* 1 \* 4 = 8 does not divide the world"):
        ParallelLayout.derive(12, tensor=2, context=4)


@pytest.mark.parametrize("preset", PRESETS)
def test_loss_presets_are_selected_by_name(preset, tmp_path):
    cfg = fdl.build(tiny_pretrain(preset=preset, data_dir=tmp_path, out_dir=tmp_path / "o"))
    assert cfg.shaping == RewardShapingConfig.preset(preset)
    assert cfg.logging.log_dir == str(tmp_path / "o" / "logs")
    assert cfg.data.paths == (str(tmp_path / "train_text_document"),)


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'sharp'"):
        tiny_pretrain(preset="sharp", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown paper model 'dense_7b'"):
        paper_pretrain("dense_7b")
    with pytest.raises(ValueError, match="unknown recipe 'gpt2'"):
        get_recipe("gpt2")


def test_tiny_recipes_schedule_and_midtrain(tmp_path):
    cfg = fdl.build(tiny_pretrain(data_dir=tmp_path, train_steps=50, tensor=2))
    assert (cfg.train_steps, cfg.optimizer.warmup_steps, cfg.optimizer.wsd_decay_steps) == (
        50,
        20,
        10,
    )
    check_world(cfg, 2)  # TP=2 on 2 ranks
    mid = fdl.build(tiny_midtrain(load_dir=tmp_path / "ckpt", data_dir=tmp_path, train_steps=30))
    assert (mid.model.seq_length, mid.model.rope_base) == (512, 1e6)
    assert mid.global_batch_size * mid.model.seq_length == cfg.global_batch_size * 128
    assert (mid.optimizer.warmup_steps, mid.optimizer.wsd_decay_steps) == (0, 30)
    assert mid.checkpoint.load_dir == str(tmp_path / "ckpt") and not mid.checkpoint.load_optimizer


def _imported_root(root: Path, model: dict, eod_id: int = 7) -> Path:
    """The files of a checkpoint root as tools/import_hf.py lays them out (`latest`, the step
    folder's metadata.json, config.json), without weights: what a recipe reads of an import."""
    (root / "iter_0000000").mkdir(parents=True)
    (root / "iter_0000000" / "metadata.json").write_text("{}")
    (root / "latest").write_text("0\n")
    config = {"model": model, "parallel": {"tensor": 1}, "data": {"eod_id": eod_id}}
    (root / "config.json").write_text(json.dumps(config))
    return root


def _as_imported(preset: str, **fields) -> dict:
    """A preset's model as an import records it (the checkpoint's name, the HF model's maximum
    position and RoPE base)."""
    from megatron_ext.models import model_preset

    model = dataclasses.asdict(model_preset(preset))
    return model | {"name": "qwen3-base", "seq_length": 32_768, "rope_base": 1e6} | fields


def test_tiny_midtrain_starts_from_an_import_with_its_model(tmp_path):
    imported = _as_imported("tiny", vocab_size=301, hidden_size=48, head_dim=24, rope_base=1e4)
    root = _imported_root(tmp_path / "ckpt", imported)
    mid = fdl.build(tiny_midtrain(init_from=root, data_dir=tmp_path, seq_length=256))
    # The import's model at this stage's sequence length and RoPE base, its end-of-document id.
    stage = {"seq_length": 256, "rope_base": 1e6}
    assert dataclasses.asdict(mid.model) == imported | stage
    assert mid.data.eod_id == 7
    assert mid.checkpoint.init_from == str(root) and mid.checkpoint.load_dir is None
    assert mid.checkpoint.save_dir == str(REPO / "outputs/tiny-ce-midtrain/checkpoints")
    assert (mid.optimizer.warmup_steps, mid.optimizer.wsd_decay_steps) == (0, 50)
    # The corpus's vocabulary (the launcher passes its manifest's) must be the import's.
    assert fdl.build(tiny_midtrain(init_from=root, data_dir=tmp_path, vocab_size=301)).model
    with pytest.raises(
        ValueError,
        match=r"vocab_size=8192\) differs from the model of init_from"
        r".*model.vocab_size=301\): tokenize the data with the import's tokenizer",
    ):
        tiny_midtrain(init_from=root, data_dir=tmp_path, vocab_size=8192)  # fmt: skip
    with pytest.raises(ValueError, match="both name where mid-training starts"):
        tiny_midtrain(init_from=root, load_dir=root, data_dir=tmp_path)
    with pytest.raises(ValueError, match="tiny_midtrain needs load_dir .* or init_from"):
        tiny_midtrain(data_dir=tmp_path)
    (root / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json with a model table"):
        tiny_midtrain(init_from=root, data_dir=tmp_path)
    hf = tmp_path / "hf"  # a Hugging Face directory, not imported yet
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="it is a Hugging Face model directory: import it"):
        tiny_midtrain(init_from=hf, data_dir=tmp_path)


def test_paper_midtrain_from_an_import_checks_its_model(tmp_path):
    """dense_4b is Qwen3-4B's shape: its import passes; another model is refused with every
    differing field; a path only the job's nodes see is left to the trainer's check on load."""
    root = _imported_root(tmp_path / "qwen3-4b", _as_imported("dense_4b"))
    cfg = fdl.build(paper_midtrain("dense_4b", preset="precision", init_from=str(root)))
    assert cfg.checkpoint.init_from == str(root) and cfg.checkpoint.load_dir is None
    assert (cfg.model.name, cfg.model.seq_length, cfg.model.rope_base) == ("dense_4b", 16_384, 1e6)
    assert cfg.checkpoint.save_dir == "/results/dense_4b-precision-midtrain/checkpoints"
    check_world(cfg, 128, check_environment=False)

    other = _imported_root(tmp_path / "qwen3-1.7b", _as_imported("dense_4b", num_layers=28,
                                                                 hidden_size=2048))  # fmt: skip
    message = (
        f"paper_midtrain: init_from={other} holds another model than dense_4b; differing "
        f"fields:\n  - model.hidden_size: {other} 2048, dense_4b 2560\n  - model.num_layers: "
        f"{other} 28, dense_4b 36\nimport a model of dense_4b's shape"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        paper_midtrain("dense_4b", init_from=str(other))
    on_nodes = fdl.build(paper_midtrain("dense_1b", init_from="/results/qwen3-base"))
    assert on_nodes.checkpoint.init_from == "/results/qwen3-base"
    with pytest.raises(ValueError, match="both name where mid-training starts"):
        paper_midtrain("dense_4b", init_from=str(root), load_dir="/results/pre")


def test_library_never_imports_run_configs():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "megatron_ext").rglob("*.py")
        if re.search(r"^\s*(from|import)\s+run_configs\b", p.read_text(), re.MULTILINE)
    ]
    assert offenders == []


def test_launcher_builds_the_rank_task_without_megatron_core(tmp_path):
    """The process that builds and launches a recipe never imports megatron-core (4-6 s); the
    rank task it ships is megatron_ext.training.task's, which loads the trainer on the rank."""
    code = (
        "import sys\n"
        "from run_configs.recipes import pretrain_task, tiny_pretrain\n"
        f"task = pretrain_task(tiny_pretrain(data_dir={str(tmp_path)!r}))\n"
        "fn = task.__fn_or_cls__\n"
        "print(fn.__module__, fn.__name__, 'megatron.core' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["megatron_ext.training.task", "pretrain_on_this_rank", "False"]


# -- overrides ------------------------------------------------------------------------------------


def test_overrides_reach_recipe_arguments_fields_and_the_executor(tmp_path):
    recipe = get_recipe("tiny")
    items = [
        "tp=2",
        "steps=40",
        "optimizer.lr=1e-3",
        "data.paths=[/d/a,/d/b]",
        "parallel.sequence_parallel=None",
        "eval_iters*=2",
        "model.rope_base=1e6",
        "executor.ntasks_per_node=4",
    ]
    ov = split_overrides(items, recipe)
    assert ov.recipe == {"tensor": 2, "train_steps": 40}
    assert ov.executor == ["ntasks_per_node=4"]
    cfg = apply_overrides(recipe(data_dir=tmp_path, **ov.recipe), ov.config)
    built = fdl.build(cfg)
    assert built.parallel.tensor == 2
    assert built.train_steps == 40 and built.optimizer.wsd_decay_steps == 8  # follows the steps
    assert built.optimizer.lr == 1e-3
    assert built.data.paths == ("/d/a", "/d/b")
    assert built.parallel.sequence_parallel is None
    assert built.eval_iters == 8
    assert built.model.rope_base == 1e6
    executor = override_executor(local_executor(2, gpu=False), ov.executor)
    assert executor.ntasks_per_node == 4 and executor_world_size(executor) == 4

    with pytest.raises(ValueError, match="OptimizerConfig has no field 'learning_rate'"):
        apply_overrides(recipe(data_dir=tmp_path), ["optimizer.learning_rate=1"])
    with pytest.raises(ValueError, match="'two' is not an int"):
        apply_overrides(recipe(data_dir=tmp_path), ["parallel.tensor=two"])
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        split_overrides(["tp"], recipe)


# -- executors and dry runs -----------------------------------------------------------------------


def _sbatch(job_root: Path, nodes: int, gpus: int, tp: int, pp: int, ep: int = 1):
    executor = slurm_executor(
        account="acct_llm",
        partition="batch",
        nodes=nodes,
        gpus_per_node=gpus,
        container_image="nvcr.io/nvidia/pytorch:25.01-py3",
        container_mounts=["/lustre/data:/data", "/lustre/results:/results"],
        time="02:30:00",
        job_dir=str(job_root / "cluster_jobs"),
        packager=run.Packager(),
    )
    model = "moe_20b_a1b" if ep > 1 else "dense_4b"
    config = paper_pretrain(model, preset="precision", tensor=tp, pipeline=pp, expert=ep)
    result = dryrun({"pretrain": pretrain_task(config)}, executor, name="paper")
    return result, result.scripts["pretrain"]


def test_slurm_dryrun_writes_the_sbatch_script(shared_dir):
    result, script = _sbatch(shared_dir, nodes=4, gpus=8, tp=2, pp=2)
    assert Path(result.script_paths["pretrain"]).read_text() == script
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, re.MULTILINE))
    assert flags["nodes"] == "4"
    assert flags["ntasks-per-node"] == "1"  # one torchrun agent per node
    assert flags["gpus-per-node"] == "8"
    assert flags["account"] == "acct_llm" and flags["partition"] == "batch"
    assert flags["time"] == "02:30:00"
    assert "exclusive" in flags and flags["mem"] == "0"
    assert flags["signal"] == "TERM@120"  # the trainer saves and exits before the time limit

    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    args = shlex.split(srun.split(" & ")[0])
    assert args[args.index("--container-image") + 1] == "nvcr.io/nvidia/pytorch:25.01-py3"
    mounts = args[args.index("--container-mounts") + 1].split(",")
    assert {"/lustre/data:/data", "/lustre/results:/results"} <= set(mounts)
    torchrun = args[args.index("torchrun") :]
    assert torchrun[torchrun.index("--nnodes") + 1] == "4"
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "8"
    assert torchrun[torchrun.index("--node-rank") + 1] == "$SLURM_NODEID"
    assert torchrun[torchrun.index("--rdzv-endpoint") + 1].startswith("$head_node_ip:")
    assert torchrun[torchrun.index("-m") + 1] == "nemo_run.core.runners.fdl_runner"
    assert "export PYTHONPATH=/nemo_run/code:$PYTHONPATH" in script
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script

    # the configuration the ranks will build, as serialized next to the script
    job_dir = Path(result.experiment_dir) / "pretrain"
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    serialized = (job_dir / "configs" / "pretrain_fn_or_script").read_text()
    assert torchrun[-1] == "/nemo_run/configs/pretrain_fn_or_script"
    task = ZlibJSONSerializer().deserialize(serialized)
    built = fdl.build(task.config)
    assert (built.parallel.tensor, built.parallel.pipeline, built.parallel.expert) == (2, 2, 1)
    layout = check_world(built, 4 * 8)
    assert (layout.tensor, layout.pipeline, layout.data) == (2, 2, 8)
    assert built.shaping.beta == -0.25 and built.model.name == "dense_4b"


def test_transformer_engine_is_checked_where_the_ranks_run(tmp_path):
    from megatron_ext.models import have_transformer_engine

    config = paper_pretrain("dense_1b", use_transformer_engine=True)
    layout = check_world(config, 64, check_environment=False)  # a Slurm image brings its own TE
    assert (layout.tensor, layout.data) == (1, 64)
    if not have_transformer_engine():
        with pytest.raises(ConfigError, match="Transformer Engine is not installed"):
            check_world(config, 64)


def test_slurm_dryrun_moe_layout_and_refusal(shared_dir):
    _, script = _sbatch(shared_dir, nodes=8, gpus=4, tp=1, pp=2, ep=16)
    assert "#SBATCH --nodes=8" in script and "#SBATCH --gpus-per-node=4" in script
    assert re.search(r"--nnodes 8 --nproc-per-node 4\b", script)
    # 2 nodes x 8 GPUs = 16 ranks with PP=2 leave DP=8, which EP=16 cannot divide
    with pytest.raises(ConfigError, match="parallel.expert=16 does not divide the data-parallel"):
        _sbatch(shared_dir, nodes=2, gpus=8, tp=1, pp=2, ep=16)


def test_slurm_job_folder_must_be_on_shared_storage(shared_dir, tmp_path):
    """A multi-node job's folder (packaged code, sbatch logs) defaults to $NEMORUN_HOME/jobs
    (the CLI's dry run below shows it in the sbatch script) and may not be node-local; one
    node may use /tmp. The command line's refusal: test_cli_dryrun_prints_the_resolved_run."""
    executor = slurm_executor(account="a", nodes=16, job_dir=str(shared_dir / "jobs"))
    assert executor.tunnel.job_dir == str(shared_dir / "jobs")
    use_nemorun_home(shared_dir / "home")
    assert slurm_executor(account="a", nodes=16).tunnel.job_dir == str(shared_dir / "home/jobs")
    use_nemorun_home(tmp_path / "home")  # pytest's folders are under /tmp
    with pytest.raises(ValueError, match=r"\(the default, \$NEMORUN_HOME/jobs\) is under /tmp"):
        slurm_executor(account="a", nodes=2)
    for local in ("/tmp/nemo_run_jobs", "/dev/shm/jobs", "/var/tmp"):
        with pytest.raises(ValueError, match=f"the job folder {local} \\(job_dir\\) is under"):
            slurm_executor(account="a", nodes=2, job_dir=local)
    assert slurm_executor(account="a", nodes=1, job_dir="/tmp/one_node").tunnel.job_dir
    with pytest.raises(ValueError, match="ssh_host='login' needs job_dir"):
        slurm_executor(account="a", nodes=2, ssh_host="login")


def test_local_dryrun_is_torchrun_with_nproc_ranks(tmp_path):
    executor = local_executor(2, gpu=False)
    assert executor.env_vars["PATH"] == str(Path(sys.executable).parent)
    assert int(executor.env_vars["OMP_NUM_THREADS"]) >= 1 and executor.ntasks_per_node == 2
    tasks = preset_tasks(out_dir=tmp_path / "runs", data_dir=tmp_path, tensor=2)
    assert list(tasks) == list(PRESETS)
    for preset, task in tasks.items():
        built = fdl.build(task.config)
        assert built.shaping == RewardShapingConfig.preset(preset)
        assert built.logging.log_dir == str(tmp_path / "runs" / preset / "logs")
    result = dryrun(tasks, executor, name="compare")
    assert set(result.scripts) == set(PRESETS)
    command = shlex.split(result.scripts["precision"])
    torchrun = command[command.index("torchrun") :]
    assert torchrun[torchrun.index("--nnodes") + 1] == "1"
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "2"
    assert "nemo_run.core.runners.fdl_runner" in torchrun


def test_compare_with_seeds_offsets_the_recipe_seed_per_run(tmp_path):
    """--seeds N: the recipe seed + 0..N-1, the same for every preset, each run in its own
    folder; one seed keeps the runs at out/<preset>/ (as the existing layout test checks)."""
    from run_configs.experiments import comparison_runs

    presets = ("ce", "precision")
    tasks = preset_tasks(out_dir=tmp_path / "cmp", presets=presets, seeds=3, data_dir=tmp_path)
    assert list(tasks) == [f"{p}-seed{s}" for p in presets for s in (1234, 1235, 1236)]
    for name, task in tasks.items():
        preset, seed = name.split("-seed")
        built = fdl.build(task.config)
        assert built.seed == int(seed) and built.shaping == RewardShapingConfig.preset(preset)
        assert built.logging.log_dir == str(tmp_path / "cmp" / preset / f"seed{seed}" / "logs")
        assert built.data.seed == 1234  # the data order is the same for every seed
    runs = comparison_runs(out_dir="cmp", presets=("ce",), seeds=2, data_dir=tmp_path, seed=7)
    assert {s: str(folder) for s, (folder, _) in runs["ce"].items()} == {
        7: "cmp/ce/seed7",
        8: "cmp/ce/seed8",
    }
    with pytest.raises(ValueError, match="seeds=0: a comparison needs at least one seed"):
        preset_tasks(out_dir=tmp_path, presets=presets, seeds=0, data_dir=tmp_path)


def test_cli_dryrun_prints_the_resolved_run(shared_dir, capsys):
    """Also: without --job-dir the job folder is $NEMORUN_HOME/jobs (here --nemorun-home), never
    /tmp, and a node-local --job-dir is refused for a multi-node job."""
    env_home = str(shared_dir / "nr")
    cmd = [
        sys.executable,
        "-m",
        "run_configs",
        "pretrain",
        "--recipe",
        "moe_10b_a0.5b",
        "--preset",
        "tail_suppression",
        "--executor",
        "slurm",
        "--data",
        "/data/pretrain_text_document",
        "--account",
        "acct",
        "--nodes",
        "2",
        "--packager",
        "none",
        "--nemorun-home",
        env_home,
        "--dryrun",
        "ep=8",
        "steps=3000",
        "optimizer.lr=2e-4",
        "executor.time=01:00:00",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TP=1 x PP=1 x DP=16 = 16 ranks (EP=8)" in out.stdout
    resolved = json.loads(
        out.stdout.split("resolved configuration:\n", 1)[1].split("\n}\n")[0] + "}"
    )
    assert resolved["parallel"]["expert"] == 8 and resolved["train_steps"] == 3000
    assert resolved["optimizer"]["lr"] == 2e-4
    assert resolved["shaping"] == {
        "beta": 0.0,
        "lambda_head": 0.0,
        "lambda_tail": -0.1,
        "top_k": 100,
    }
    assert "#SBATCH --time=01:00:00" in out.stdout and "#SBATCH --nodes=2" in out.stdout
    assert f"#SBATCH --output={env_home}/jobs/" in out.stdout and "/tmp" not in out.stdout

    from run_configs.cli import main

    assert main([*cmd[3:-4], "tp=3"]) == 2
    assert (
        "parallel.tensor=3 does not divide model.num_attention_heads=8" in capsys.readouterr().err
    )
    assert main([*cmd[3:-4], "--job-dir", "/tmp/nemo_run_jobs"]) == 2
    err = capsys.readouterr().err
    assert "error: the job folder /tmp/nemo_run_jobs (job_dir) is under /tmp" in err
    assert "2-node job" in err and "(--job-dir on the command line)" in err


def test_slurm_dryrun_of_midtrain_from_an_import(shared_dir, capsys):
    """paper_midtrain from a Hugging Face base through the launcher and the Slurm executor, as
    the other recipes: the sbatch script of the recipe's layout, and the serialized configuration
    the ranks build starts from the import (weights only), not from a pre-training run."""
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from run_configs.cli import main

    argv = ["midtrain", "--recipe", "dense_4b", "--preset", "precision", "--init-from",
            "/results/qwen3-4b-base", "--executor", "slurm", "--data", "/data/mid_text_document",
            "--account", "acct", "--packager", "none", "--job-dir", str(shared_dir / "jobs"),
            "--dryrun", "steps=100"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "TP=2 x PP=1 x CP=2 x DP=32 = 128 ranks (EP=1)" in out
    assert "#SBATCH --nodes=16" in out and "#SBATCH --gpus-per-node=8" in out
    resolved = json.loads(out.split("resolved configuration:\n", 1)[1].split("\n}\n")[0] + "}")
    assert resolved["checkpoint"]["init_from"] == "/results/qwen3-4b-base"
    assert resolved["checkpoint"]["load_dir"] is None
    experiment = Path(re.search(r"nothing was launched \(job files in (\S+)\)", out)[1])
    name = "midtrain-dense_4b-precision"
    serialized = (experiment / name / "configs" / f"{name}_fn_or_script").read_text()
    built = fdl.build(ZlibJSONSerializer().deserialize(serialized).config)
    assert built.checkpoint.init_from == "/results/qwen3-4b-base"
    assert built.checkpoint.load_dir is None and built.checkpoint.load_optimizer
    assert (built.model.name, built.model.seq_length, built.train_steps) == (
        "dense_4b",
        16_384,
        100,
    )
    assert built.shaping == RewardShapingConfig.preset("precision")
    assert built.optimizer.wsd_decay_steps == 100


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["pretrain", "--recipe", "dense_4b", "--executor", "slurm", "--account", "a"],
            "--recipe dense_4b needs --data PREFIX",
        ),
        (
            ["midtrain", "--recipe", "tiny", "--load", "{tmp}/runs/tinyy"],
            "--load={tmp}/runs/tinyy does not exist; nearest checkpoint folders: {tmp}/runs/tiny",
        ),
        (["midtrain", "--recipe", "tiny"], "midtrain --recipe tiny needs --load"),
        (
            ["pretrain", "--recipe", "tiny", "--load", "x"],
            "--load is for midtrain; a pretrain run resumes from its own checkpoint folder",
        ),
        (
            ["compare", "--out", "{tmp}/cmp"],
            "--out {tmp}/cmp holds an earlier comparison (ce, report.md); pass --overwrite",
        ),
        (
            ["midtrain", "--recipe", "tiny", "--load", "{tmp}/runs/tiny", "--init-from", "x"],
            "--load {tmp}/runs/tiny and --init-from x both name where mid-training starts",
        ),
        (
            ["midtrain", "--recipe", "tiny", "--preset", "ce", "--init-from", "{tmp}/hf"],
            "it is a Hugging Face model directory: import it first with "
            + "`python tools/import_hf.py --hf {tmp}/hf --out CKPT`",
        ),
        (
            ["rl-probe", "--compare-dir", "{tmp}/cmp", "--data-dir", "{tmp}/runs"],
            "--data-dir {tmp}/runs holds no built corpus (manifest.json)",
        ),
    ],
    ids=[
        "paper-needs-data",
        "load-typo",
        "tiny-midtrain-needs-load",
        "pretrain-load",
        "compare",
        "load-and-init-from",
        "init-from-hf-dir",
        "rl-probe",
    ],
)
def test_launcher_refuses_before_importing_nemo_run(tmp_path, argv, message):
    """Each mistake is one `error:` line, exit status 2, before NeMo-Run or torch is imported
    (they take 10-25 s); an earlier comparison is never mixed with a new one."""
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "latest").write_text("3\n")
    (tmp_path / "cmp" / "ce").mkdir(parents=True)
    (tmp_path / "cmp" / "report.md").write_text("old")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "run_configs", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-2000:]
    assert message.format(tmp=tmp_path) in errors[0]
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not {"torch", "nemo_run", "megatron.core"} & imported


def test_midtrain_takes_the_preset_of_the_checkpoint_it_continues(tmp_path, monkeypatch):
    """Before, midtrain without --preset switched a precision-trained model to ce silently."""
    import argparse

    from run_configs import cli

    monkeypatch.setattr(
        "megatron_ext.export.from_training.training_run_config",
        lambda path: {"shaping": {"beta": -0.25, "lambda_head": 0.0, "lambda_tail": 0.0,
                                  "top_k": 100}},
    )  # fmt: skip
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("7\n")
    args = argparse.Namespace(load=str(tmp_path / "ckpt"))
    assert cli._continued_preset(args) == "precision"
    with pytest.raises(ValueError, match="midtrain needs --preset"):
        cli._continued_preset(argparse.Namespace(load="/results/elsewhere/checkpoints"))
    # An import from Hugging Face records no loss: --preset is needed, and said so.
    monkeypatch.setattr(
        "megatron_ext.export.from_training.training_run_config",
        lambda path: {"model": {}, "parallel": {}, "data": {"eod_id": 0}},
    )
    args = argparse.Namespace(load=None, init_from=str(tmp_path / "ckpt"))
    with pytest.raises(
        ValueError,
        match=r"midtrain needs --preset: .*ckpt \(step 7\) records no"
        r" loss, as a model imported from Hugging Face does; choose one of ce, ",
    ):
        cli._continued_preset(args)  # fmt: skip


def test_slurm_launch_warns_about_uncommitted_changes(tmp_path, monkeypatch, capsys):
    from run_configs import cli

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        ["git", "-C", str(tmp_path), "-c", "user.email=a@b", "-c", "user.name=a", "commit",
         "-q", "--allow-empty", "-m", "x"],
        check=True,
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    cli._warn_uncommitted()
    assert capsys.readouterr().err == ""
    (tmp_path / "new.py").write_text("")
    cli._warn_uncommitted()
    err = capsys.readouterr().err
    assert "1 uncommitted change(s) (new.py)" in err and "--packager none" in err


# -- real runs on CPU (torchrun through NeMo-Run's local executor) --------------------------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from megatron_ext.data import DefaultCorpusConfig, build_default_corpus

    return build_default_corpus(
        tmp_path_factory.mktemp("corpus"),
        DefaultCorpusConfig(vocab_size=CORPUS_VOCAB, max_source_bytes=CORPUS_BYTES),
    )


@pytest.mark.slow
def test_main_job_trains_at_tp2_through_nemo_run_and_exports(tmp_path, small_corpus):
    from megatron_ext.export.from_training import resolve_training_checkpoint, training_run_config
    from run_configs.main_job import run_main_job

    out = tmp_path / "main"
    summary = run_main_job(
        out,
        preset="precision",
        steps=4,
        vocab_size=CORPUS_VOCAB,
        max_source_bytes=CORPUS_BYTES,
        corpus_dir=small_corpus.out_dir,
        eval_interval=2,
        check_tokens=1024,
    )
    assert summary["steps"] == 4
    records = [
        json.loads(line) for line in (out / "train/logs/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert [r["step"] for r in records if "val_ppl" in r] == [2, 4]
    assert records[0]["ppl"] == pytest.approx(CORPUS_VOCAB, rel=0.25)  # untrained: ~uniform

    stored = training_run_config(resolve_training_checkpoint(out / "train" / "checkpoints"))
    assert stored["parallel"]["tensor"] == 2 and stored["shaping"]["beta"] == -0.25
    assert stored["model"]["vocab_size"] == CORPUS_VOCAB

    hf = json.loads((out / "hf" / "config.json").read_text())
    assert hf["model_type"] == "qwen3"
    assert (hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"]) == (CORPUS_VOCAB, 64, 2)
    assert (out / "hf" / "tokenizer.json").is_file()
    assert 1.0 < summary["hf_held_out_ppl"] < 2 * CORPUS_VOCAB
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    states = Path(summary["paths"]["nemo_run_experiment"])
    assert states.is_dir() and states.parent.name == "main_job"


def test_report_from_metrics_files(tmp_path):
    from run_configs.report import write_report

    runs = {}
    for i, preset in enumerate(PRESETS):
        path = tmp_path / preset / "logs" / "metrics.jsonl"
        path.parent.mkdir(parents=True)
        lines = []
        for step in range(1, 21):
            ce = 5.0 - 0.1 * step - 0.01 * i
            rec = {"step": step, "loss": ce, "ce_loss": ce, "ppl": math.exp(ce)}
            rec.update(entropy=4.0 - 0.05 * step + 0.1 * i, target_prob=0.1, topk_mass=0.5)
            if step % 10 == 0:
                rec.update(val_loss=ce, val_ce_loss=ce + 0.2, val_ppl=math.exp(ce + 0.2))
                rec.update(val_entropy=3.0 + i, val_target_prob=0.2, val_topk_mass=0.6)
            lines.append(json.dumps(rec))
        path.write_text("\n".join(lines) + "\n")
        runs[preset] = tmp_path / preset
    paths = write_report(runs, tmp_path / "report")
    rows = [line for line in paths.table.splitlines() if line.startswith("| `")]
    assert len(rows) == 5
    diversity = rows[PRESETS.index("diversity")].split("|")
    assert diversity[2].strip() == "0.5" and diversity[6].strip() == "20"
    assert diversity[7].strip() == f"{math.exp(3.0 - 0.02 + 0.2):.2f}"  # val ppl at step 20
    assert diversity[8].strip() == "5.000"  # val entropy
    tail = rows[PRESETS.index("tail_suppression")].split("|")
    assert [c.strip() for c in tail[2:6]] == ["0", "0", "-0.1", "100"]
    mean_ce = sum(5.0 - 0.1 * s - 0.02 for s in range(11, 21)) / 10
    assert diversity[12].strip() == f"{math.exp(mean_ce):.2f}"
    assert paths.plot.read_bytes()[:4] == b"\x89PNG"
    image = "![perplexity, entropy and tail mass over steps](report.png)"
    assert image in paths.markdown.read_text()
