"""NeMo-Run executors for the trainer: local torchrun (CPU or GPU) and multi-node Slurm.

Both launch one torchrun agent per node, which starts one rank per process/GPU; every rank runs
`megatron_ext.training.pretrain(config)` (gloo on CPU, NCCL on GPUs). The model-parallel layout
(tensor x pipeline x context x data = world size, experts carved out of the data-parallel ranks)
is derived from the executor's world size by `ParallelLayout.derive` and checked against the run
configuration with the trainer's own validation (`TrainConfig.validate`) before anything is
launched.

A Slurm job's folder (the packaged code, the configs, the sbatch script and its logs) must be on
storage every node sees: it defaults to the jobs/ folder of NeMo-Run's home ($NEMORUN_HOME), and a
node-local folder (/tmp, /var/tmp, /dev/shm) is refused for a job of more than one node.
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
    "NODE_LOCAL_DIRS",
    "ParallelLayout",
    "apply_layout",
    "check_job_dir",
    "check_world",
    "default_job_dir",
    "executor_world_size",
    "local_executor",
    "override_executor",
    "runs_here",
    "slurm_executor",
    "use_nemorun_home",
]

CONTAINER_CODE_DIR = "/nemo_run/code"
"""Where NeMo-Run's packager puts the code inside a Slurm container (and the job's workdir)."""

NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
"""Folders that are each node's own on a cluster: no multi-node job's folder may be in them."""


def default_job_dir() -> str:
    """The Slurm job folder when none is given: jobs/ in NeMo-Run's home ($NEMORUN_HOME,
    default ~/.nemo_run; its experiments/ folder keeps each experiment's record)."""
    from nemo_run.config import get_nemorun_home

    return os.path.join(get_nemorun_home(), "jobs")


def check_job_dir(job_dir: str, nodes: int, *, source: str = "job_dir") -> None:
    """Refuse a node-local job folder for a job of more than one node: the other nodes would
    not find the packaged code, and the logs would be scattered over the nodes.

    Args:
        job_dir: the folder.
        nodes: nodes of the job.
        source: where the folder came from, for the message.

    Raises:
        ValueError: naming the folder, where it came from and the fix.
    """
    path = os.path.normpath(job_dir)
    local = next((d for d in NODE_LOCAL_DIRS if path == d or path.startswith(d + "/")), None)
    if nodes > 1 and local is not None:
        raise ValueError(
            f"the job folder {job_dir} ({source}) is under {local}, which every node has its "
            f"own of: a {nodes}-node job needs its folder (packaged code, configs, logs) on "
            "storage all nodes see; give a shared one (on Lustre, GPFS or NFS, e.g. "
            "/lustre/$USER/nemo_run_jobs) as job_dir (--job-dir on the command line), or set "
            "NEMORUN_HOME to a shared folder (the default job folder is "
            "$NEMORUN_HOME/jobs)"
        )


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
    """How the ranks of a job split the model: tensor * pipeline * context * data = world."""

    tensor: int
    """Tensor-parallel size."""
    pipeline: int
    """Pipeline-parallel size."""
    data: int
    """Data-parallel size (world size / (tensor * pipeline * context))."""
    expert: int = 1
    """Expert-parallel size; divides `data` (megatron carves it out of the data-parallel ranks)."""
    context: int = 1
    """Context-parallel size (ranks sharing each sequence)."""

    @property
    def world_size(self) -> int:
        """Ranks of the job."""
        return self.tensor * self.pipeline * self.context * self.data

    @classmethod
    def derive(
        cls,
        world_size: int,
        *,
        tensor: int = 1,
        pipeline: int = 1,
        expert: int = 1,
        context: int = 1,
    ) -> ParallelLayout:
        """The layout with the given model-parallel sizes on `world_size` ranks.

        Raises:
            ValueError: tensor * pipeline * context does not divide world_size, or expert does
                not divide the data-parallel size (the message names the sizes).
        """
        for name, value in (
            ("world_size", world_size),
            ("tensor", tensor),
            ("pipeline", pipeline),
            ("expert", expert),
            ("context", context),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        model = tensor * pipeline * context
        if world_size % model:
            named = f"tensor * pipeline = {tensor} * {pipeline}"
            if context > 1:
                named = f"tensor * pipeline * context = {tensor} * {pipeline} * {context}"
            raise ValueError(f"{named} = {model} does not divide the world size {world_size}")
        data = world_size // model
        if data % expert:
            parts = f"tensor {tensor} * pipeline {pipeline}"
            parts += f" * context {context}" if context > 1 else ""
            raise ValueError(
                f"expert={expert} does not divide the data-parallel size {data} "
                f"(world size {world_size} / ({parts}))"
            )
        return cls(tensor=tensor, pipeline=pipeline, data=data, expert=expert, context=context)

    def __str__(self) -> str:
        cp = f" x CP={self.context}" if self.context > 1 else ""
        return (
            f"TP={self.tensor} x PP={self.pipeline}{cp} x DP={self.data} = {self.world_size} "
            f"ranks (EP={self.expert})"
        )


def apply_layout(config: fdl.Config, layout: ParallelLayout) -> fdl.Config:
    """Set the run.Config[TrainConfig]'s parallel sizes to `layout`'s (in place; returned)."""
    config.parallel.tensor = layout.tensor
    config.parallel.pipeline = layout.pipeline
    config.parallel.expert = layout.expert
    config.parallel.context = layout.context
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
            Engine installed when use_transformer_engine is set, or context parallelism needs
            it; where the run starts: a load_dir that exists, no earlier run in save_dir
            without checkpoint.overwrite); False for jobs that run elsewhere (Slurm: the
            cluster's file system and image, which is taken to bring TE where asked for).

    Raises:
        megatron_ext.training.ConfigError: the configuration cannot run on world_size ranks.
    """
    built = config if isinstance(config, TrainConfig) else fdl.build(config)
    built.validate(world_size, check_environment=check_environment)
    if check_environment:
        from megatron_ext.training.start import plan_start

        plan_start(built)
    p = built.parallel
    return ParallelLayout.derive(
        world_size, tensor=p.tensor, pipeline=p.pipeline, expert=p.expert, context=p.context
    )


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
    job_dir: str | None = None,
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
        job_dir: folder for NeMo-Run's job files (packaged code, configs, sbatch script,
            logs), on storage every node of the job sees. None: default_job_dir(), NeMo-Run's
            experiments folder under $NEMORUN_HOME (submitting on this machine; through SSH a
            folder of the cluster must be given). A folder under /tmp, /var/tmp or /dev/shm
            is refused when nodes > 1.
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
    source = "job_dir"
    if job_dir is None:
        if ssh_host:
            raise ValueError(
                f"ssh_host={ssh_host!r} needs job_dir (--job-dir): a folder of the cluster, on "
                "storage every node sees, for NeMo-Run's job files (e.g. "
                "/lustre/$USER/nemo_run_jobs)"
            )
        job_dir, source = default_job_dir(), "the default, $NEMORUN_HOME/jobs"
    elif not ssh_host:
        job_dir = str(Path(job_dir).expanduser().absolute())
    check_job_dir(job_dir, nodes, source=source)
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
