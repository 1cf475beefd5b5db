"""Silence the messages megatron-core and torch print on every rank that are expected here.

A two-rank run on this project's stack printed about 50 such lines per rank: notices that Apex and
Transformer Engine are missing (megatron falls back to torch implementations), deprecations inside
megatron-core's own calls (GPTModel, `reduce_scatter_tensor`, `all_gather_into_tensor`, the
"full" CUDA-graph scope of its default config, its async-save writer, ShardedTensor, torch's load
argument order), torch's notice when megatron reads checkpoint metadata on one rank alone, and an
experimental-API notice at import. None of them is something a user of megatron_ext can act on, so each is matched
by its exact text and dropped; everything else (another deprecation, a real warning) still shows.

Messages that are expected only without a GPU (torch finding no CUDA runtime, the advice to set
CUDA_DEVICE_MAX_CONNECTIONS for sequence parallelism) are dropped only on a machine with no NVIDIA
device: on a GPU machine they signal a real problem. That Transformer Engine is missing on a GPU
machine is reported once, by the trainer on rank 0 (see `transformer_engine_notice`).

The exporter reads checkpoints in one process without a process group: megatron's notice that it
cannot tell the rank (`single_process=True`) is dropped there only.

`quiet_expected_messages()` is idempotent and imports neither torch nor megatron-core; call it
before they are imported (megatron_ext's package import does).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

__all__ = ["gpu_machine", "quiet_expected_messages", "transformer_engine_notice"]

# (message prefix, category) of Python warnings that are expected on every machine.
_EXPECTED_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed", UserWarning),
    ("absl.logging is not installed", UserWarning),
    ("MimoModelConfig is experimental", UserWarning),
    ("full scope is deprecated", UserWarning),
    ("`torch.distributed.reduce_scatter_tensor` is deprecated", FutureWarning),
    ("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning),
    # megatron-core's dist_checkpointing reads metadata on each rank alone, with torch's
    # positional load arguments, into ShardedTensors.
    ("torch.distributed is disabled, unavailable or uninitialized", UserWarning),
    ("The argument order of load has been changed", UserWarning),
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
)
# ... expected only on a machine without a GPU.
_CPU_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (
        (
            "When using sequence parallelism it is recommended to set the environment variable "
            "CUDA_DEVICE_MAX_CONNECTIONS"
        ),
        UserWarning,
    ),
)
# ... expected where the exporter reads a checkpoint in a single process.
_SINGLE_PROCESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    ("Could not determine rank from torch.distributed", UserWarning),
)
# logger name -> message prefixes of log records that are expected.
_EXPECTED_LOGS: dict[str, tuple[str, ...]] = {
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
}
_CPU_LOGS: dict[str, tuple[str, ...]] = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}

_installed: set[str] = set()


def gpu_machine() -> bool:
    """Whether this machine has an NVIDIA device node (no torch import, no CUDA initialisation)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _ignore(entries: tuple[tuple[str, type[Warning]], ...]) -> None:
    for prefix, category in entries:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)


def _drop_logs(entries: dict[str, tuple[str, ...]]) -> None:
    for name, prefixes in entries.items():
        logging.getLogger(name).addFilter(_DropPrefixes(prefixes))


def quiet_expected_messages(*, single_process: bool = False) -> None:
    """Drop the expected messages listed in the module docstring (once per process).

    Args:
        single_process: also drop the notices of reading a dist checkpoint without a process
            group (the exporter).
    """
    groups = ["common", *(["single_process"] if single_process else [])]
    for group in groups:
        if group in _installed:
            continue
        _installed.add(group)
        if group == "single_process":
            _ignore(_SINGLE_PROCESS_WARNINGS)
            continue
        _ignore(_EXPECTED_WARNINGS)
        _drop_logs(_EXPECTED_LOGS)
        if not gpu_machine():
            _ignore(_CPU_WARNINGS)
            _drop_logs(_CPU_LOGS)


def transformer_engine_notice() -> str | None:
    """The one line to print (rank 0) when a GPU run goes without Transformer Engine, else None."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine"):
        return None
    return (
        "note: Transformer Engine is not installed: megatron-core uses the local (torch) layer "
        "spec and its torch fallbacks for fused kernels (install megatron_ext[te] for TE's)"
    )
