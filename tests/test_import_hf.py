"""Hugging Face import (tools/import_hf.py, export.import_hf) and the trainer's init_from.

A random tiny Qwen3 built with transformers (vocabulary 301, so that padding is exercised;
head_dim 32 != hidden/heads; norms perturbed so that a swapped norm shows; saved in many small
safetensors shards) is imported, loaded by megatron-core at TP=2 x PP=2 on 4 gloo ranks and run
through the pipeline: its logits equal transformers' (fp32, tolerance 1e-5; both compute in fp32
with different kernels, measured differences ~1e-7). Exported back with the existing exporter,
every tensor is bitwise the original. The trainer starts from an import padded for another TP
size (weights only, step 0) and saves exactly the imported weights after a step at lr=0; a few
steps of the `precision` loss at TP=2, exported, give transformers' logits equal to megatron's
logits of the trained checkpoint (1e-5; measured ~4e-7). Every refusal is one `error:` line
naming the field and the fix, before anything is written; the peak memory of an 8-shard import
stays below twice its largest shard plus one layer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_ext.core.checkpoint_layout import checkpoint_dir, latest_step
from megatron_ext.export import import_hf_model, plan_keys
from megatron_ext.export.key_map import INVERSES, KEY_MAP
from megatron_ext.models import ModelConfig
from megatron_ext.training import CheckpointConfig, ConfigError, TrainConfig, config_from_dict
from megatron_ext.training.start import plan_start
from tests._workers_import import imported_logits
from tests._workers_training import train
from tests.tiny_run import standalone_env

REPO = Path(__file__).resolve().parents[1]
LOGIT_TOL = 1e-5
VOCAB = 301  # odd: padded to 384 for TP=1, 512 for TP=2
HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "eos_token_id",
)


def _tool(name: str):
    """main() of tools/<name>.py (tools/ is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _save_qwen3(out: Path, tokenizer: Path | None, max_shard_size: str, seed: int = 0, **fields):
    """A random Qwen3ForCausalLM saved with save_pretrained (fp32), tokenizer files beside it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 64,
            "rope_theta": 1e6,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 1,
        }
        | fields
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # all-ones norms would hide a swapped norm mapping
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer is not None:
        for file in tokenizer.iterdir():
            shutil.copyfile(file, out / file.name)
    return model


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                tensors[key] = f.get_tensor(key)
    return tensors


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """The project's byte-level BPE (megatron_ext.data), 300 tokens, eos 0, pad 1."""
    import pydoc_data.topics

    from megatron_ext.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    assert len(train_bpe_tokenizer(list(pydoc_data.topics.topics.values())[:50], out, 300)) == 300
    return out


@pytest.fixture(scope="module")
def hf_dense(tmp_path_factory, tokenizer) -> tuple[Path, torch.nn.Module]:
    """The untied tiny Qwen3 in 10 safetensors shards, with the tokenizer."""
    out = tmp_path_factory.mktemp("hf") / "qwen3-tiny"
    model = _save_qwen3(out, tokenizer, max_shard_size="50KB")
    assert len(list(out.glob("model-*.safetensors"))) > 4
    return out, model


@pytest.fixture(scope="module")
def imported(hf_dense, tmp_path_factory) -> Path:
    """hf_dense imported for TP=2 x PP=2."""
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    return import_hf_model(hf_dense[0], out, tensor_parallel=2, pipeline_parallel=2, progress=False)


# ---------------------------------------------------------------------------------------------
# The key map's way back


def test_every_transform_has_its_inverse():
    from tests.test_export import ARCH_FIELDS, MOE_ARCH

    arch = ModelConfig(**ARCH_FIELDS, **MOE_ARCH)  # dense layer 0, MoE layer 1
    assert {rule.transform for rule in KEY_MAP} <= set(INVERSES)
    gen = torch.Generator().manual_seed(0)
    for entry in plan_keys(arch, 32):  # 10 tokens, 32 rows
        megatron = torch.randn(entry.shape, generator=gen)
        if entry.megatron[0].endswith(("word_embeddings.weight", "output_layer.weight")):
            assert entry.shape[0] == 32
            megatron[arch.vocab_size :] = 0  # the rows an import pads with
        hf = entry.transform(megatron, arch)
        assert torch.equal(entry.merge(hf, arch, entry.shape), megatron), entry.megatron[0]
        again = entry.transform(entry.merge(hf, arch, entry.shape), arch)
        assert all(torch.equal(a, b) for a, b in zip(again, hf, strict=True))


# ---------------------------------------------------------------------------------------------
# Import, load at TP=2 x PP=2, compare with transformers; export back


def test_imported_checkpoint_matches_transformers_at_tp2_pp2(pool4, hf_dense, imported):
    hf_dir, hf_model = hf_dense
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=gen)  # [b, s]
    with torch.no_grad():
        expected = hf_model(input_ids).logits  # [b, s, v]
    # ranks 0..3: (tp, pp) = (0, 0), (1, 0), (0, 1), (1, 1); rank 2 holds the last stage's TP 0
    results = pool4.run(imported_logits, str(imported), input_ids, 2, 2)
    assert [r is None for r in results] == [True, True, False, True]
    logits = results[2]  # [b, s, 512]
    assert logits.shape == (2, 24, 512)
    diff = (logits[..., :VOCAB] - expected).abs().max().item()
    print(f"max |logit diff| megatron TP=2 x PP=2 vs transformers = {diff:.3g}")
    assert diff < LOGIT_TOL
    assert torch.equal(logits[..., VOCAB:], torch.zeros_like(logits[..., VOCAB:]))  # zero rows


@pytest.mark.parametrize(
    "routing",
    [{"norm_topk_prob": True}, {"norm_topk_prob": False, "mlp_only_layers": [0]}],
    ids=["topk-softmax", "pre-softmax-dense-layer0"],
)
def test_qwen3_moe_import_matches_transformers_at_pp2_ep2(pool4, tmp_path, routing):
    """Qwen3-MoE: router and per-expert weights (transformers 5 fuses experts in memory and
    writes one tensor per expert and projection). Imported padded for TP=2 (512 rows), loaded
    at PP=2 x EP=2 (data parallel 2, TP=1: 384 rows; the trainer's layouts on gloo). Also with
    routing weights that are not renormalised and a dense first layer (ModelConfig's
    moe_router_pre_softmax and moe_dense_layers)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        rope_theta=1e6, eos_token_id=0, **routing,
    )  # fmt: skip
    torch.manual_seed(2)
    hf_model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
            elif "experts" in name:  # transformers initialises the fused experts to zeros
                param.normal_(0.0, 0.05)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    out = import_hf_model(tmp_path / "hf", tmp_path / "ckpt", tensor_parallel=2,
                          expert_parallel=2, progress=False)  # fmt: skip
    model = ModelConfig(**json.loads((out / "config.json").read_text())["model"])
    assert model.num_experts == 4
    assert model.moe_router_pre_softmax is not routing["norm_topk_prob"]
    assert model.moe_dense_layers == tuple(routing.get("mlp_only_layers", ()))
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_model(input_ids).logits  # [b, s, v]
    results = pool4.run(imported_logits, str(out), input_ids, 1, 2, 2)
    assert [r is None for r in results] == [True, True, False, False]  # last stage: ranks 2, 3
    for logits in results[2:]:
        assert logits.shape == (2, 16, 384)
        diff = (logits[..., :VOCAB] - expected).abs().max().item()
        print(f"max |logit diff| megatron MoE PP=2 x EP=2 vs transformers = {diff:.3g}")
        assert diff < LOGIT_TOL
    # The way back: every tensor of the original shards bitwise, the MoE config fields as written.
    exported = tmp_path / "exported"
    assert (
        _tool("export_hf")(["--checkpoint", str(out), "--out", str(exported), "--no-progress"]) == 0
    )
    original, again = _safetensors(tmp_path / "hf"), _safetensors(exported)
    assert again.keys() == original.keys()
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name
    a, b = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "hf", exported))
    moe_fields = (
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "mlp_only_layers",
    )
    assert {f: b[f] for f in (*HF_FIELDS, *moe_fields)} == {
        f: a[f] for f in (*HF_FIELDS, *moe_fields)
    }
    assert b["architectures"] == a["architectures"] == ["Qwen3MoeForCausalLM"]


def test_checkpoint_files_and_run_config(hf_dense, imported):
    hf_dir, _ = hf_dense
    assert latest_step(imported) == 0
    assert sorted(p.name for p in imported.iterdir()) == [
        "config.json",
        "iter_0000000",
        "latest",
        "tokenizer",
    ]
    assert (checkpoint_dir(imported, 0) / "metadata.json").is_file()
    config = json.loads((imported / "config.json").read_text())
    assert config["parallel"] == {"tensor": 2, "pipeline": 2, "expert": 1}
    assert config["data"] == {"eod_id": 0}
    model = ModelConfig(**config["model"])
    assert (model.name, model.vocab_size, model.head_dim, model.seq_length) == (
        "qwen3-tiny",
        VOCAB,
        32,
        64,
    )
    assert (model.rope_base, model.tie_embeddings, model.padded_vocab_size(2)) == (1e6, False, 512)
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(imported, 0)))
    assert common["extra"]["config"] == config
    assert common["train_state"]["step"] == 0 and common["train_state"]["weights_only"]


def test_export_of_the_import_is_bitwise_the_original(hf_dense, imported, tmp_path):
    hf_dir, _ = hf_dense
    out = tmp_path / "exported"
    argv = ["--checkpoint", str(imported), "--out", str(out), "--tokenizer"]
    assert _tool("export_hf")([*argv, str(imported / "tokenizer"), "--no-progress"]) == 0
    original, exported = _safetensors(hf_dir), _safetensors(out)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    a, b = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    assert {f: b[f] for f in HF_FIELDS} == {f: a[f] for f in HF_FIELDS}
    assert b["rope_theta"] == a["rope_parameters"]["rope_theta"] == 1e6
    assert b["architectures"] == a["architectures"] == ["Qwen3ForCausalLM"]
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


def test_bf16_import_rounds_each_weight_once(hf_dense, tmp_path):
    hf_dir, _ = hf_dense
    argv = ["--hf", str(hf_dir), "--out", str(tmp_path / "c"), "--dtype", "bf16"]
    assert _tool("import_hf")([*argv, "--no-progress"]) == 0
    from megatron_ext.export import load_full_model_tensors

    full = load_full_model_tensors(checkpoint_dir(tmp_path / "c", 0), num_layers=2)
    assert {t.dtype for t in full.values()} == {torch.bfloat16}
    original = _safetensors(hf_dir)
    embedding = full["embedding.word_embeddings.weight"]
    assert embedding.shape == (384, 64)  # padded for --tp 1
    assert torch.equal(embedding[:VOCAB], original["model.embed_tokens.weight"].bfloat16())


# ---------------------------------------------------------------------------------------------
# Refusals: one error line, exit status 1, nothing written


def _config_edit(expected: str, **fields):
    """A case that sets config.json fields; `expected` may name the directory as {dir}."""

    def edit(directory: Path) -> tuple[list[str], str]:
        path = directory / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | fields))
        return [], expected

    return edit


def _truncate_shard(directory: Path) -> tuple[list[str], str]:
    shard = sorted(directory.glob("model-*.safetensors"))[3]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-100])
    return [], f"{shard.name}' is truncated: {size - 100} bytes, but its header describes {size}"


def _remove_shard(directory: Path) -> tuple[list[str], str]:
    shard = sorted(directory.glob("model-*.safetensors"))[2]
    shard.unlink()
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    count = sum(file == shard.name for file in index.values())
    return [], f"names shard files that are missing: {shard.name} ({count} tensors); download"


def _add_bias(directory: Path) -> tuple[list[str], str]:
    """A q_proj bias in a shard of its own, named in the index (as a Qwen2 checkpoint has)."""
    from safetensors.torch import save_file

    bias = {"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}
    save_file(bias, directory / "extra.safetensors")
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = "extra.safetensors"
    path.write_text(json.dumps(index))
    return [], (
        "hold 1 tensor (model.layers.0.self_attn.q_proj.bias) that the Qwen3 key map does not "
        "know (megatron_ext's model has no place for them"
    )


ERRORS = {
    "model-type": _config_edit(
        "model_type=\"llama\"; the importer reads 'qwen3' (Qwen3ForCausalLM), 'qwen3_moe' "
        "(Qwen3MoeForCausalLM) models only",
        model_type="llama",
    ),
    "sliding-window": _config_edit(
        "use_sliding_window=true: megatron_ext's model attends to the whole causal context in "
        "every layer; sliding-window attention cannot be imported (need use_sliding_window=false)",
        use_sliding_window=True,
        sliding_window=16,
    ),
    "rope-scaling": _config_edit(
        "(rope_type 'yarn'); megatron_ext's model applies plain RoPE (rope_theta only). If the "
        "weights were trained without it (Qwen3 adds YaRN for long-context inference only), set "
        "rope_scaling to null in config.json and import again",
        rope_scaling={"rope_type": "yarn", "factor": 4.0},
    ),
    "attention-bias": _config_edit(
        "attention_bias=true: megatron_ext's Qwen3 attention has no biases on q/k/v/o (need "
        "attention_bias=false)",
        attention_bias=True,
    ),
    "missing-shard": _remove_shard,
    "unknown-tensor": _add_bias,
    "truncated-shard": _truncate_shard,
    "tokenizer-too-large": _config_edit(
        "the tokenizer in '{dir}' has 300 tokens but {dir}/config.json has vocab_size=299: ids "
        ">= 299 would have no embedding row; use the tokenizer the model was trained with",
        vocab_size=299,
    ),
    "tp-does-not-divide": lambda directory: (
        ["--tp", "3"],
        "--tp 3 does not divide num_attention_heads=4 of {dir}/config.json (sizes that do: 1, "
        "2, 4)",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_refusals_name_the_value_and_the_fix(hf_dense, tmp_path, capsys, case):
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_dense[0], hf_dir)
    flags, expected = ERRORS[case](hf_dir)
    argv = ["--hf", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--no-progress", *flags]
    capsys.readouterr()
    assert _tool("import_hf")(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected.replace("{dir}", str(hf_dir)) in lines[0]
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written


def test_existing_output_is_refused_before_reading(hf_dense, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    argv = ["--hf", str(hf_dense[0]), "--out", str(tmp_path / "ckpt")]
    assert _tool("import_hf")(argv) == 1
    assert capsys.readouterr().err == (
        f"error: {str(tmp_path / 'ckpt')!r} exists; pass --overwrite to replace it\n"
    )


# ---------------------------------------------------------------------------------------------
# The trainer starts from an import: weights only, step 0


def test_start_plan_of_init_from(imported, hf_dense, tmp_path):
    model = ModelConfig(**json.loads((imported / "config.json").read_text())["model"])

    def config(**checkpoint) -> TrainConfig:
        return TrainConfig(model=model, checkpoint=CheckpointConfig(**checkpoint))

    save = str(tmp_path / "run")
    plan = plan_start(config(init_from=str(imported), save_dir=save))
    assert (plan.kind, plan.root, plan.step, plan.full_state, plan.start_step) == (
        "init",
        str(imported),
        0,
        False,
        0,
    )
    # A relaunch resumes its own save_dir, not the import again.
    checkpoint_dir(save, 3).mkdir(parents=True)
    (Path(save) / "latest").write_text("3\n")
    plan = plan_start(config(init_from=str(imported), save_dir=save))
    assert (plan.kind, plan.step, plan.full_state) == ("resume", 3, True)
    assert f"checkpoint.init_from={imported} is only read while save_dir is empty" in plan.message
    # A Hugging Face directory, one checkpoint folder, a typo: refused, naming what to pass.
    with pytest.raises(ConfigError, match="it is a Hugging Face model directory: import it first"):
        plan_start(config(init_from=str(hf_dense[0])))
    with pytest.raises(ConfigError, match=f"name the root holding it .*\\({imported}\\)"):
        plan_start(config(init_from=str(checkpoint_dir(imported, 0))))
    with pytest.raises(ConfigError, match=f"nearest checkpoint folders: .*{imported.name}"):
        plan_start(config(init_from=str(imported) + "x"))
    with pytest.raises(ConfigError, match="set one of them"):
        CheckpointConfig(init_from=str(imported), load_dir=str(imported))


def test_resuming_an_import_as_a_run_is_refused(imported):
    from megatron_ext.training.checkpoint import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match="holds weights only .* checkpoint.init_from"):
        load_checkpoint(
            imported, model=None, optimizer=None, scheduler=None, distributed_optimizer=False
        )


def test_cli_takes_the_model_of_init_from(imported, hf_dense):
    from megatron_ext.training.cli import config_from_args, parse_args

    argv = ["--init-from", str(imported), "--data-path", "d", "--set", "model.seq_length=32"]
    config = config_from_args(parse_args(argv), announce=False)
    saved = ModelConfig(**json.loads((imported / "config.json").read_text())["model"])
    assert config.model == ModelConfig(**(saved.__dict__ | {"seq_length": 32}))
    assert config.checkpoint.init_from == str(imported)
    with pytest.raises(ConfigError, match="import it first with `python tools/import_hf.py"):
        config_from_args(parse_args(["--init-from", str(hf_dense[0])]), announce=False)


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("hf_tied") / "qwen3-tied"
    _save_qwen3(out, tokenizer, max_shard_size="50KB", seed=1, tie_word_embeddings=True)
    return out


def test_trainer_starts_from_an_import_at_another_layout(pool4, hf_tied, tmp_path):
    """Imported for TP=1 (vocabulary padded to 384), trained at TP=2 x PP=2 (512 rows): megatron
    reads the rows both share. One step at lr=0 from step 0, then the saved weights are the
    imported ones, bitwise (checked through the exporter against the original shards)."""
    from megatron_ext.training.synthetic import write_synthetic_dataset

    imported = import_hf_model(hf_tied, tmp_path / "ckpt", progress=False)
    data = write_synthetic_dataset(tmp_path / "data" / "train", vocab_size=256, num_documents=40)
    model = json.loads((imported / "config.json").read_text())["model"]
    run = {
        "model": model,
        "parallel": {"tensor": 2, "pipeline": 2},
        "data": {"paths": [data]},
        "checkpoint": {"init_from": str(imported), "save_dir": str(tmp_path / "run")},
        "optimizer": {"lr": 0.0, "min_lr": 0.0, "warmup_steps": 0, "weight_decay": 0.1},
        "logging": {"tensorboard": False, "console": False},
        "train_steps": 1,
        "global_batch_size": 2,
        "micro_batch_size": 1,
        "seq_length": 32,
    }
    results = pool4.run(train, config_from_dict(run))
    assert [(r["start_step"], r["final_step"]) for r in results] == [(0, 1)] * 4
    assert results[0]["records"][0]["lr"] == 0.0
    out = tmp_path / "exported"
    argv = ["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--no-progress"]
    assert _tool("export_hf")(argv) == 0
    original, exported = _safetensors(hf_tied), _safetensors(out)
    assert exported.keys() == original.keys() and "lm_head.weight" not in exported
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_import_then_shaped_training_at_tp2_then_export_matches_megatron(
    pool4, hf_dense, imported, tmp_path
):
    """The way a Hugging Face base is continued and handed back: the import (padded for TP=2 x
    PP=2) trained for a few steps with the `precision` loss at TP=2 (DP=2, PP=1), the trained
    checkpoint exported, and transformers' logits of the export equal megatron's logits of the
    trained checkpoint (fp32, LOGIT_TOL) while both are far from the imported model's."""
    from megatron_ext.training.synthetic import write_synthetic_dataset
    from tests.test_export import _load_hf

    hf_dir, hf_model = hf_dense
    data = write_synthetic_dataset(tmp_path / "data" / "train", vocab_size=VOCAB, num_documents=40)
    run = {
        "model": json.loads((imported / "config.json").read_text())["model"],
        "shaping": "precision",
        "parallel": {"tensor": 2},
        "data": {"paths": [data]},
        "checkpoint": {"init_from": str(imported), "save_dir": str(tmp_path / "run")},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0},
        "logging": {"tensorboard": False, "console": False},
        "train_steps": 3,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "seq_length": 32,
    }
    results = pool4.run(train, config_from_dict(run))
    assert [(r["start_step"], r["final_step"]) for r in results] == [(0, 3)] * 4
    records = results[0]["records"]
    assert all(r["loss"] != pytest.approx(r["ce_loss"], rel=1e-4) for r in records)  # shaped
    out = tmp_path / "exported"
    argv = ["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--no-progress"]
    assert _tool("export_hf")([*argv, "--tokenizer", str(imported / "tokenizer")]) == 0
    original, exported = _safetensors(hf_dir), _safetensors(out)
    assert exported.keys() == original.keys()
    assert all(not torch.equal(exported[k], original[k]) for k in original if "norm" not in k)

    input_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(11))
    logits = pool4.run(imported_logits, str(tmp_path / "run"), input_ids, 2, 1)
    assert [r is None for r in logits] == [False, True, False, True]  # TP rank 0 of each DP rank
    assert torch.equal(logits[0], logits[2])
    megatron = logits[0][..., :VOCAB]  # [b, s, v], padding stripped
    model = _load_hf(out)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.vocab_size == VOCAB
    with torch.no_grad():
        hf_logits = model(input_ids).logits  # [b, s, v]
        before = hf_model(input_ids).logits
    diff = (hf_logits - megatron).abs().max().item()
    moved = (hf_logits - before).abs().max().item()
    print(f"trained at TP=2: max |logit diff| transformers vs megatron = {diff:.3g}, {moved:.3g} "
          "from the imported model")  # fmt: skip
    assert diff < LOGIT_TOL
    assert moved > 1e3 * LOGIT_TOL


# ---------------------------------------------------------------------------------------------
# Memory of an 8-shard import


_PEAK = """
import importlib.util, json
spec = importlib.util.spec_from_file_location("import_hf_tool", {tool!r})
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
# A first import loads every module an import needs, so that the measured one allocates only
# for the model.
assert tool.main(["--hf", {small!r}, "--out", {small_out!r}, "--no-progress"]) == 0

def status(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key))
    return int(line.split()[1]) * 1024

before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from VmRSS
code = tool.main(["--hf", {big!r}, "--out", {big_out!r}])
print("PEAK " + json.dumps({{"code": code, "before": before, "peak": status("VmHWM:")}}))
"""


BIG = {
    "vocab_size": 16001,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
"""191 MB in fp32: embedding and head 33 MB each, 16 MB per layer; 8 shards of at most 25 MB
(the embedding and the head get one each)."""


def test_peak_memory_of_an_8_shard_import(hf_dense, tmp_path):
    """The CLI run end to end in a process of its own, its peak resident memory (file pages
    mapped by safetensors included) measured from the kernel's high-water mark."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    big = tmp_path / "big"
    _save_qwen3(big, None, max_shard_size="25MB", **BIG)
    shards = sorted(big.glob("model-*.safetensors"))
    assert len(shards) == 8
    largest = max(p.stat().st_size for p in shards)
    layer = sum(t.nbytes for name, t in _safetensors(big).items() if ".layers.0." in name)
    script = _PEAK.format(
        tool=str(REPO / "tools" / "import_hf.py"),
        small=str(hf_dense[0]),
        small_out=str(tmp_path / "small_ckpt"),
        big=str(big),
        big_out=str(tmp_path / "big_ckpt"),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=standalone_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.split("PEAK ")[-1])
    assert figures["code"] == 0
    assert "in 8 safetensors files" in proc.stdout and "imported to" in proc.stdout
    growth = figures["peak"] - figures["before"]
    total = sum(p.stat().st_size for p in shards)
    report = (
        f"peak RSS growth {growth / 1e6:.1f} MB importing {total / 1e6:.1f} MB in 8 shards "
        f"(largest shard {largest / 1e6:.1f} MB, one layer {layer / 1e6:.1f} MB: bound "
        f"{(2 * largest + layer) / 1e6:.1f} MB)"
    )
    print(report)
    assert growth < 2 * largest + layer, report


def test_chat_template_survives_import_and_export(hf_dense, tmp_path):
    """A tokenizer's chat template (saved by transformers as chat_template.jinja) is kept in the
    checkpoint's tokenizer/ and in the export of it, where apply_chat_template renders it."""
    from transformers import AutoTokenizer

    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_dense[0], hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    tokenizer.save_pretrained(hf_dir)
    assert (hf_dir / "chat_template.jinja").is_file()  # where transformers puts it
    ckpt = import_hf_model(hf_dir, tmp_path / "ckpt", progress=False)
    assert (ckpt / "tokenizer" / "chat_template.jinja").is_file()
    out = tmp_path / "exported"
    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--tokenizer", str(ckpt / "tokenizer")]
    assert _tool("export_hf")([*argv, "--no-progress"]) == 0
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        tokenize=False,
    )
    assert rendered == "[user] hi\n[assistant] hello\n"
