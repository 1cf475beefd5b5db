"""Qwen3-style presets, megatron-core config conversion and specs, and the shaped-loss GPT model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_ext.models import (
    MODEL_PRESETS,
    ModelConfig,
    TransformerEngineUnavailableError,
    have_transformer_engine,
    layer_spec,
    model_preset,
    to_transformer_config,
)
from tests import _workers_models as w

# name: (total parameters, active parameters) the name promises, in billions.
NAMED_SIZES = {
    "dense_1b": (1.0, 1.0),
    "dense_4b": (4.0, 4.0),
    "moe_5b_a0.3b": (5.0, 0.3),
    "moe_10b_a0.5b": (10.0, 0.5),
    "moe_20b_a1b": (20.0, 1.0),
}


@pytest.mark.parametrize("name", sorted(NAMED_SIZES))
def test_preset_parameter_counts_match_their_names(name):
    cfg = model_preset(name)
    total, active = NAMED_SIZES[name]
    # Within 10% of the name (names round: the 1B model has 1.09B, embeddings included).
    assert cfg.num_parameters() / 1e9 == pytest.approx(total, rel=0.10)
    assert cfg.num_active_parameters() / 1e9 == pytest.approx(active, rel=0.10)
    assert cfg.is_moe == (total != active)


def test_qwen3_4b_count_matches_the_published_model():
    # Qwen3-4B (tied embeddings): 4,022,468,096 parameters.
    assert model_preset("dense_4b").num_parameters() == 4_022_468_096


def test_parameter_count_matches_a_built_model(pool2):
    """The analytic count equals the parameters of the megatron model (TP=1, tiny presets)."""
    counts = pool2.run(_count_built_parameters, "tiny_moe")
    assert counts[0]["built"] == counts[0]["analytic"]


def test_dense_layers_of_an_moe_model_are_built_dense(pool2):
    """moe_dense_layers and moe_router_pre_softmax reach the built model: layer 1 has a dense
    MLP of ffn_hidden_size, layer 0 experts with a pre-softmax router."""
    r = pool2.run(
        _count_built_parameters, "tiny_moe", moe_dense_layers=[1], moe_router_pre_softmax=True
    )[0]
    assert r["built"] == r["analytic"] < pool2.run(_count_built_parameters, "tiny_moe")[0]["built"]
    assert r["mlps"] == ["MoELayer", "MLP"] and r["pre_softmax"] == [True]
    assert r["moe_layer_freq"] == [1, 0]


def _count_built_parameters(name: str, **overrides) -> dict:
    from megatron_ext.models import build_model

    cfg = model_preset(name, **overrides)
    with w._parallel():
        model = build_model(cfg, to_transformer_config(cfg))
        return {
            "built": sum(p.numel() for p in model.parameters()),
            "analytic": cfg.num_parameters(),
            "mlps": [type(layer.mlp).__name__ for layer in model.decoder.layers],
            "pre_softmax": [
                layer.mlp.router.config.moe_router_pre_softmax
                for layer in model.decoder.layers
                if hasattr(layer.mlp, "router")
            ],
            "moe_layer_freq": model.config.moe_layer_freq,
        }


def test_every_preset_is_qwen3_shaped():
    for name, factory in MODEL_PRESETS.items():
        cfg = factory()
        assert cfg.name == name
        assert cfg.num_attention_heads % cfg.num_query_groups == 0
        if name.startswith(("dense", "moe")):
            assert cfg.head_dim == 128 and cfg.vocab_size == 151_936


def test_model_config_validation_names_the_values():
    base = dataclasses.asdict(model_preset("tiny"))
    with pytest.raises(
        ValueError, match="num_query_groups=3 does not divide num_attention_heads=4"
    ):
        ModelConfig(**{**base, "num_query_groups": 3})
    with pytest.raises(ValueError, match="moe_router_topk=5 exceeds num_experts=4"):
        ModelConfig(**{**base, "num_experts": 4, "moe_router_topk": 5, "moe_ffn_hidden_size": 8})
    with pytest.raises(ValueError, match="need num_experts > 0"):
        ModelConfig(**{**base, "moe_router_topk": 2})
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        model_preset("nope")
    assert model_preset("dense_4b", rope_base=1e6, seq_length=16384).rope_base == 1e6


def test_padded_vocab_size():
    cfg = model_preset("dense_4b")
    assert cfg.padded_vocab_size(1) == 151_936  # already a multiple of 128
    assert cfg.padded_vocab_size(8) == 152_576  # multiple of 128 * 8


def test_transformer_config_is_qwen3():
    cfg = model_preset("tiny_moe")
    tc = to_transformer_config(cfg, tensor_parallel=2, expert_parallel=1)
    assert tc.normalization == "RMSNorm" and tc.qk_layernorm and tc.gated_linear_unit
    assert tc.activation_func is torch.nn.functional.silu
    assert not tc.add_bias_linear and not tc.add_qkv_bias
    assert tc.num_query_groups == cfg.num_query_groups and tc.kv_channels == cfg.head_dim
    assert tc.num_moe_experts == 4 and tc.moe_router_topk == 2 and tc.moe_ffn_hidden_size == 64
    assert tc.sequence_parallel  # on by default with TP > 1 (MoE needs it)
    assert tc.calculate_per_token_loss
    assert not to_transformer_config(cfg).sequence_parallel


def test_recomputation_reaches_the_transformer_config():
    cfg = model_preset("tiny")
    none = to_transformer_config(cfg)
    assert none.recompute_granularity is None
    selective = to_transformer_config(cfg, recompute="selective")
    assert selective.recompute_granularity == "selective"
    assert selective.recompute_modules == ["core_attn"] and selective.recompute_method is None
    assert selective.recompute_num_layers is None
    full = to_transformer_config(cfg, recompute="full")
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )
    with pytest.raises(ValueError, match="recompute='partial'; choose"):
        to_transformer_config(cfg, recompute="partial")
    assert none.context_parallel_size == 1
    with pytest.raises(ValueError, match="context_parallel=2 needs the Transformer Engine spec"):
        to_transformer_config(cfg, context_parallel=2)


@pytest.mark.skipif(have_transformer_engine(), reason="Transformer Engine is installed here")
def test_transformer_engine_spec_without_te_is_a_clear_error():
    with pytest.raises(
        TransformerEngineUnavailableError, match="Transformer Engine is not installed"
    ):
        layer_spec(model_preset("tiny"), use_transformer_engine=True)


def test_local_spec_uses_our_sequence_parallel_norm():
    from megatron_ext.models import RMSNorm

    sub = layer_spec(model_preset("tiny")).submodules
    assert sub.input_layernorm is RMSNorm and sub.pre_mlp_layernorm is RMSNorm
    assert sub.self_attention.submodules.q_layernorm is RMSNorm
    assert sub.self_attention.submodules.k_layernorm is RMSNorm


@pytest.mark.parametrize(
    "model_name,shaping",
    [("tiny", "ce"), ("tiny", "tail_suppression"), ("tiny_moe", "precision")],
)
def test_model_loss_equals_standalone_loss_on_its_logits(pool2, model_name, shaping):
    """TP=2: the model's per-token loss is the shaped loss of its own vocab-parallel logits.

    Same fp32 ops on the same logits, so the match is exact up to summation order (< 1e-6).
    """
    results = pool2.run(w.model_loss_vs_standalone, model_name, shaping, 2)
    for r in results:
        assert r["loss_shape"] == (2, 64)
        assert r["logits_shape"] == (2, 64, 128)  # V/tp: logits are never gathered
        assert r["stats_shape"] == (2, 64)
        assert r["max_loss_diff"] < 1e-6
        assert r["max_entropy_diff"] < 1e-6
        assert r["ignored_loss"] == 0.0


def test_norms_are_marked_for_sequence_parallel_grad_reduction(pool2):
    r = pool2.run(w.norm_marks, "tiny_moe", 2)[0]
    assert r["sequence_parallel"] and r["all_rmsnorm"], r
    # 2 layers x (input, pre-mlp, q, k) + final norm; router weights are marked by megatron.
    assert r["num_norms"] == 9
    assert sum("norm" in n for n in r["marked"]) == 9
    assert any("router" in n for n in r["marked"])


def test_moe_dense_layers_and_weight_shape_fields():
    moe = model_preset("tiny_moe")
    read = ModelConfig.from_dict(moe.to_dict() | {"moe_dense_layers": [1]})  # JSON: a list
    assert read.moe_dense_layers == (1,) and read.moe_layer_pattern == [1, 0]
    assert [read.is_moe_layer(i) for i in range(2)] == [True, False]
    assert ModelConfig.from_dict(read.to_dict()) == read
    for dense, match in (
        ([0, 1], r"names every layer: a dense model has num_experts=0"),
        ([2], r"must be increasing layer indices in \[0, num_layers=2\)"),
        ([1, 0], r"must be increasing layer indices"),
    ):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(moe, moe_dense_layers=dense)
    with pytest.raises(ValueError, match=r"moe_dense_layers=\[0\] needs num_experts > 0"):
        model_preset("tiny", moe_dense_layers=(0,))
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['hidden'\]"):
        ModelConfig.from_dict(moe.to_dict() | {"hidden": 3})
    shapes = ModelConfig.weight_shape_fields()
    assert {"vocab_size", "make_vocab_size_divisible_by", "moe_dense_layers"} <= set(shapes)
    assert not {"seq_length", "rope_base", "moe_aux_loss_coeff", "moe_router_pre_softmax"} & set(
        shapes
    )
