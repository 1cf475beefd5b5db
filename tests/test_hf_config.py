"""models.ModelConfig <-> transformers' Qwen3Config / Qwen3MoeConfig (export.hf_config).

The two functions are checked to be each other's inverse in both directions, through the
config.json the exporter writes and transformers' own AutoConfig reading it back; the layer kinds
of a model that transformers builds from the config are the reference for the MoE layer pattern.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_ext.export import UnsupportedArchitectureError, from_hf_config, to_hf_config
from megatron_ext.export.hf_config import hf_config_json
from megatron_ext.models import ModelConfig, model_preset

DENSE = model_preset(
    "tiny", rope_base=5e5, init_std=0.03, rms_eps=1e-5, seq_length=128, tie_embeddings=True
)
MOE = dataclasses.replace(
    model_preset("tiny_moe", num_layers=3, moe_aux_loss_coeff=0.01),
    moe_dense_layers=(1,),
    moe_router_pre_softmax=True,
)


def _back(config, model: ModelConfig) -> ModelConfig:
    return from_hf_config(
        config, name=model.name, make_vocab_size_divisible_by=model.make_vocab_size_divisible_by
    )


@pytest.mark.parametrize("model", [DENSE, MOE], ids=["dense", "moe"])
def test_model_config_survives_the_hf_config_and_its_json(model, tmp_path):
    from transformers import AutoConfig

    config = to_hf_config(model, dtype=torch.bfloat16, eos_token_id=0)
    assert type(config).__name__ == ("Qwen3MoeConfig" if model.is_moe else "Qwen3Config")
    assert config.initializer_range == model.init_std  # no longer a constant
    assert _back(config, model) == model

    data = hf_config_json(config)
    (tmp_path / "config.json").write_text(json.dumps(data))
    # transformers 4.x / vLLM read the flat fields; transformers 5 its own.
    assert data["rope_theta"] == model.rope_base and data["rope_scaling"] is None
    assert data["torch_dtype"] == data["dtype"] == "bfloat16"
    assert data["architectures"] == ["Qwen3MoeForCausalLM" if model.is_moe else "Qwen3ForCausalLM"]
    read = AutoConfig.from_pretrained(tmp_path)
    assert _back(read, model) == model
    if model.is_moe:
        assert data["num_experts"] == 4 and data["router_aux_loss_coef"] == 0.01
        assert data["mlp_only_layers"] == [1] and data["norm_topk_prob"] is False


def test_hf_config_survives_the_model_config():
    """A published-style Qwen3-MoE config (experts every second layer by decoder_sparse_step)
    describes the same model after the round trip: same layers, same fields."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=301, hidden_size=32,
        intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=1e6,
        sliding_window=None, max_window_layers=4, router_aux_loss_coef=0.002,
        tie_word_embeddings=False, eos_token_id=0,
    )  # fmt: skip
    model = from_hf_config(config)
    assert model.moe_dense_layers == (0, 2) and model.moe_aux_loss_coeff == 0.002
    again = to_hf_config(model, eos_token_id=0)
    assert again.mlp_only_layers == [0, 2] and again.decoder_sparse_step == 1
    keep = {"decoder_sparse_step", "mlp_only_layers", "transformers_version"}
    a, b = config.to_diff_dict(), again.to_diff_dict()
    assert {k: v for k, v in a.items() if k not in keep} == {
        k: v for k, v in b.items() if k not in keep
    }

    def kinds(c):  # the layers transformers builds
        built = AutoModelForCausalLM.from_config(c)
        return [type(layer.mlp).__name__ for layer in built.model.layers]

    dense, sparse = "Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"
    assert kinds(config) == kinds(again) == [dense, sparse, dense, sparse]
    assert [model.is_moe_layer(i) for i in range(4)] == [False, True, False, True]


def test_what_either_side_cannot_express_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="moe_shared_expert_ffn_hidden_size=32"):
        to_hf_config(dataclasses.replace(MOE, moe_shared_expert_ffn_hidden_size=32))
    from transformers import LlamaConfig, Qwen3Config

    with pytest.raises(UnsupportedArchitectureError, match='model_type="llama"'):
        from_hf_config(LlamaConfig())
    yarn = Qwen3Config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    with pytest.raises(UnsupportedArchitectureError, match=r"rope_scaling=.*'yarn'"):
        from_hf_config(yarn)
    with pytest.raises(ValueError, match="unsupported export dtype"):
        to_hf_config(DENSE, dtype=torch.int8)
