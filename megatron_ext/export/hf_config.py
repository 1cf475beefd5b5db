"""models.ModelConfig <-> transformers' Qwen3Config / Qwen3MoeConfig: the one translation.

`to_hf_config(model)` builds the transformers config object of the Hugging Face model that
computes what megatron_ext's model computes (the exporter writes it, `hf_config_json`);
`from_hf_config(config)` reads one back (the importer), refusing, with the field, its value and
the fix, every option megatron_ext's model does not compute. The two are each other's inverse:
`from_hf_config(to_hf_config(m), name=m.name, make_vocab_size_divisible_by=...) == m`, and
`to_hf_config(from_hf_config(c))` describes the same model as `c`.

Field names: intermediate_size = ffn_hidden_size, num_hidden_layers = num_layers,
num_key_value_heads = num_query_groups, max_position_embeddings = seq_length, rope_theta =
rope_base, rms_norm_eps = rms_eps, initializer_range = init_std, tie_word_embeddings =
tie_embeddings; MoE: num_experts_per_tok = moe_router_topk, moe_intermediate_size =
moe_ffn_hidden_size, norm_topk_prob = not moe_router_pre_softmax, mlp_only_layers =
moe_dense_layers, router_aux_loss_coef = moe_aux_loss_coeff. The padded vocabulary
(make_vocab_size_divisible_by) has no Hugging Face counterpart: the export drops the padding rows.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from megatron_ext.export.arch import UnsupportedArchitectureError
from megatron_ext.models.config import ModelConfig

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

__all__ = ["HF_ARCHITECTURES", "from_hf_config", "hf_config_json", "to_hf_config"]

HF_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
"""config.json model_type -> the architecture (model class) of megatron_ext's model."""

_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unsupported export dtype {dtype}; choose one of {list(_DTYPE_NAMES)}")
    return name


def to_hf_config(
    model: ModelConfig,
    *,
    dtype: torch.dtype | str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> PretrainedConfig:
    """The transformers Qwen3Config (dense) or Qwen3MoeConfig (MoE) of `model`.

    Args:
        model: the model.
        dtype: the dtype of the weights written (config.json's dtype / torch_dtype).
        bos_token_id: the special token ids (also those of generation_config.json).
        eos_token_id: idem; an int or a list of ints.
        pad_token_id: idem.

    Raises:
        UnsupportedArchitectureError: the model has a shared expert (Qwen3-MoE has none).
        ValueError: an unsupported dtype.
    """
    if model.moe_shared_expert_ffn_hidden_size:
        raise UnsupportedArchitectureError(
            f"cannot export moe_shared_expert_ffn_hidden_size="
            f"{model.moe_shared_expert_ffn_hidden_size} (Qwen3-MoE has no shared experts; need 0)"
        )
    fields: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES["qwen3_moe" if model.is_moe else "qwen3"]],
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.seq_length,
        "initializer_range": model.init_std,
        "rms_norm_eps": model.rms_eps,
        # transformers 4.x keeps rope_theta, 5.x turns it into rope_parameters (default RoPE).
        "rope_theta": float(model.rope_base),
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": model.num_layers,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": _dtype_name(dtype),
    }
    if not model.is_moe:
        from transformers import Qwen3Config

        return Qwen3Config(**fields)
    from transformers import Qwen3MoeConfig

    # HF: layer i has experts iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    return Qwen3MoeConfig(
        **fields,
        num_experts=model.num_experts,
        num_experts_per_tok=model.moe_router_topk,
        moe_intermediate_size=model.moe_ffn_hidden_size,
        norm_topk_prob=not model.moe_router_pre_softmax,
        decoder_sparse_step=1,
        mlp_only_layers=list(model.moe_dense_layers),
        router_aux_loss_coef=model.moe_aux_loss_coeff,
        output_router_logits=False,
    )


def hf_config_json(config: PretrainedConfig) -> dict[str, Any]:
    """config.json's content: what `config.save_pretrained` writes (`to_diff_dict`), plus the
    flat fields that transformers 4.x and vLLM read where transformers 5 writes others:
    rope_theta and rope_scaling (5.x: rope_parameters), torch_dtype (5.x: dtype) and, for MoE,
    num_experts (5.x: num_local_experts). transformers 5 reads them back without warnings."""
    out = config.to_diff_dict()
    rope = dict(getattr(config, "rope_parameters", None) or {})
    out["rope_theta"] = rope.get("rope_theta", getattr(config, "rope_theta", None))
    out["rope_scaling"] = None
    dtype = out.get("dtype", out.get("torch_dtype"))
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    if getattr(config, "model_type", None) == "qwen3_moe":
        out["num_experts"] = config.num_experts
    return out


# config.json fields whose value must be the one given (else: what the megatron model does).
_REQUIRED_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("hidden_act", "silu", "megatron_ext's MLPs are SwiGLU (silu); only hidden_act='silu'"),
    ("attention_bias", False, "megatron_ext's Qwen3 attention has no biases on q/k/v/o"),
    ("use_sliding_window", False, ("megatron_ext's model attends to the whole causal context "
     "in every layer; sliding-window attention cannot be imported")),
)  # fmt: skip


def _check_options(config: Any, where: str) -> None:
    for name, required, reason in _REQUIRED_OPTIONS:
        value = getattr(config, name, required)
        if value != required:
            raise UnsupportedArchitectureError(
                f"{where} has {name}={json.dumps(value)}: {reason} (need {name}="
                f"{json.dumps(required)})"
            )
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise UnsupportedArchitectureError(
            f"{where} has layer_types with {other}: megatron_ext's model uses full attention in "
            "every layer (need every layer_types entry 'full_attention')"
        )
    rope = dict(
        getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    )
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        raise UnsupportedArchitectureError(
            f"{where} has rope_scaling={json.dumps(scaling)} (rope_type "
            f"{rope.get('rope_type', rope.get('type'))!r}); megatron_ext's model applies plain "
            "RoPE (rope_theta only). If the weights were trained without it (Qwen3 adds YaRN for "
            "long-context inference only), set rope_scaling to null in config.json and import "
            "again"
        )


def _moe_fields(config: Any, where: str) -> dict[str, Any]:
    if getattr(config, "shared_expert_intermediate_size", 0):
        raise UnsupportedArchitectureError(
            f"{where} has shared_expert_intermediate_size="
            f"{config.shared_expert_intermediate_size}: Qwen3-MoE has no shared expert and the "
            "importer maps none"
        )
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense_only = set(getattr(config, "mlp_only_layers", None) or [])
    dense = tuple(
        i
        for i in range(config.num_hidden_layers)
        if i in dense_only or (i + 1) % step != 0  # the HF model's rule (see to_hf_config)
    )
    return {
        "num_experts": config.num_experts,
        "moe_router_topk": config.num_experts_per_tok,
        "moe_ffn_hidden_size": config.moe_intermediate_size,
        "moe_router_pre_softmax": not bool(getattr(config, "norm_topk_prob", True)),
        "moe_dense_layers": dense,
        "moe_aux_loss_coeff": float(getattr(config, "router_aux_loss_coef", 1e-3)),
    }


def from_hf_config(
    config: PretrainedConfig,
    *,
    name: str = "hf",
    make_vocab_size_divisible_by: int = 128,
    where: str = "config.json",
) -> ModelConfig:
    """The ModelConfig of a transformers Qwen3Config / Qwen3MoeConfig (the inverse of
    to_hf_config).

    Args:
        config: the transformers config (model_type qwen3 or qwen3_moe).
        name: ModelConfig.name.
        make_vocab_size_divisible_by: the padding multiple of the megatron model's vocabulary
            (no Hugging Face counterpart).
        where: the file the config was read from, for error messages.

    Raises:
        UnsupportedArchitectureError: another model_type, or an option megatron_ext's model does
            not compute (sliding windows, rope scaling, attention biases, another activation,
            shared experts), naming the field, its value and the fix.
        ValueError: values that describe no valid model (e.g. no rope_theta).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in HF_ARCHITECTURES:
        known = ", ".join(f"{t!r} ({a})" for t, a in HF_ARCHITECTURES.items())
        raise UnsupportedArchitectureError(
            f"{where} has model_type={json.dumps(model_type)}; the importer reads {known} "
            "models only"
        )
    _check_options(config, where)
    moe = _moe_fields(config, where) if model_type == "qwen3_moe" else {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if rope_theta is None:
        raise ValueError(f"{where} gives no rope_theta")
    try:
        return ModelConfig(
            name=name,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            ffn_hidden_size=config.intermediate_size,
            rope_base=float(rope_theta),
            seq_length=config.max_position_embeddings,
            tie_embeddings=bool(config.tie_word_embeddings),
            rms_eps=float(config.rms_norm_eps),
            init_std=float(config.initializer_range),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            **moe,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} describes no valid model: {exc}") from None
