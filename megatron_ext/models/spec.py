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
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

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


def layer_spec(
    model: ModelConfig, *, use_transformer_engine: bool = False, moe: bool | None = None
) -> ModuleSpec:
    """The spec of one decoder layer: with experts (moe=True) or a dense MLP (moe=False); None
    means the model's kind (an MoE model's layers are MoE layers unless moe_dense_layers names
    them).

    Raises:
        TransformerEngineUnavailableError: use_transformer_engine=True without Transformer Engine.
    """
    if moe is None:
        moe = model.is_moe
    if moe and not model.is_moe:
        raise ValueError(f"an MoE layer needs num_experts > 0 (model {model.name!r} is dense)")
    if not moe:
        model = dataclasses.replace(
            model,
            num_experts=0,
            moe_router_topk=0,
            moe_shared_expert_ffn_hidden_size=0,
            moe_dense_layers=(),
        )
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
    """The decoder block of this pipeline stage: its layers (MoE or dense, as
    ModelConfig.is_moe_layer says for each) and the final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if model.moe_dense_layers:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        kinds = [model.is_moe_layer(offset + i) for i in range(num_layers)]
    else:
        kinds = [model.is_moe] * num_layers
    specs = {
        kind: layer_spec(model, use_transformer_engine=use_transformer_engine, moe=kind)
        for kind in set(kinds)
    }
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[specs[kind] for kind in kinds], layer_norm=final_norm
    )
