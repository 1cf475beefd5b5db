"""Layer specs for Qwen3-style decoders: megatron-core's local (torch) spec, or Transformer Engine's.

The local spec is the first-class path (it runs everywhere, CPU included); the Transformer Engine
spec is used only when asked for, and asking for it without Transformer Engine installed is an
error rather than a silent fallback.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.norm import RMSNorm

__all__ = [
    "TransformerEngineUnavailableError",
    "decoder_block_spec",
    "have_transformer_engine",
    "layer_spec",
]


class TransformerEngineUnavailableError(RuntimeError):
    """The Transformer Engine spec was asked for but Transformer Engine is not installed."""


def have_transformer_engine() -> bool:
    """Whether Transformer Engine's torch extension can be imported."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


def _local_layer_spec(model: ModelConfig) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(
        num_experts=model.num_experts or None,
        moe_grouped_gemm=False,
        qk_layernorm=True,
        normalization="RMSNorm",
    )
    # Swap megatron's torch norm fallback for ours (same parameters, sequence-parallel aware).
    sub = spec.submodules
    attention = sub.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(
            attention.submodules, q_layernorm=RMSNorm, k_layernorm=RMSNorm
        ),
    )
    sub = dataclasses.replace(
        sub, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm, self_attention=attention
    )
    return dataclasses.replace(spec, submodules=sub)


def layer_spec(model: ModelConfig, *, use_transformer_engine: bool = False) -> ModuleSpec:
    """The spec of one decoder layer (every layer is the same: all dense or all MoE, as in Qwen3).

    Raises:
        TransformerEngineUnavailableError: use_transformer_engine=True without Transformer Engine.
    """
    if not use_transformer_engine:
        return _local_layer_spec(model)
    if not have_transformer_engine():
        raise TransformerEngineUnavailableError(
            "use_transformer_engine=True, but Transformer Engine is not installed "
            "(pip install 'megatron_ext[te]' on a CUDA machine), or use the local spec "
            "(use_transformer_engine=False)"
        )
    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=model.num_experts or None,
        moe_grouped_gemm=model.is_moe,
        qk_layernorm=True,
    )


def decoder_block_spec(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    use_transformer_engine: bool = False,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage: its layers and the final norm."""
    spec = layer_spec(model, use_transformer_engine=use_transformer_engine)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=final_norm)
