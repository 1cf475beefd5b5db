"""Hugging Face export: key map, files, errors (fast, no megatron model), and the numeric check.

The numeric tests build tiny Qwen3-style megatron GPTModels (local spec) on gloo ranks, export
them, load the directory with transformers and compare fp32 logits on the same input ids. The
tolerance 1e-4 is the brief's; both sides compute in fp32 with different kernels (megatron's
unfused softmax and fused RoPE-free layouts vs transformers' sdpa), measured differences ~1e-6.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_ext.export import (
    IncompleteCheckpointError,
    UnsupportedArchitectureError,
    arch_from_megatron_config,
    arch_from_training_checkpoint,
    convert_state_dict,
    export_checkpoint,
    export_state_dict,
    load_full_model_tensors,
    plan_keys,
)
from megatron_ext.export.from_training import resolve_training_checkpoint
from megatron_ext.export.hf_files import parse_size
from megatron_ext.export.key_map import split_qkv
from megatron_ext.models import ModelConfig
from tests._workers_export import (
    TinyGPT,
    reference_model,
    reshard_checkpoint,
    train_run,
    trained_model_reference,
)

LOGIT_TOL = 1e-4

DENSE = TinyGPT(vocab_size=300, padded_vocab_size=320)  # the tokenizer's 300 tokens
TIED = TinyGPT(tied=True)  # 250 real rows padded to 256
MOE = TinyGPT(num_experts=4, moe_router_topk=2, moe_layer_freq=(0, 1))  # dense layer 0
MOE_PRE_SOFTMAX = TinyGPT(num_experts=4, moe_router_topk=2, moe_router_pre_softmax=True)


ARCH_FIELDS = {
    "hidden_size": 8,
    "num_layers": 2,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "head_dim": 4,
    "ffn_hidden_size": 12,
    "vocab_size": 10,
    "make_vocab_size_divisible_by": 16,  # 16 rows
    "seq_length": 32,
    "rope_base": 10000.0,
    "rms_eps": 1e-6,
    "tie_embeddings": False,
}
"""A small dense architecture (ModelConfig fields)."""


def _arch(**overrides) -> ModelConfig:
    return ModelConfig(**(ARCH_FIELDS | overrides))


MOE_ARCH = {
    "num_experts": 3,
    "moe_router_topk": 2,
    "moe_ffn_hidden_size": 6,
    "moe_dense_layers": (0,),
}


def _random_state(arch: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict with every tensor the key map expects (canonical names)."""
    gen = torch.Generator().manual_seed(0)
    return {e.megatron[0]: torch.randn(e.shape, generator=gen) for e in plan_keys(arch)}


# ---------------------------------------------------------------------------------------------
# Key map and conversion (no megatron model)


def test_split_qkv_follows_query_groups():
    arch = _arch(hidden_size=1, num_attention_heads=4, num_query_groups=2, head_dim=3)
    # Rows of one group: 2 q heads, 1 k head, 1 v head, 3 rows each. Label row r with value r.
    fused = torch.arange(2 * 4 * 3, dtype=torch.float32).unsqueeze(1)  # [ng*(hpg+2)*d, 1]
    q, k, v = split_qkv(fused, arch)
    group = 4 * 3
    assert q.flatten().tolist() == [*range(6), *range(group, group + 6)]
    assert k.flatten().tolist() == [*range(6, 9), *range(group + 6, group + 9)]
    assert v.flatten().tolist() == [*range(9, 12), *range(group + 9, group + 12)]


def test_convert_names_and_shapes_moe():
    arch = _arch(**MOE_ARCH)
    state = _random_state(arch)
    hf = convert_state_dict(state, arch)
    assert hf["model.embed_tokens.weight"].shape == (10, 8)  # padding stripped
    assert torch.equal(hf["lm_head.weight"], state["output_layer.weight"][:10])
    assert hf["model.layers.0.mlp.gate_proj.weight"].shape == (12, 8)  # dense layer 0
    assert "model.layers.0.mlp.gate.weight" not in hf
    fc1 = state["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"]
    assert torch.equal(hf["model.layers.1.mlp.experts.2.gate_proj.weight"], fc1[:6])
    assert torch.equal(hf["model.layers.1.mlp.experts.2.up_proj.weight"], fc1[6:])
    assert hf["model.layers.1.mlp.gate.weight"].shape == (3, 8)
    assert hf["model.layers.1.self_attn.q_proj.weight"].shape == (16, 8)
    assert hf["model.layers.1.self_attn.k_proj.weight"].shape == (8, 8)
    # embed/norm/head, 8 attention and norm tensors per layer, dense MLP, router, 3 experts x 3
    assert len(hf) == 3 + 2 * 8 + 3 + 1 + 3 * 3


def test_te_names_and_grouped_experts_are_accepted():
    arch = _arch(**MOE_ARCH)
    state = _random_state(arch)
    renamed = {}
    for key, value in state.items():
        key = key.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
        key = key.replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_")
        for j in range(3):
            for fc in ("linear_fc1", "linear_fc2"):
                local, grouped = f"experts.local_experts.{j}.{fc}.weight", f"experts.{fc}.weight{j}"
                key = key.replace(local, grouped)
        renamed[key] = value
    renamed["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
    ref = convert_state_dict(state, arch)
    out = convert_state_dict(renamed, arch)
    assert ref.keys() == out.keys()
    assert all(torch.equal(ref[k], out[k]) for k in ref)


def test_missing_keys_are_all_named():
    arch = _arch()
    state = _random_state(arch)
    del state["decoder.layers.1.mlp.linear_fc2.weight"]
    del state["output_layer.weight"]
    with pytest.raises(IncompleteCheckpointError) as err:
        convert_state_dict(state, arch)
    assert err.value.missing == ["decoder.layers.1.mlp.linear_fc2.weight", "output_layer.weight"]
    assert "decoder.layers.1.mlp.linear_fc2.weight" in str(err.value)
    assert "2 tensors" in str(err.value)


def test_unknown_tensors_are_refused():
    arch = _arch()
    state = _random_state(arch)
    state["decoder.layers.0.mlp.shared_experts.linear_fc1.weight"] = torch.zeros(2, 8)
    with pytest.raises(UnsupportedArchitectureError, match="shared_experts"):
        convert_state_dict(state, arch)


def test_dense_description_of_moe_checkpoint_names_both_sides():
    state = _random_state(_arch(**MOE_ARCH))
    with pytest.raises(IncompleteCheckpointError) as err:
        convert_state_dict(state, _arch())
    assert "decoder.layers.1.mlp.linear_fc1.weight" in err.value.missing
    assert "decoder.layers.1.mlp.router.weight" in err.value.unexpected


def test_wrong_shape_is_named():
    arch = _arch()
    state = _random_state(arch)
    state["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.zeros(30, 8)
    with pytest.raises(ValueError, match=r"linear_qkv.weight: expected shape \[32, 8\], got"):
        convert_state_dict(state, arch)


def test_tied_embeddings():
    arch = _arch(tie_embeddings=True)
    state = _random_state(arch)
    assert "output_layer.weight" not in state
    assert "lm_head.weight" not in convert_state_dict(state, arch)
    state["output_layer.weight"] = state["embedding.word_embeddings.weight"].clone()
    convert_state_dict(state, arch)  # an identical copy is accepted
    state["output_layer.weight"] += 1
    with pytest.raises(ValueError, match="differs"):
        convert_state_dict(state, arch)


def test_arch_validation_quotes_bad_values():
    with pytest.raises(ValueError, match="num_query_groups=3 does not divide"):
        _arch(num_query_groups=3)
    with pytest.raises(ValueError, match="padded_vocab_size=8 is smaller than vocab_size=10"):
        plan_keys(_arch(), 8)
    state = _random_state(_arch())
    with pytest.raises(ValueError, match="padded_vocab_size=8 is smaller than vocab_size=10"):
        convert_state_dict(state, _arch(), padded_vocab_size=8)
    with pytest.raises(ValueError, match="moe_router_topk=4 exceeds"):
        _arch(**(MOE_ARCH | {"moe_router_topk": 4}))
    arch = _arch(**MOE_ARCH)
    assert ModelConfig.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['hidden'\]"):
        ModelConfig.from_dict(arch.to_dict() | {"hidden": 3})


def _megatron_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "kv_channels": 32,
        "ffn_hidden_size": 96,
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
        "add_bias_linear": False,
        "qk_layernorm": True,
        "layernorm_epsilon": 1e-6,
    }
    return TransformerConfig(**(fields | overrides))


def test_arch_from_megatron_config():
    moe = {
        "num_moe_experts": 4,
        "moe_router_topk": 2,
        "moe_ffn_hidden_size": 32,
        "moe_layer_freq": 2,
    }
    arch = arch_from_megatron_config(
        _megatron_config(**moe, init_method_std=0.01, moe_aux_loss_coeff=0.05),
        vocab_size=300,
        max_position_embeddings=128,
        rope_theta=1e6,
        tie_word_embeddings=False,
    )
    assert isinstance(arch, ModelConfig)
    assert arch.head_dim == 32 and arch.num_query_groups == 2 and arch.rms_eps == 1e-6
    assert arch.moe_dense_layers == (1,) and arch.moe_router_pre_softmax is False
    assert (arch.seq_length, arch.rope_base, arch.init_std) == (128, 1e6, 0.01)
    assert arch.moe_aux_loss_coeff == 0.05 and arch.moe_layer_pattern == [1, 0]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"add_bias_linear": True}, "add_bias_linear=True"),
        ({"qk_layernorm": False}, "qk_layernorm=False"),
        ({"normalization": "LayerNorm"}, "normalization='LayerNorm'"),
        ({"gated_linear_unit": False}, "activation_func|gated_linear_unit"),
        (
            {"num_moe_experts": 4, "moe_router_topk": 2, "moe_shared_expert_intermediate_size": 32},
            "moe_shared_expert_intermediate_size",
        ),
        (
            {"num_moe_experts": 4, "moe_router_topk": 2, "moe_router_score_function": "sigmoid"},
            "moe_router_score_function='sigmoid'",
        ),
    ],
)
def test_unsupported_megatron_configs_are_refused(overrides, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        arch_from_megatron_config(
            _megatron_config(**overrides),
            vocab_size=300,
            max_position_embeddings=128,
            rope_theta=1e6,
            tie_word_embeddings=False,
        )


def test_unshard_model_keys_layouts():
    """Sharded-key layouts of megatron-core 0.19 -> TP=1 state-dict names (synthetic tensors)."""
    from megatron_ext.export.checkpoint import unshard_model_keys

    stacked_qkv = torch.randn(2, 6, 4)  # [num_layers, ...]
    stacked_experts = torch.randn(3, 8, 4)  # [num_experts, 2*ffn, h]
    gate, up = torch.randn(5, 4), torch.randn(5, 4)
    out = unshard_model_keys(
        {
            "decoder.layers.self_attention.linear_qkv.weight": stacked_qkv,
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight": torch.ones(2, 4),
            "decoder.layers.1.mlp.experts.experts.linear_fc1.weight": stacked_experts,
            "decoder.layers.0.mlp.experts.experts.2.linear_fc2.weight": torch.ones(4, 4),
            "decoder.layers.0.mlp.linear_fc1.weight_w": gate,
            "decoder.layers.0.mlp.linear_fc1.weight_v": up,
        },
        num_layers=2,
    )
    assert torch.equal(out["decoder.layers.1.self_attention.linear_qkv.weight"], stacked_qkv[1])
    assert "decoder.layers.0.input_layernorm.weight" in out
    e1 = "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"
    assert torch.equal(out[e1], stacked_experts[1])
    assert "decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight" in out
    assert torch.equal(out["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate, up]))
    assert len(out) == 2 + 2 + 3 + 1 + 1
    with pytest.raises(ValueError, match="num_layers=3"):
        unshard_model_keys({"decoder.layers.final.weight": torch.ones(2, 4)}, num_layers=3)


# ---------------------------------------------------------------------------------------------
# Files


def test_files_config_and_shards(tmp_path):
    from transformers import AutoConfig

    arch = _arch(**MOE_ARCH, head_dim=6, tie_embeddings=True)  # head_dim != hidden / heads
    state = _random_state(arch)
    out = export_state_dict(
        state,
        arch,
        tmp_path / "hf",
        max_shard_size=2000,
        eos_token_id=3,
        bos_token_id=2,
        progress=False,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards == sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    written, total = {}, 0
    for name in shards:
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                written[key] = f.get_tensor(key)
                total += written[key].numel() * written[key].element_size()
                assert index["weight_map"][key] == name
    expected = convert_state_dict(state, arch)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert index["metadata"]["total_size"] == total

    config = AutoConfig.from_pretrained(out)
    assert type(config).__name__ == "Qwen3MoeConfig"
    assert (config.vocab_size, config.head_dim, config.num_key_value_heads) == (10, 6, 2)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (
        3,
        2,
        6,
    )
    assert config.mlp_only_layers == [0] and config.decoder_sparse_step == 1
    assert config.norm_topk_prob is True and config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.rms_norm_eps == 1e-6
    assert config.max_position_embeddings == 32
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (2, 3)
    assert "pad_token_id" not in generation


def test_failed_export_leaves_no_output(tmp_path):
    arch = _arch()
    state = _random_state(arch)
    state["decoder.final_layernorm.weight"] = torch.zeros(7)  # found after shards were written
    with pytest.raises(ValueError, match="final_layernorm"):
        export_state_dict(state, arch, tmp_path / "hf", max_shard_size=500, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    arch = _arch()
    state = _random_state(arch)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        export_state_dict(state, arch, tmp_path / "hf", progress=False)
    assert (tmp_path / "hf" / "old.txt").exists()
    export_state_dict(state, arch, tmp_path / "hf", overwrite=True, progress=False)
    assert not (tmp_path / "hf" / "old.txt").exists()
    assert (tmp_path / "hf" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directories left


def _assert_default_modes(directory: Path) -> None:
    """`directory` and everything in it have the modes the umask gives new files and folders."""
    mask = os.umask(0o022)
    os.umask(mask)
    paths = [directory, *directory.rglob("*")]
    modes = {str(p.relative_to(directory)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}
    expected = {
        str(p.relative_to(directory)): oct((0o777 if p.is_dir() else 0o666) & ~mask) for p in paths
    }
    assert modes == expected


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_exported_files_get_the_umask_modes(tmp_path, tokenizer_dir, umask):
    """Shards (safetensors writes 0o600 files), configs, index and tokenizer files all get the
    modes of an ordinary new file, the directory those of a new folder; also when replaced."""
    arch = _arch(vocab_size=300, make_vocab_size_divisible_by=64)  # 320 rows
    state = _random_state(arch)
    old = os.umask(umask)
    try:
        kwargs = {"tokenizer_dir": tokenizer_dir, "max_shard_size": 2000, "progress": False}
        out = export_state_dict(state, arch, tmp_path / "hf", **kwargs)
        assert len(list(out.glob("*.safetensors"))) > 1 and (out / "tokenizer.json").exists()
        _assert_default_modes(out)
        file_mode = stat.S_IMODE((out / "config.json").stat().st_mode)
        assert file_mode == 0o666 & ~umask  # e.g. 0o644 under umask 022
        export_state_dict(state, arch, tmp_path / "hf", overwrite=True, **kwargs)
        _assert_default_modes(out)
    finally:
        os.umask(old)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read a size"):
        parse_size("5 parsecs")


# ---------------------------------------------------------------------------------------------
# Numeric check against megatron (tiny models on gloo ranks)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 250, (2, 24), generator=gen)  # [b, s]


@pytest.fixture(scope="module")
def references(pool4, input_ids, tmp_path_factory):
    """spec -> reference (state, logits, arch, TP=1 dist checkpoint dir), built on demand."""
    cache: dict[TinyGPT, dict] = {}

    def get(spec: TinyGPT) -> dict:
        if spec not in cache:
            ckpt = tmp_path_factory.mktemp("megatron_ckpt")
            results = pool4.run(reference_model, spec, input_ids, str(ckpt))
            cache[spec] = results[0] | {"checkpoint": ckpt}
        return cache[spec]

    return get


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The project's byte-level BPE (megatron_ext.data), 300 tokens, trained on CPython's docs."""
    import pydoc_data.topics

    from megatron_ext.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    texts = list(pydoc_data.topics.topics.values())[:50]
    tokenizer = train_bpe_tokenizer(texts, out, vocab_size=300)
    assert len(tokenizer) == 300
    return out


def _load_hf(path: Path):
    """AutoModelForCausalLM from `path` in fp32, failing on any transformers warning."""
    from transformers import AutoModelForCausalLM

    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(
                path, output_loading_info=True, dtype=torch.float32
            )
    finally:
        logger.removeHandler(handler)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"], info
    assert [r.getMessage() for r in records] == []
    assert [str(w.message) for w in caught if "transformers" in w.filename] == []
    return model.eval()


def _max_logit_diff(model, ref: dict, input_ids: torch.Tensor, vocab_size: int) -> float:
    with torch.no_grad():
        hf_logits = model(input_ids).logits  # [b, s, v]
    megatron_logits = ref["logits"][..., :vocab_size]  # [b, s, v], padding stripped
    assert hf_logits.shape == megatron_logits.shape
    diff = (hf_logits - megatron_logits).abs().max().item()
    print(f"max |logit diff| = {diff:.3g}")
    return diff


@pytest.mark.parametrize(
    "spec", [TIED, MOE, MOE_PRE_SOFTMAX], ids=["dense-tied-250of256", "moe-top2", "moe-presoftmax"]
)
def test_export_matches_megatron_logits(references, input_ids, tmp_path, spec):
    ref = references(spec)
    out = export_state_dict(ref["state"], ref["arch"], tmp_path / "hf", progress=False)
    model = _load_hf(out)
    expected = "Qwen3MoeForCausalLM" if spec.num_experts else "Qwen3ForCausalLM"
    assert type(model).__name__ == expected
    if spec.num_experts:
        assert model.config.norm_topk_prob is (not spec.moe_router_pre_softmax)
    assert _max_logit_diff(model, ref, input_ids, spec.vocab_size) < LOGIT_TOL
    # transformers writes back exactly the tensor names we wrote (for MoE: one tensor per expert
    # and projection, though it holds them fused in memory).
    model.save_pretrained(tmp_path / "resaved")
    assert _safetensors_keys(tmp_path / "resaved") == _safetensors_keys(out)


def _safetensors_keys(directory: Path) -> set[str]:
    keys: set[str] = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    return keys


def test_export_with_tokenizer_and_generation(references, input_ids, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    ref = references(DENSE)
    out = export_state_dict(
        ref["state"], ref["arch"], tmp_path / "hf", tokenizer_dir=tokenizer_dir, progress=False
    )
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 300
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for ids in (config, generation):
        assert ids["eos_token_id"] == tokenizer.eos_token_id == 0
        assert ids["bos_token_id"] == 0 and ids["pad_token_id"] == tokenizer.pad_token_id == 1

    model = _load_hf(out)
    assert _max_logit_diff(model, ref, input_ids, DENSE.vocab_size) < LOGIT_TOL
    prompt = input_ids[:1, :8]  # [1, 8]
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert 9 <= generated.shape[1] <= 12 and torch.equal(generated[:, :8], prompt)
    # Greedy's first token is megatron's argmax at the prompt's last position (causal model).
    assert generated[0, 8].item() == ref["logits"][0, 7, : DENSE.vocab_size].argmax().item()
    assert isinstance(tokenizer.decode(generated[0]), str)


@pytest.mark.parametrize(
    ("spec", "layout"),
    [(DENSE, (2, 2, 1)), (TIED, (2, 2, 1)), (MOE, (2, 1, 2)), (MOE_PRE_SOFTMAX, (1, 2, 2))],
    ids=["dense-tp2pp2", "tied-tp2pp2", "moe-tp2ep2", "moe-pp2ep2"],
)
def test_checkpoint_from_parallel_layout(pool4, references, input_ids, tmp_path, spec, layout):
    """A dist checkpoint written at TP x PP x EP reads back as the TP=1 state dict, exactly."""
    ref = references(spec)
    resharded = tmp_path / "ckpt"
    resharded.mkdir()
    pool4.run(reshard_checkpoint, spec, str(ref["checkpoint"]), str(resharded), *layout)
    full = load_full_model_tensors(resharded, num_layers=spec.num_layers)
    assert full.keys() == ref["state"].keys()
    assert all(torch.equal(full[k], ref["state"][k]) for k in full)
    out = export_checkpoint(resharded, ref["arch"], tmp_path / "hf", progress=False)
    assert _max_logit_diff(_load_hf(out), ref, input_ids, spec.vocab_size) < LOGIT_TOL

    victim = max(resharded.glob("__*.distcp"))
    victim.unlink()  # a rank's file lost: the error names the file and the tensors in it
    with pytest.raises(IncompleteCheckpointError, match=victim.name):
        export_checkpoint(resharded, ref["arch"], tmp_path / "hf2", progress=False)
    assert not (tmp_path / "hf2").exists()


def test_cli(references, input_ids, tokenizer_dir, tmp_path, capsys):
    main = _cli_main()
    ref = references(DENSE)
    arch_json = tmp_path / "arch.json"
    arch_json.write_text(json.dumps(ref["arch"].to_dict()))  # ModelConfig fields
    out = tmp_path / "hf"
    argv = ["--checkpoint", str(ref["checkpoint"]), "--arch", str(arch_json), "--out", str(out)]
    argv += ["--tokenizer", str(tokenizer_dir), "--dtype", "bf16", "--max-shard-size", "50KB"]
    assert main(argv + ["--no-progress"]) == 0
    _assert_default_modes(out)
    model = _load_hf(out)
    assert next(model.parameters()).dtype == torch.float32  # loaded as asked
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert len(list(out.glob("model-*.safetensors"))) > 1
    # bf16 weights: compare loosely (bf16 rounding of every weight), and only that it runs.
    assert _max_logit_diff(model, ref, input_ids, DENSE.vocab_size) < 0.1
    capsys.readouterr()
    assert main(argv) == 1  # a second export into the same folder
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {str(out)!r} exists; pass --overwrite to replace it"]
    assert main(argv + ["--no-progress", "--overwrite"]) == 0
    _assert_default_modes(out)


def test_cli_chat_template(references, tokenizer_dir, tmp_path, capsys):
    """--chat-template FILE becomes the exported tokenizer's template (the project's tokenizer
    has none), replaces one it has (saying so), and a template that does not render is refused
    before anything is written."""
    from transformers import AutoTokenizer

    main = _cli_main()
    arch_json = tmp_path / "arch.json"
    arch_json.write_text(json.dumps(references(DENSE)["arch"].to_dict()))
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")
    base = ["--checkpoint", str(references(DENSE)["checkpoint"]), "--arch", str(arch_json)]
    out = tmp_path / "hf"
    argv = [*base, "--out", str(out), "--tokenizer", str(tokenizer_dir), "--no-progress"]
    capsys.readouterr()
    assert main([*argv, "--chat-template", str(template)]) == 0
    assert f"chat template: {template} (the tokenizer had none)" in capsys.readouterr().out
    chat = [{"role": "user", "content": "hi"}]
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False) == (
        "<|user|>hi"
    )
    assert (out / "chat_template.jinja").read_text() == template.read_text()

    other = tmp_path / "other.jinja"
    other.write_text("{{ messages | length }} message(s)")
    again = tmp_path / "hf2"
    argv = [*base, "--out", str(again), "--tokenizer", str(out), "--no-progress"]
    assert main([*argv, "--chat-template", str(other)]) == 0
    assert f"chat template: {other} replaces the tokenizer's own" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(again)
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "1 message(s)"
    assert "chat_template" not in json.loads((again / "tokenizer_config.json").read_text())

    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")  # no endfor
    argv = [*base, "--out", str(tmp_path / "hf3"), "--tokenizer", str(out), "--no-progress"]
    assert main([*argv, "--chat-template", str(broken)]) == 1
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith("error: the chat template does not render a one-message conversation")
    assert not (tmp_path / "hf3").exists()


def _cli_main():
    """tools/export_hf.py's main (tools/ is a folder of scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "export_hf.py"
    spec = importlib.util.spec_from_file_location("export_hf_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ---------------------------------------------------------------------------------------------
# Checkpoints written by megatron_ext.training (tiny runs at TP x PP x EP on 4 gloo ranks)


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> str:
    pytest.importorskip("megatron_ext.training")
    from megatron_ext.training.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(root / "train", vocab_size=256, num_documents=40)


@pytest.mark.parametrize(
    ("model", "parallel"),
    [
        ({"preset": "tiny", "tie_embeddings": True}, {"tensor": 2, "pipeline": 2}),
        ({"preset": "tiny_moe"}, {"tensor": 2, "pipeline": 2}),
        ({"preset": "tiny_moe"}, {"tensor": 1, "pipeline": 2, "expert": 2}),
        # 4 layers, one per model chunk: stage 0 holds layers 0 and 2, stage 1 layers 1 and 3.
        (
            {"preset": "tiny", "num_layers": 4, "tie_embeddings": True},
            {"pipeline": 2, "virtual_pipeline": 2},
        ),
    ],
    ids=["dense-tied-tp2pp2", "moe-tp2pp2", "moe-pp2ep2", "dense-tied-pp2vp2"],
)
def test_trained_checkpoint_export(pool4, synthetic_data, input_ids, tmp_path, model, parallel):
    run_dir = tmp_path / "run"
    run_config = {
        "model": model,
        "parallel": parallel,
        "data": {"paths": [synthetic_data]},
        "checkpoint": {"save_dir": str(run_dir)},
        "optimizer": {"warmup_steps": 1, "lr": 1e-2},
        "logging": {"tensorboard": False, "console": False},
        "train_steps": 2,
        "global_batch_size": 4,
        "micro_batch_size": 1,
    }
    assert pool4.run(train_run, run_config) == [2] * 4
    checkpoint = resolve_training_checkpoint(run_dir)
    assert checkpoint.name == "iter_0000002"
    arch = arch_from_training_checkpoint(checkpoint)
    assert arch.is_moe == ("moe" in model["preset"])
    assert arch.tie_embeddings == model.get("tie_embeddings", False)

    # megatron-core's own resharding load into a TP=1 model of megatron_ext.models: the reference.
    ref = pool4.run(trained_model_reference, str(checkpoint), input_ids)[0]
    full = load_full_model_tensors(checkpoint, num_layers=arch.num_layers)
    assert full.keys() == ref["state"].keys()
    assert all(torch.equal(full[k], ref["state"][k]) for k in full)

    out = tmp_path / "hf"
    assert _cli_main()(["--checkpoint", str(run_dir), "--out", str(out), "--no-progress"]) == 0
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0  # the run's DataConfig.eod_id
    assert _max_logit_diff(_load_hf(out), ref, input_ids, arch.vocab_size) < LOGIT_TOL
