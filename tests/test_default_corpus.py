"""The embedded default corpus: CPython stdlib sources + pydoc topics, built offline, reused."""

from __future__ import annotations

import json
import time

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from megatron_ext.data import DefaultCorpusConfig, build_default_corpus, collect_default_documents
from megatron_ext.data.default_corpus import MANIFEST_NAME, inputs_sha256, main

SMALL = DefaultCorpusConfig(vocab_size=512, max_source_bytes=120_000, valid_every=10, workers=1)


def test_default_settings_and_documents():
    config = DefaultCorpusConfig()
    assert config.vocab_size == 8192 and config.vocab_size % 128 == 0
    docs = collect_default_documents(config)
    names = [d.name for d in docs]
    stdlib = [n for n in names if n.startswith("stdlib:")]
    topics = [n for n in names if n.startswith("topic:")]
    assert len(set(names)) == len(names) and len(stdlib) + len(topics) == len(names)
    assert stdlib == sorted(stdlib) and topics == sorted(topics) and names == stdlib + topics
    assert 200 <= len(stdlib) <= 1000 and len(topics) >= 50
    source_bytes = sum(len(d.text.encode()) for d in docs if d.name.startswith("stdlib:"))
    assert 3_000_000 <= source_bytes <= config.max_source_bytes  # a few MB, within the budget
    total_bytes = sum(len(d.text.encode()) for d in docs)
    assert 3_300_000 <= total_bytes <= 6_000_000
    assert not any("/test" in n or n.startswith("stdlib:test") for n in stdlib)
    assert not any("site-packages" in n or "__pycache__" in n for n in stdlib)
    assert "topic:assert" in topics and "topic:if" in topics
    # deterministic
    assert inputs_sha256(collect_default_documents(config), config) == inputs_sha256(docs, config)
    with pytest.raises(ValueError, match="multiple of 128"):
        DefaultCorpusConfig(vocab_size=8000)


def test_build_reuse_and_rebuild(tmp_path, capsys):
    out = tmp_path / "corpus"
    corpus = build_default_corpus(out, SMALL)
    assert not corpus.reused
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest == corpus.manifest
    docs = collect_default_documents(SMALL)
    assert manifest["num_documents"] == len(docs) == corpus.num_documents
    assert manifest["inputs_sha256"] == inputs_sha256(docs, SMALL)
    assert manifest["vocab_size"] == 512 and manifest["config"] == SMALL.manifest_settings()
    assert "workers" not in manifest["config"]
    assert (manifest["eod_id"], manifest["pad_id"], manifest["dtype"]) == (0, 1, "uint16")

    tok = AutoTokenizer.from_pretrained(str(corpus.tokenizer_dir), local_files_only=True)
    assert len(tok) == 512 and tok.eos_token == "<|endoftext|>" and tok.pad_token_id == 1
    valid_docs = docs[::10]
    train_docs = [d for i, d in enumerate(docs) if i % 10]
    for prefix, split_docs, split in (
        (corpus.train_prefix, train_docs, "train"),
        (corpus.valid_prefix, valid_docs, "valid"),
    ):
        ds = IndexedDataset(prefix)
        assert len(ds) == len(split_docs) == manifest["splits"][split]["documents"]
        lengths = ds.sequence_lengths
        assert int(lengths.sum()) == manifest["splits"][split]["tokens"]
        for i in (0, len(ds) - 1):
            ids = ds[i].tolist()
            assert ids[-1] == 0 and 0 not in ids[:-1]  # one eod, at the end
            assert tok.decode(ids[:-1]) == split_docs[i].text  # byte-level round trip
            assert max(ids) < 512
    assert corpus.num_tokens == sum(s["tokens"] for s in manifest["splits"].values())
    assert corpus.num_tokens > 30_000

    # up to date: reused, without rebuilding
    started = time.perf_counter()
    again = build_default_corpus(out, SMALL)
    assert again.reused and again.manifest == manifest
    assert time.perf_counter() - started < 5.0
    assert main(["--out", str(out), "--vocab-size", "512", "--max-source-bytes", "120000",
                 "--valid-every", "10", "--workers", "1", "--quiet"]) == 0  # fmt: skip
    assert "manifest matches" in capsys.readouterr().out

    # a damaged output is detected and rebuilt, bit for bit the same (deterministic build)
    bin_path = out / "train_text_document.bin"
    data = bytearray(bin_path.read_bytes())
    data[:4] = b"\xff\xff\xff\xff"
    bin_path.write_bytes(bytes(data))
    rebuilt = build_default_corpus(out, SMALL)
    assert not rebuilt.reused
    assert rebuilt.manifest["files_sha256"] == manifest["files_sha256"]
    assert sorted(p.name for p in out.iterdir()) == [
        MANIFEST_NAME,
        "tokenizer",
        "train_text_document.bin",
        "train_text_document.idx",
        "valid_text_document.bin",
        "valid_text_document.idx",
    ]
