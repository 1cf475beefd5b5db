"""Which device a run computes on (TrainConfig.device), decided before any distributed work.

`auto` must not turn a GPU job into a CPU job without saying so: when CUDA_VISIBLE_DEVICES names
GPUs (as Slurm and container runtimes set it for a GPU job) but torch sees none, the driver or
the CUDA build is broken, and the run is refused instead of crawling on gloo.
"""

from __future__ import annotations

import os

from megatron_ext.training.config import DEVICE_CHOICES, ConfigError

__all__ = ["resolve_device", "visible_devices_named"]


def visible_devices_named(value: str | None) -> list[str]:
    """The GPUs a CUDA_VISIBLE_DEVICES value names, as CUDA reads it: comma-separated indices or
    GPU-/MIG- UUIDs up to the first entry that is neither ("", "-1", "NoDevFiles" name none)."""
    named: list[str] = []
    for entry in (value or "").split(","):
        entry = entry.strip()
        if entry.isdigit() or entry.startswith(("GPU-", "MIG-")):
            named.append(entry)
        else:
            break
    return named


def resolve_device(choice: str) -> str:
    """'cuda' or 'cpu' for TrainConfig.device `choice` on this machine.

    Raises:
        ConfigError: 'cuda' without a GPU torch can use, or 'auto' where CUDA_VISIBLE_DEVICES
            names GPUs that torch cannot see (the message names the value and the fix).
    """
    if choice not in DEVICE_CHOICES:
        raise ConfigError(f"TrainConfig.device={choice!r}; choose one of {DEVICE_CHOICES}")
    if choice == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    named = visible_devices_named(visible)
    if choice == "cuda":
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise ConfigError(
            f"device='cuda', but torch sees no GPU{where}; check the driver (nvidia-smi) and "
            f"that torch is a CUDA build (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}), or run with device='cpu'"
        )
    if named:
        raise ConfigError(
            f"device='auto': CUDA_VISIBLE_DEVICES={visible!r} names GPU(s) {', '.join(named)}, "
            f"but torch sees none (torch {torch.__version__}, CUDA {torch.version.cuda}): a "
            "broken driver or a CPU-only torch; this run would have trained on the CPU instead. "
            "Fix the GPU setup (nvidia-smi), or pass device='cpu' to train "
            "on the CPU on purpose"
        )
    return "cpu"
