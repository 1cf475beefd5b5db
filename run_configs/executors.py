"""NeMo-Run executors for the trainer: local torchrun (CPU or GPU) and multi-node Slurm.

Both launch one torchrun agent per node, which starts one rank per process/GPU; every rank runs
`megatron_ext.training.pretrain(config)` (gloo on CPU, NCCL on GPUs). The model-parallel layout
(tensor x pipeline x data = world size, experts carved out of the data-parallel ranks) is derived
from the executor's world size by `ParallelLayout.derive` and checked against the run
configuration with the trainer's own validation (`TrainConfig.validate`) before anything is
launched.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import fiddle as fdl
import nemo_run as run

from megatron_ext.training import TrainConfig

__all__ = [
    "ParallelLayout",
    "apply_layout",
    "check_world",
    "executor_world_size",
    "local_executor",
    "override_executor",
    "runs_here",
    "slurm_executor",
    "use_nemorun_home",
]

CONTAINER_CODE_DIR = "/nemo_run/code"
"""Where NeMo-Run's packager puts the code inside a Slurm container (and the job's workdir)."""


def use_nemorun_home(path: str | os.PathLike[str]) -> str:
    """Make `path` NeMo-Run's home (experiment folders, logs) for this process and its children.

    NeMo-Run reads NEMORUN_HOME once at import; this sets the variable and the loaded value.
    """
    from nemo_run.config import set_nemorun_home

    home = str(Path(path).expanduser().resolve())
    Path(home).mkdir(parents=True, exist_ok=True)
    os.environ["NEMORUN_HOME"] = home
    set_nemorun_home(home)
    return home


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """How the ranks of a job split the model: tensor * pipeline * data = world size."""

    tensor: int
    """Tensor-parallel size."""
    pipeline: int
    """Pipeline-parallel size."""
    data: int
    """Data-parallel size (world size / (tensor * pipeline))."""
    expert: int = 1
    """Expert-parallel size; divides `data` (megatron carves it out of the data-parallel ranks)."""

    @property
    def world_size(self) -> int:
        """Ranks of the job."""
        return self.tensor * self.pipeline * self.data

    @classmethod
    def derive(
        cls, world_size: int, *, tensor: int = 1, pipeline: int = 1, expert: int = 1
    ) -> ParallelLayout:
        """The layout with the given model-parallel sizes on `world_size` ranks.

        Raises:
            ValueError: tensor * pipeline does not divide world_size, or expert does not divide
                the data-parallel size (the message names the sizes).
        """
        for name, value in (
            ("world_size", world_size),
            ("tensor", tensor),
            ("pipeline", pipeline),
            ("expert", expert),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if world_size % (tensor * pipeline):
            raise ValueError(
                f"tensor * pipeline = {tensor} * {pipeline} = {tensor * pipeline} does not divide "
                f"the world size {world_size}"
            )
        data = world_size // (tensor * pipeline)
        if data % expert:
            raise ValueError(
                f"expert={expert} does not divide the data-parallel size {data} "
                f"(world size {world_size} / (tensor {tensor} * pipeline {pipeline}))"
            )
        return cls(tensor=tensor, pipeline=pipeline, data=data, expert=expert)

    def __str__(self) -> str:
        return (
            f"TP={self.tensor} x PP={self.pipeline} x DP={self.data} = {self.world_size} ranks "
            f"(EP={self.expert})"
        )


def apply_layout(config: fdl.Config, layout: ParallelLayout) -> fdl.Config:
    """Set the run.Config[TrainConfig]'s parallel sizes to `layout`'s (in place; returned)."""
    config.parallel.tensor = layout.tensor
    config.parallel.pipeline = layout.pipeline
    config.parallel.expert = layout.expert
    return config


def check_world(
    config: fdl.Config | TrainConfig, world_size: int, *, check_environment: bool = True
) -> ParallelLayout:
    """Validate a run configuration for `world_size` ranks with the trainer's own checks (heads,
    kv groups, FFN, vocabulary, layers, experts, sequence and batch sizes) and return its layout.

    Args:
        config: a run.Config[TrainConfig] or a TrainConfig.
        world_size: ranks the job will have.
        check_environment: also check what the trainer checks of this machine (Transformer
            Engine installed when use_transformer_engine is set; where the run starts: a
            load_dir that exists, no earlier run in save_dir without checkpoint.overwrite);
            False for jobs that run elsewhere (Slurm: the cluster's file system and image).

    Raises:
        megatron_ext.training.ConfigError: the configuration cannot run on world_size ranks.
    """
    built = config if isinstance(config, TrainConfig) else fdl.build(config)
    if not check_environment and built.use_transformer_engine:
        built = dataclasses.replace(built, use_transformer_engine=False)
    built.validate(world_size)
    if check_environment:
        from megatron_ext.training.start import plan_start

        plan_start(built)
    p = built.parallel
    return ParallelLayout.derive(world_size, tensor=p.tensor, pipeline=p.pipeline, expert=p.expert)


def local_executor(
    nproc: int = 1,
    *,
    gpu: bool | None = None,
    env_vars: Mapping[str, str] | None = None,
) -> run.LocalExecutor:
    """Run on this machine: torchrun with `nproc` processes (one per GPU, or gloo ranks on CPU).

    Args:
        nproc: ranks (torchrun --nproc-per-node).
        gpu: whether ranks use GPUs; None: when torch sees one. On CPU every rank gets
            cpu_count // nproc intra-op threads (at least 1).
        env_vars: extra environment variables of the ranks.

    Raises:
        ValueError: nproc < 1, or more GPU ranks than visible GPUs.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    import torch

    if gpu is None:
        gpu = torch.cuda.is_available()
    env = {
        # torchx resolves `torchrun` on the ranks' PATH: this interpreter's, not whichever is first.
        "PATH": str(Path(sys.executable).parent),
        "PYTHONUNBUFFERED": "1",
        # NeMo-Run starts torchrun with LOGLEVEL=INFO (about 45 lines of agent set-up per run).
        "LOGLEVEL": "WARNING",
    }
    if gpu:
        available = torch.cuda.device_count()
        if nproc > available:
            raise ValueError(f"nproc={nproc} GPU ranks but only {available} GPU(s) are visible")
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(env_vars or {})
    return run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun", env_vars=env)


def slurm_executor(
    *,
    account: str,
    partition: str | None = None,
    nodes: int = 1,
    gpus_per_node: int = 8,
    container_image: str | None = None,
    container_mounts: Sequence[str] = (),
    time: str = "04:00:00",
    job_dir: str = "/tmp/nemo_run_jobs",
    ssh_host: str | None = None,
    ssh_user: str | None = None,
    packager: run.Packager | None = None,
    env_vars: Mapping[str, str] | None = None,
    qos: str | None = None,
    exclusive: bool = True,
    mem: str | None = "0",
    job_name_prefix: str | None = None,
    signal: str | None = "TERM@120",
) -> run.SlurmExecutor:
    """A multi-node Slurm job (sbatch + srun; Pyxis containers when container_image is set).

    torchrun runs once per node (NeMo-Run sets --ntasks-per-node=1 and torchrun
    --nproc-per-node=gpus_per_node) and starts one rank per GPU: nodes * gpus_per_node ranks.

    Args:
        account: Slurm account (--account).
        partition: Slurm partition (--partition).
        nodes: nodes (--nodes).
        gpus_per_node: GPUs per node (--gpus-per-node, and ranks per node).
        container_image: container image for srun --container-image (Pyxis/enroot); it needs
            torch, megatron-core and megatron_ext's dependencies. None runs on the bare nodes.
        container_mounts: "src:dst" mounts (--container-mounts), e.g. the data and results.
        time: wall-clock limit (--time), HH:MM:SS or D-HH:MM:SS.
        job_dir: folder on the cluster for NeMo-Run's job files (code, configs, logs).
        ssh_host: submit through SSH to this login node; None submits on this machine.
        ssh_user: SSH user (default: $USER).
        packager: how the code is shipped (default: git archive of this repository's HEAD,
            unpacked in the job folder and put first on PYTHONPATH).
        env_vars: extra environment variables of the ranks.
        qos: Slurm QOS (--qos).
        exclusive: whole nodes (--exclusive).
        mem: memory per node (--mem; "0" is all of it; None leaves it out).
        job_name_prefix: prefix of the Slurm job name (NeMo-Run's default: "<account>-...").
        signal: --signal; the default sends SIGTERM to every rank 120 s before the time limit,
            so the trainer saves a checkpoint and exits before Slurm kills the job (None: only
            Slurm's own SIGTERM, KillWait seconds before SIGKILL).
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be an int >= 1, got {nodes!r}")
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be an int >= 1, got {gpus_per_node!r}")
    for mount in container_mounts:
        if ":" not in mount:
            raise ValueError(f"container mount {mount!r} is not SRC:DST")
    if ssh_host:
        tunnel = run.SSHTunnel(
            host=ssh_host, user=ssh_user or os.environ.get("USER", ""), job_dir=job_dir
        )
    else:
        tunnel = run.LocalTunnel(job_dir=job_dir)
    env = {
        "PYTHONPATH": f"{CONTAINER_CODE_DIR}:$PYTHONPATH",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron's TP communication/compute overlap
        "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(env_vars or {})
    return run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=nodes,
        ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node,
        container_image=container_image,
        container_mounts=list(container_mounts),
        time=time,
        qos=qos,
        exclusive=exclusive or None,
        mem=mem,
        job_name_prefix=job_name_prefix,
        signal=signal,
        tunnel=tunnel,
        packager=packager if packager is not None else run.GitArchivePackager(),
        launcher="torchrun",
        env_vars=env,
    )


def runs_here(executor: run.Executor) -> bool:
    """Whether the executor's ranks run on this machine (its packages are theirs)."""
    return isinstance(executor, run.LocalExecutor)


def executor_world_size(executor: run.Executor) -> int:
    """Ranks a torchrun executor starts: nodes * processes per node."""
    return executor.nnodes() * executor.nproc_per_node()


def override_executor(executor: run.Executor, overrides: Sequence[str]) -> run.Executor:
    """Apply NeMo-Run CLI overrides (`time=08:00:00`, `nodes=4`, `env_vars={...}`) to a copy."""
    if not overrides:
        return executor
    from run_configs.overrides import apply_overrides

    config = executor.to_config()
    apply_overrides(config, list(overrides))
    return fdl.build(config)
