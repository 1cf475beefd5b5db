"""Read a model's description (`models.ModelConfig`) off a megatron-core config or model.

The exporter handles one family: Qwen3-style decoders (RMSNorm, SwiGLU, RoPE, grouped-query
attention with QK RMSNorm, no linear biases), dense (`Qwen3ForCausalLM`) or with top-k softmax MoE
layers and no shared experts (`Qwen3MoeForCausalLM`). `arch_from_megatron_config` refuses every
megatron-core option that would make the Hugging Face model compute something else, naming it, so
a Megatron-LM checkpoint of another architecture is not exported as a wrong Qwen3.

Importing this module needs only the standard library (torch is imported where a megatron
config is read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from megatron_ext.models.config import ModelConfig

__all__ = [
    "UnsupportedArchitectureError",
    "arch_from_gpt_model",
    "arch_from_megatron_config",
    "check_exportable",
    "moe_layer_pattern",
]


class UnsupportedArchitectureError(ValueError):
    """The model uses a feature that the exported Hugging Face architecture cannot express."""


def moe_layer_pattern(moe_layer_freq: int | list[int], num_layers: int) -> tuple[bool, ...]:
    """megatron-core's reading of moe_layer_freq (gpt_layer_specs.get_gpt_decoder_block_spec).

    An int k makes layers 0, k, 2k, ... MoE layers; a list gives one 0/1 flag per layer.
    """
    if isinstance(moe_layer_freq, bool):
        raise TypeError(f"moe_layer_freq must be an int or a list, got {moe_layer_freq!r}")
    if isinstance(moe_layer_freq, int):
        if moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {moe_layer_freq!r}")
        return tuple(i % moe_layer_freq == 0 for i in range(num_layers))
    pattern = tuple(bool(x) for x in moe_layer_freq)
    if len(pattern) != num_layers:
        raise ValueError(
            f"moe_layer_freq has {len(pattern)} entries, expected num_layers={num_layers}: "
            f"{moe_layer_freq!r}"
        )
    return pattern


# Options of TransformerConfig that change what the model computes, with the value the exported
# architecture requires. getattr defaults keep this working when a field is absent in a version.
_REQUIRED_CONFIG_VALUES: tuple[tuple[str, Any, str], ...] = (
    ("normalization", "RMSNorm", "Qwen3 uses RMSNorm"),
    ("gated_linear_unit", True, "Qwen3 MLPs are SwiGLU (gate and up projections)"),
    ("add_bias_linear", False, "Qwen3 linear layers have no bias"),
    ("add_qkv_bias", False, "Qwen3 attention projections have no bias"),
    ("qk_layernorm", True, "Qwen3 normalises queries and keys per head (q_norm, k_norm)"),
    ("qk_l2_norm", False, "Qwen3 uses RMSNorm, not L2 norm, on queries and keys"),
    ("layernorm_zero_centered_gamma", False, "HF RMSNorm multiplies by the weight itself"),
    ("rotary_interleaved", False, "HF applies RoPE to rotated halves, not interleaved pairs"),
    ("multi_latent_attention", False, "multi-latent attention is a different architecture"),
    ("attention_output_gate", False, "gated attention output is a different architecture"),
    ("experimental_attention_variant", None, "only standard softmax attention is exported"),
    ("window_size", None, "Qwen3 export assumes full causal attention in every layer"),
    ("no_rope_freq", None, "every layer must apply RoPE"),
    ("mtp_num_layers", None, "multi-token-prediction heads have no HF counterpart here"),
)
_REQUIRED_MOE_CONFIG_VALUES: tuple[tuple[str, Any, str], ...] = (
    ("moe_router_score_function", "softmax", "Qwen3-MoE routes by softmax over experts"),
    ("moe_router_topk_scaling_factor", None, "Qwen3-MoE does not scale routing weights"),
    ("moe_router_enable_expert_bias", False, "Qwen3-MoE routing has no expert bias"),
    ("moe_shared_expert_intermediate_size", None, "Qwen3-MoE has no shared experts"),
    ("moe_router_group_topk", None, "Qwen3-MoE has no group-limited routing"),
    ("moe_apply_probs_on_input", False, "Qwen3-MoE weights expert outputs, not inputs"),
)


def _check_config_values(config: Any, table: tuple[tuple[str, Any, str], ...]) -> None:
    for name, required, reason in table:
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        if value != required and not (required in (None, False) and not value):
            raise UnsupportedArchitectureError(
                f"cannot export a model with {name}={value!r} (need {required!r}: {reason})"
            )


def arch_from_megatron_config(
    config: Any,
    *,
    vocab_size: int,
    max_position_embeddings: int,
    rope_theta: float,
    tie_word_embeddings: bool,
    position_embedding_type: str = "rope",
    rotary_percent: float = 1.0,
    name: str = "megatron",
) -> ModelConfig:
    """The ModelConfig of a megatron-core TransformerConfig plus the GPTModel arguments.

    Args:
        config: the model's `TransformerConfig` (or an object with the same fields).
        vocab_size: real vocabulary size (the tokenizer's); the GPTModel's embedding rows beyond
            it are padding.
        max_position_embeddings: the GPTModel's max_sequence_length (ModelConfig.seq_length).
        rope_theta: the GPTModel's rotary_base (ModelConfig.rope_base).
        tie_word_embeddings: the GPTModel's share_embeddings_and_output_weights.
        position_embedding_type: the GPTModel's position_embedding_type; must be "rope".
        rotary_percent: the GPTModel's rotary_percent; must be 1.0.
        name: ModelConfig.name.

    Raises:
        UnsupportedArchitectureError: the model uses a feature the export cannot express.
    """
    if position_embedding_type != "rope":
        raise UnsupportedArchitectureError(
            f"cannot export position_embedding_type={position_embedding_type!r} (need 'rope')"
        )
    if rotary_percent != 1.0:
        raise UnsupportedArchitectureError(
            f"cannot export rotary_percent={rotary_percent!r} (Qwen3 rotates the full head, 1.0)"
        )
    import torch

    activation = getattr(config, "activation_func", torch.nn.functional.silu)
    if activation is not torch.nn.functional.silu:
        raise UnsupportedArchitectureError(
            f"cannot export activation_func={activation!r} (need torch.nn.functional.silu: SwiGLU)"
        )
    _check_config_values(config, _REQUIRED_CONFIG_VALUES)
    head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
    softmax_scale = getattr(config, "softmax_scale", None)
    if softmax_scale is not None and abs(softmax_scale - head_dim**-0.5) > 1e-12:
        raise UnsupportedArchitectureError(
            f"cannot export softmax_scale={softmax_scale!r} (HF Qwen3 uses head_dim**-0.5 = "
            f"{head_dim**-0.5!r})"
        )
    num_experts = getattr(config, "num_moe_experts", None) or 0
    moe: dict[str, Any] = {}
    if num_experts:
        _check_config_values(config, _REQUIRED_MOE_CONFIG_VALUES)
        pattern = moe_layer_pattern(config.moe_layer_freq, config.num_layers)
        coeff = getattr(config, "moe_aux_loss_coeff", 0.0)
        if isinstance(coeff, (list, tuple)):  # one weight per pipeline stage's layers: the first
            coeff = coeff[0] if coeff else 0.0
        moe = {
            "num_experts": num_experts,
            "moe_router_topk": config.moe_router_topk,
            "moe_ffn_hidden_size": config.moe_ffn_hidden_size or config.ffn_hidden_size,
            "moe_router_pre_softmax": bool(config.moe_router_pre_softmax),
            "moe_dense_layers": tuple(i for i, sparse in enumerate(pattern) if not sparse),
            "moe_aux_loss_coeff": float(coeff),
        }
    return ModelConfig(
        name=name,
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=head_dim,
        ffn_hidden_size=config.ffn_hidden_size,
        seq_length=max_position_embeddings,
        rope_base=float(rope_theta),
        rms_eps=float(config.layernorm_epsilon),
        init_std=float(config.init_method_std),
        tie_embeddings=bool(tie_word_embeddings),
        **moe,
    )


def arch_from_gpt_model(model: torch.nn.Module, *, vocab_size: int) -> ModelConfig:
    """The ModelConfig of a built megatron-core GPTModel (any TP/PP rank of it).

    Its padded vocabulary (embedding rows) is `model.vocab_size`, which the export reads off the
    embedding's shape.

    Args:
        model: the GPTModel (unwrapped from DDP / Float16Module).
        vocab_size: real vocabulary size; model.vocab_size is the padded one.
    """
    if getattr(model, "rotary_scaling", False):
        raise UnsupportedArchitectureError("cannot export a model built with rope_scaling=True")
    return arch_from_megatron_config(
        model.config,
        vocab_size=vocab_size,
        max_position_embeddings=model.max_sequence_length,
        rope_theta=model.rotary_base,
        tie_word_embeddings=model.share_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
    )


def check_exportable(model: ModelConfig) -> None:
    """Refuse a ModelConfig whose megatron model (models.to_transformer_config) the Hugging Face
    architecture cannot compute, e.g. one with a shared expert: the checks of
    `arch_from_megatron_config` on exactly the TransformerConfig the trainer builds.

    Raises:
        UnsupportedArchitectureError: naming the option.
    """
    from megatron_ext.models.gpt import to_transformer_config

    arch_from_megatron_config(
        to_transformer_config(model),
        vocab_size=model.vocab_size,
        max_position_embeddings=model.seq_length,
        rope_theta=model.rope_base,
        tie_word_embeddings=model.tie_embeddings,
    )
