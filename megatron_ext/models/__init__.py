"""Qwen3-style models: typed configs and presets, megatron-core specs, the shaped-loss GPT model.

Names are imported on first use (megatron_ext._lazy): ModelConfig and the presets load without
torch or megatron-core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_ext._lazy import lazy_exports

if TYPE_CHECKING:
    from megatron_ext.models.config import (
        MODEL_PRESETS,
        QWEN3_VOCAB_SIZE,
        ModelConfig,
        model_preset,
    )
    from megatron_ext.models.gpt import (
        IGNORE_INDEX,
        ShapedLossGPTModel,
        build_model,
        to_transformer_config,
    )
    from megatron_ext.models.norm import RMSNorm
    from megatron_ext.models.output import ShapedLossOutputProcessor
    from megatron_ext.models.spec import (
        TransformerEngineUnavailableError,
        decoder_block_spec,
        have_transformer_engine,
        layer_spec,
    )

_EXPORTS = {
    "IGNORE_INDEX": "gpt",
    "MODEL_PRESETS": "config",
    "QWEN3_VOCAB_SIZE": "config",
    "ModelConfig": "config",
    "RMSNorm": "norm",
    "ShapedLossGPTModel": "gpt",
    "ShapedLossOutputProcessor": "output",
    "TransformerEngineUnavailableError": "spec",
    "build_model": "gpt",
    "decoder_block_spec": "spec",
    "have_transformer_engine": "spec",
    "layer_spec": "spec",
    "model_preset": "config",
    "to_transformer_config": "gpt",
}

__all__ = [
    "IGNORE_INDEX",
    "MODEL_PRESETS",
    "QWEN3_VOCAB_SIZE",
    "ModelConfig",
    "RMSNorm",
    "ShapedLossGPTModel",
    "ShapedLossOutputProcessor",
    "TransformerEngineUnavailableError",
    "build_model",
    "decoder_block_spec",
    "have_transformer_engine",
    "layer_spec",
    "model_preset",
    "to_transformer_config",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
