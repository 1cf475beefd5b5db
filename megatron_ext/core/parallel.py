"""megatron-core's parallel state set up for a block of code and torn down completely after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

__all__ = ["destroy_new_process_groups", "model_parallel", "process_groups"]


def process_groups() -> set:
    """The process groups alive in this process (empty when torch hides them)."""
    world = getattr(dist.distributed_c10d, "_world", None)
    return set(getattr(world, "pg_map", {}).keys()) if world is not None else set()


def destroy_new_process_groups(groups_before: set) -> None:
    """Destroy every process group made since `groups_before` was taken.

    megatron-core's destroy_model_parallel only forgets its groups. In a process that keeps its
    default group (test workers, notebooks, repeated runs) each initialisation would otherwise
    leave a few dozen gloo groups, each with its own threads, behind.
    """
    for group in process_groups() - groups_before:
        dist.destroy_process_group(group)
    # megatron-core 0.19's destroy_model_parallel leaves two of its globals set
    # (_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP and its gloo twin), which would keep those
    # groups, and their threads, alive until the next initialisation.
    from megatron.core import parallel_state

    alive = process_groups()
    for name, value in list(vars(parallel_state).items()):
        if isinstance(value, dist.ProcessGroup) and value not in alive:
            setattr(parallel_state, name, None)


@contextlib.contextmanager
def model_parallel(
    tensor: int = 1, pipeline: int = 1, expert: int = 1, seed: int | None = None
) -> Iterator[None]:
    """initialize_model_parallel for the block (and the model-parallel RNG seeds when `seed` is
    given); destroy_model_parallel and the groups it made afterwards."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    groups_before = process_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        expert_model_parallel_size=expert,
    )
    try:
        if seed is not None:
            model_parallel_cuda_manual_seed(seed)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        destroy_new_process_groups(groups_before)
