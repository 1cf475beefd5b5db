"""Qwen3-style models: typed configs and presets, megatron-core specs, the shaped-loss GPT model."""

from megatron_ext.models.config import MODEL_PRESETS, QWEN3_VOCAB_SIZE, ModelConfig, model_preset
from megatron_ext.models.gpt import (
    IGNORE_INDEX,
    ShapedLossGPTModel,
    build_model,
    to_transformer_config,
)
from megatron_ext.models.norm import RMSNorm
from megatron_ext.models.spec import (
    TransformerEngineUnavailableError,
    decoder_block_spec,
    have_transformer_engine,
    layer_spec,
)

__all__ = [
    "IGNORE_INDEX",
    "MODEL_PRESETS",
    "QWEN3_VOCAB_SIZE",
    "ModelConfig",
    "RMSNorm",
    "ShapedLossGPTModel",
    "TransformerEngineUnavailableError",
    "build_model",
    "decoder_block_spec",
    "have_transformer_engine",
    "layer_spec",
    "model_preset",
    "to_transformer_config",
]
