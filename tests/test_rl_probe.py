"""The RL probe (run_configs/rl_probe.py): its reward and pass@k by hand, its prompts, and one
preset end to end through TRL's GRPOTrainer on a tiny exported model (random weights, the
project's exporter and BPE tokenizer, 2 GRPO steps; about 20 s with the imports)."""

from __future__ import annotations

import json
import math
import os
from importlib.util import find_spec
from pathlib import Path

import pytest

from run_configs.rl_probe import (
    RLProbeConfig,
    corpus_successors,
    next_word_reward,
    next_word_tasks,
    pass_at_k,
)

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is fetched: the model and tokenizer are built here

needs_trl = pytest.mark.skipif(
    find_spec("trl") is None, reason="the RL probe needs the rl extra: pip install -e '.[rl]'"
)


def test_next_word_reward_by_hand():
    completions = [" return x", " returned", "return", " return", "  return", " return(", "", " "]
    assert next_word_reward(completions, ["return"] * len(completions)) == [
        1.0,  # the word, then a non-word character
        0.0,  # a longer word
        0.0,  # no leading space: not the document's continuation
        1.0,  # the word alone
        0.0,  # two spaces
        1.0,
        0.0,
        0.0,
    ]
    # TRL passes the prompts and other columns as keywords: they are accepted and ignored
    assert next_word_reward([" a.", " b"], ["a", "a"], prompts=["x", "y"], trainer_state=None) == [
        1.0,
        0.0,
    ]
    with pytest.raises(ValueError):
        next_word_reward([" a"], ["a", "b"])


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(16, 2, 8) == pytest.approx(1 - 3003 / 12870)  # C(14,8)/C(16,8)
    assert pass_at_k(16, 2, 1) == pytest.approx(2 / 16)  # pass@1 = the fraction passed
    assert pass_at_k(16, 0, 8) == 0.0
    assert pass_at_k(16, 9, 8) == 1.0  # 7 failures cannot fill 8 draws
    assert pass_at_k(16, 16, 1) == 1.0
    for n, c, k in ((4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)):
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(n, c, k)


def test_corpus_successors_by_hand():
    text = "is not here is not there is None ok is not\nself, ab self, ab"
    # "is" precedes a word 4 times (not 3, None 1); "not" twice (here, there: a tie, the first
    # in alphabetical order); "self," twice (ab, ab); every other chunk once (a one-letter word
    # is no place: answers have two characters or more)
    assert corpus_successors([text], min_count=2, min_share=0.5) == {
        "is": "not",
        "not": "here",
        "self,": "ab",
    }
    assert corpus_successors([text], min_count=2, min_share=0.6) == {"is": "not", "self,": "ab"}
    assert corpus_successors([text], min_count=3, min_share=0.5) == {"is": "not"}
    assert corpus_successors([text, text], min_count=8, min_share=0.75) == {"is": "not"}


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("steps", 0, "steps=0"),
        ("num_generations", 1, "2 or more"),
        ("ks", (1, 32), "raise eval_samples"),
        ("learning_rate", 0.0, "learning_rate"),
        ("min_share", 0.0, "min_share"),
        ("train_prompts", True, "train_prompts"),
    ],
)
def test_config_refuses_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        RLProbeConfig(**{field: value})


@pytest.fixture(scope="module")
def texts() -> list[str]:
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())


@pytest.fixture(scope="module")
def tokenizer_dir(texts, tmp_path_factory) -> Path:
    """The project's byte-level BPE (megatron_ext.data), 300 tokens, on CPython's docs."""
    from megatron_ext.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(texts[:40], out, vocab_size=300)
    return out


def test_next_word_tasks(texts, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = texts[40:60]
    tasks = next_word_tasks(docs, tokenizer, 20, context_chars=60, seed=3)
    assert len({t.prompt for t in tasks}) == 20
    for t in tasks:
        # a document's text from a line start, cut before a space and the answer
        assert any(f"\n{t.prompt} {t.answer}" in d or d.startswith(t.prompt) for d in docs)
        assert not t.prompt[-1].isspace() and not t.prompt.startswith("\n")
        assert len(t.prompt) <= 60
        assert len(tokenizer(" " + t.answer, add_special_tokens=False).input_ids) == 1
        assert next_word_reward([" " + t.answer + "\n"], [t.answer]) == [1.0]
    assert next_word_tasks(docs, tokenizer, 20, context_chars=60, seed=3) == tasks
    assert next_word_tasks(docs, tokenizer, 20, context_chars=60, seed=4) != tasks
    # only the places whose word is the corpus's successor of the chunk before it
    successors = corpus_successors(docs, min_count=5, min_share=0.3)
    assert successors
    chosen = next_word_tasks(docs, tokenizer, 5, successors=successors, context_chars=60)
    for t in chosen:
        chunk = t.prompt.split()[-1]
        assert successors[chunk] == t.answer
    with pytest.raises(ValueError, match="fewer than the 100000 asked"):
        next_word_tasks(docs[:1], tokenizer, 100_000)


def _tiny_hf_model(out: Path, tokenizer_dir: Path) -> Path:
    """A 1-layer Qwen3 with random weights written by the project's exporter."""
    import torch

    from megatron_ext.export import export_state_dict, plan_keys
    from megatron_ext.models import ModelConfig

    model = ModelConfig(
        vocab_size=300,
        hidden_size=16,
        num_layers=1,
        num_attention_heads=2,
        num_query_groups=1,
        head_dim=8,
        ffn_hidden_size=32,
        seq_length=256,
        tie_embeddings=False,
    )
    gen = torch.Generator().manual_seed(0)
    state = {e.megatron[0]: 0.1 * torch.randn(e.shape, generator=gen) for e in plan_keys(model)}
    return export_state_dict(state, model, out, tokenizer_dir=tokenizer_dir, progress=False)


def _corpus(out: Path, tokenizer_dir: Path, texts: list[str]) -> Path:
    """A folder laid out as the default corpus (tokenizer/, train and valid indexed datasets,
    manifest.json) over a few documentation topics."""
    import shutil

    import numpy as np
    from megatron.core.datasets.indexed_dataset import (
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )
    from transformers import AutoTokenizer

    shutil.copytree(tokenizer_dir, out / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for prefix, docs in (
        ("train_text_document", texts[40:50]),
        ("valid_text_document", texts[50:55]),
    ):
        builder = IndexedDatasetBuilder(get_bin_path(str(out / prefix)), dtype=np.uint16)
        for doc in docs:
            ids = np.asarray(tokenizer(doc).input_ids, dtype=np.int64)
            builder.add_document(ids, [len(ids)])
        builder.finalize(get_idx_path(str(out / prefix)))
    paths = {
        "tokenizer": "tokenizer",
        "train_prefix": "train_text_document",
        "valid_prefix": "valid_text_document",
    }
    (out / "manifest.json").write_text(json.dumps({"vocab_size": 300, "eod_id": 0, "paths": paths}))
    return out


@needs_trl
def test_exported_model_loads_into_trl_unchanged(tokenizer_dir, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    hf = _tiny_hf_model(tmp_path / "hf", tokenizer_dir)
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=2,
        use_cpu=True,
        report_to="none",
        model_init_kwargs={"dtype": torch.float32},
    )
    data = Dataset.from_list([{"prompt": "The value of", "answer": "the"}] * 4)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    with torch.no_grad():
        want = model(ids).logits
    # the directory's path: TRL loads the model and the tokenizer itself
    by_path = GRPOTrainer(
        model=str(hf), reward_funcs=next_word_reward, args=args, train_dataset=data
    )
    with torch.no_grad():
        torch.testing.assert_close(by_path.model(ids).logits, want, rtol=0, atol=0)
    loaded = by_path.processing_class
    assert loaded.pad_token_id == tokenizer.pad_token_id is not None
    assert loaded.eos_token_id == tokenizer.eos_token_id == by_path.model.config.eos_token_id
    assert loaded("def f(x):").input_ids == tokenizer("def f(x):").input_ids
    # the loaded model and tokenizer, as a user's script passes them
    given = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=next_word_reward,
        args=args,
        train_dataset=data,
    )
    assert given.model is model and given.processing_class is tokenizer


@needs_trl
def test_probe_end_to_end_one_preset(texts, tokenizer_dir, tmp_path, capsys):
    from run_configs.cli import main

    corpus = _corpus(tmp_path / "corpus", tokenizer_dir, texts)
    compare = tmp_path / "compare"
    _tiny_hf_model(compare / "ce" / "hf", tokenizer_dir)  # what export_run leaves in a run
    rc = main(
        ["rl-probe", "--compare-dir", str(compare), "--data-dir", str(corpus)]
        + ["--rl-steps", "2", "--prompts", "4", "--eval-prompts", "4", "--prompts-per-step", "2"]
        + ["--generations", "2", "--samples", "8"]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    out = compare / "rl_probe"
    assert (out / "rl_probe.png").stat().st_size > 0
    md = (out / "rl_probe.md").read_text()
    assert "| `ce` | 1 |" in md and "pass@8 before" in md
    summary = json.loads((out / "rl_probe.json").read_text())
    (run,) = summary["runs"]["ce"]
    assert len(run["entropy"]) == len(run["reward"]) == 2  # one per GRPO step
    for phase in ("before", "after"):
        figures = run[phase]
        assert set(figures["pass_at"]) == {"1", "8"}
        values = [
            figures["reward"],
            figures["entropy"],
            figures["greedy"],
            *figures["pass_at"].values(),
        ]
        assert all(math.isfinite(v) for v in values)
        assert 0 <= figures["pass_at"]["1"] <= figures["pass_at"]["8"] <= 1
        assert figures["pass_at"]["1"] == pytest.approx(figures["reward"])  # a 0/1 reward
        assert 0 < figures["entropy"] <= math.log(320) + 1e-4
    assert all(math.isfinite(v) and v > 0 for v in run["entropy"])
    stats = summary["over_seeds"]["ce"]
    assert stats["before"]["pass@8"]["n"] == 1 and stats["before"]["pass@8"]["low"] is None
    assert stats["gain"]["reward"]["mean"] == pytest.approx(
        run["after"]["reward"] - run["before"]["reward"]
    )
    assert "[rl-probe] ce: reward" in printed


@needs_trl
def test_rl_probe_names_a_missing_comparison(tmp_path, capsys):
    from run_configs.cli import main

    rc = main(["rl-probe", "--compare-dir", str(tmp_path / "none"), "--data-dir", str(tmp_path)])
    assert rc == 2
    assert "run `python -m run_configs compare --out" in capsys.readouterr().err
