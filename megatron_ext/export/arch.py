"""What the exporter needs to know about a model (`ExportArch`) and how to read it off megatron.

The exporter handles one family: Qwen3-style decoders (RMSNorm, SwiGLU, RoPE, grouped-query
attention with QK RMSNorm, no linear biases), dense (`Qwen3ForCausalLM`) or with top-k softmax MoE
layers and no shared experts (`Qwen3MoeForCausalLM`). `arch_from_megatron_config` refuses every
megatron-core option that would make the Hugging Face model compute something else, naming it.

Importing this module needs only the standard library (torch is imported where a megatron
config is read), so the command line can check an --arch file before loading torch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "ExportArch",
    "UnsupportedArchitectureError",
    "arch_from_gpt_model",
    "arch_from_megatron_config",
    "moe_layer_pattern",
]


class UnsupportedArchitectureError(ValueError):
    """The model uses a feature that the exported Hugging Face architecture cannot express."""


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}.{name} must be >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportArch:
    """Shape and hyper-parameters of a Qwen3-style megatron GPT model, as the export needs them."""

    hidden_size: int
    """Model width (megatron hidden_size, HF hidden_size)."""
    num_layers: int
    """Number of decoder layers (HF num_hidden_layers)."""
    num_attention_heads: int
    """Number of query heads."""
    num_query_groups: int
    """Number of key/value heads (megatron num_query_groups, HF num_key_value_heads)."""
    head_dim: int
    """Size of one attention head (megatron kv_channels, HF head_dim)."""
    ffn_hidden_size: int
    """Intermediate size of the dense SwiGLU MLPs (HF intermediate_size)."""
    vocab_size: int
    """Real vocabulary size; HF vocab_size. Rows beyond it are megatron padding and are dropped."""
    padded_vocab_size: int
    """Rows of megatron's embedding and output layer (vocab_size rounded up for TP)."""
    max_position_embeddings: int
    """Longest sequence the model was built for (megatron max_sequence_length)."""
    rope_theta: float
    """RoPE base (megatron rotary_base)."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm (megatron layernorm_epsilon)."""
    tie_word_embeddings: bool
    """Whether the output layer reuses the input embedding (no output_layer.weight in megatron)."""
    num_experts: int = 0
    """Routed experts per MoE layer; 0 for a dense model."""
    moe_router_topk: int = 0
    """Experts each token is routed to (HF num_experts_per_tok)."""
    moe_ffn_hidden_size: int = 0
    """Intermediate size of one expert (HF moe_intermediate_size)."""
    norm_topk_prob: bool = True
    """Whether the top-k routing weights are renormalised to sum 1 (megatron: not pre-softmax)."""
    moe_layers: tuple[bool, ...] | None = None
    """Per layer, whether it is an MoE layer; None means every layer when num_experts > 0."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_query_groups",
            "head_dim",
            "ffn_hidden_size",
            "vocab_size",
            "padded_vocab_size",
            "max_position_embeddings",
        ):
            _check_positive_int(owner, name, getattr(self, name))
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"{owner}.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"{owner}.padded_vocab_size={self.padded_vocab_size} is smaller than "
                f"vocab_size={self.vocab_size}"
            )
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{owner}.{name} must be a positive float, got {value!r}")
        if self.num_experts:
            _check_positive_int(owner, "num_experts", self.num_experts)
            _check_positive_int(owner, "moe_router_topk", self.moe_router_topk)
            _check_positive_int(owner, "moe_ffn_hidden_size", self.moe_ffn_hidden_size)
            if self.moe_router_topk > self.num_experts:
                raise ValueError(
                    f"{owner}.moe_router_topk={self.moe_router_topk} exceeds "
                    f"num_experts={self.num_experts}"
                )
            if self.moe_layers is not None:
                if len(self.moe_layers) != self.num_layers:
                    raise ValueError(
                        f"{owner}.moe_layers has {len(self.moe_layers)} entries, expected "
                        f"num_layers={self.num_layers}: {self.moe_layers!r}"
                    )
                if not any(self.moe_layers):
                    raise ValueError(f"{owner}.moe_layers has no MoE layer: {self.moe_layers!r}")
        elif self.moe_layers is not None and any(self.moe_layers):
            raise ValueError(f"{owner}.moe_layers={self.moe_layers!r} but num_experts=0")

    @property
    def is_moe(self) -> bool:
        """Whether the model has MoE layers (exported as Qwen3MoeForCausalLM)."""
        return self.num_experts > 0

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_attention_heads // self.num_query_groups

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based) is an MoE layer."""
        if not self.is_moe:
            return False
        return True if self.moe_layers is None else bool(self.moe_layers[layer])

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields; `from_dict` reads them back."""
        out = dataclasses.asdict(self)
        if out["moe_layers"] is not None:
            out["moe_layers"] = list(out["moe_layers"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportArch:
        """An ExportArch from `to_dict` fields (e.g. read from JSON); unknown fields are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
        data = dict(data)
        if data.get("moe_layers") is not None:
            data["moe_layers"] = tuple(bool(x) for x in data["moe_layers"])
        return cls(**data)


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
    padded_vocab_size: int,
    max_position_embeddings: int,
    rope_theta: float,
    tie_word_embeddings: bool,
    position_embedding_type: str = "rope",
    rotary_percent: float = 1.0,
) -> ExportArch:
    """Read an ExportArch off a megatron-core TransformerConfig plus the GPTModel arguments.

    Args:
        config: the model's `TransformerConfig` (or an object with the same fields).
        vocab_size: real vocabulary size (the tokenizer's); rows beyond it are padding.
        padded_vocab_size: the `vocab_size` the GPTModel was built with.
        max_position_embeddings: the GPTModel's max_sequence_length.
        rope_theta: the GPTModel's rotary_base.
        tie_word_embeddings: the GPTModel's share_embeddings_and_output_weights.
        position_embedding_type: the GPTModel's position_embedding_type; must be "rope".
        rotary_percent: the GPTModel's rotary_percent; must be 1.0.

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
        moe = {
            "num_experts": num_experts,
            "moe_router_topk": config.moe_router_topk,
            "moe_ffn_hidden_size": config.moe_ffn_hidden_size or config.ffn_hidden_size,
            "norm_topk_prob": not config.moe_router_pre_softmax,
            "moe_layers": moe_layer_pattern(config.moe_layer_freq, config.num_layers),
        }
    return ExportArch(
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=head_dim,
        ffn_hidden_size=config.ffn_hidden_size,
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab_size,
        max_position_embeddings=max_position_embeddings,
        rope_theta=float(rope_theta),
        rms_norm_eps=float(config.layernorm_epsilon),
        tie_word_embeddings=bool(tie_word_embeddings),
        **moe,
    )


def arch_from_gpt_model(model: torch.nn.Module, *, vocab_size: int) -> ExportArch:
    """Read an ExportArch off a built megatron-core GPTModel (any TP/PP rank of it).

    Args:
        model: the GPTModel (unwrapped from DDP / Float16Module).
        vocab_size: real vocabulary size; model.vocab_size is the padded one.
    """
    if getattr(model, "rotary_scaling", False):
        raise UnsupportedArchitectureError("cannot export a model built with rope_scaling=True")
    return arch_from_megatron_config(
        model.config,
        vocab_size=vocab_size,
        padded_vocab_size=model.vocab_size,
        max_position_embeddings=model.max_sequence_length,
        rope_theta=model.rotary_base,
        tie_word_embeddings=model.share_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
    )
