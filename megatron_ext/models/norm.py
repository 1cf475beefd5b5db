"""A torch-native RMSNorm for megatron's local layer spec that also works with sequence parallelism."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["RMSNorm"]


class RMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` built the way megatron builds norms (config, hidden_size, eps).

    megatron-core's own torch fallback (`WrappedTorchNorm`, used by the local spec without Apex)
    refuses sequence parallelism because it does not mark its weight; with sequence parallelism
    each tensor-parallel rank sees a different slice of the sequence, so the weight gradient must be
    summed over the TP group, which `finalize_model_grads` does for parameters carrying
    `sequence_parallel=True`. MoE with TP > 1 requires sequence parallelism, so the local spec needs
    this. The parameter is named `weight`, as in megatron's norms, so checkpoints are unchanged.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs):
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built with normalization={config.normalization!r}")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
