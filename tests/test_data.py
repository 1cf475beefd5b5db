"""The data pipeline: local files -> tokenizer -> megatron-core indexed datasets, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from transformers import AutoTokenizer

from megatron_ext.data import (
    DataError,
    HFTokenizerAdapter,
    load_tokenizer,
    preprocess,
    train_bpe_tokenizer,
)
from megatron_ext.data.cli import main as cli_main

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):    return a + b  # tabs\tand spaces",
    "Unicode: naïve café, 東京, emoji 🙂 and ∑ math.",
    "Megatron-core reads .bin/.idx pairs written by IndexedDatasetBuilder.",
    "Short.",
    "A slightly longer document, repeated words words words words to give BPE something to merge.",
]
TRAIN_TEXTS = DOCS * 3 + ["the of and to in is it that for on with as was by at " * 5]


def _write_jsonl(path: Path, records: list[dict], blank_after: int | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as stream:
        for i, record in enumerate(records):
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            if blank_after is not None and i == blank_after:
                stream.write("\n")
    return path


def _write_parquet(path: Path, texts: list[str | None], **extra: list) -> Path:
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), **extra}), path)
    return path


def _write_txt(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def _expected(tok, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]


def _documents(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    train_bpe_tokenizer(TRAIN_TEXTS, out, 384)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_trained_tokenizer_is_a_complete_hf_tokenizer(tok_dir):
    assert sorted(p.name for p in tok_dir.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((tok_dir / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
    }
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )
    hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert len(hf) == 384  # filled with reserved tokens up to the requested size
    assert (hf.eos_token, hf.eos_token_id, hf.pad_token, hf.pad_token_id) == (
        "<|endoftext|>",
        0,
        "<|pad|>",
        1,
    )
    for text in DOCS + ["never seen: ʘ‿ʘ \x00 bytes"]:
        ids = hf.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == text  # byte-level: every string round-trips
    # merges were learnt: common words take one token
    assert len(hf.encode(" the", add_special_tokens=False)) == 1

    adapter = HFTokenizerAdapter(tok_dir)
    assert (adapter.vocab_size, adapter.eod, adapter.pad, adapter.bos) == (384, 0, 1, 0)
    assert adapter.detokenize(adapter.tokenize(DOCS[2])) == DOCS[2]
    assert json.loads(json.dumps(adapter.unique_identifiers))["vocab_size"] == 384


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt"])
def test_round_trip_each_format(tmp_path, tok_dir, tok, fmt):
    if fmt == "jsonl":
        records = [{"text": t, "id": i} for i, t in enumerate(DOCS)]
        path = _write_jsonl(tmp_path / "docs.jsonl", records)
    elif fmt == "parquet":
        path = _write_parquet(tmp_path / "docs.parquet", DOCS, id=list(range(len(DOCS))))
    else:
        path = _write_txt(tmp_path / "docs.txt", DOCS)
    result = preprocess([str(path)], tmp_path / "out" / "docs", tok_dir, workers=1, progress=False)
    expected = _expected(tok, DOCS)
    assert _documents(result.output_prefix) == expected
    assert result.num_documents == len(DOCS)
    assert result.num_tokens == sum(map(len, expected))
    assert (result.num_skipped, result.dtype, result.vocab_size, result.eod_id) == (
        0,
        "uint16",
        384,
        0,
    )
    assert IndexedDataset(result.output_prefix).index.dtype == np.uint16
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["docs.bin", "docs.idx"]


def _gpt_dataset(prefix: str, tok_dir: Path, cache: Path, seq_len: int) -> GPTDataset:
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=seq_len,
        blend=([prefix], None),
        split="100,0,0",
        path_to_cache=str(cache),
        tokenizer=HFTokenizerAdapter(tok_dir),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [None, None, None], lambda: True, config
    ).build()
    assert valid is None and test is None
    return train


def test_mixed_inputs_parallel_then_gpt_dataset(tmp_path, tok_dir, tok):
    """Three formats in one run, two worker processes, then megatron-core's GPTDataset."""
    multi_line = "line one\nline two\n\n  indented line three\n"
    jsonl = _write_jsonl(
        tmp_path / "a.jsonl", [{"text": DOCS[0]}, {"text": multi_line}, {"text": DOCS[1]}], 0
    )
    parquet = _write_parquet(tmp_path / "b.parquet", [DOCS[2], "   ", DOCS[3]])
    txt = _write_txt(tmp_path / "c.txt", [DOCS[4], "", DOCS[5]])
    result = preprocess(
        [str(jsonl), str(parquet), str(txt)],
        tmp_path / "mixed",
        tok_dir,
        workers=2,
        batch_size=2,
        progress=False,
    )
    texts = [DOCS[0], multi_line, DOCS[1], DOCS[2], DOCS[3], DOCS[4], DOCS[5]]
    expected = _expected(tok, texts)
    assert _documents(result.output_prefix) == expected
    assert (result.num_documents, result.num_skipped) == (7, 2)  # "   " and the empty line
    assert result.inputs == (str(jsonl), str(parquet), str(txt))

    seq_len = 16
    gpt = _gpt_dataset(result.output_prefix, tok_dir, tmp_path / "cache", seq_len)
    stream = np.concatenate([expected[d] for d in gpt.document_index])
    assert sorted(gpt.document_index.tolist()) == list(range(7))  # one epoch, every document once
    assert len(gpt) == (len(stream) - 1) // seq_len
    # undo the shuffle: sample k (in sample-index order) is gpt[position of k in shuffle_index]
    order = np.argsort(gpt.shuffle_index)
    samples = [gpt[int(order[k])] for k in range(len(gpt))]
    tokens = np.concatenate([s["tokens"].numpy() for s in samples])
    labels = np.concatenate([s["labels"].numpy() for s in samples])
    assert np.array_equal(tokens, stream[: len(tokens)])
    assert np.array_equal(labels, stream[1 : len(tokens) + 1])
    assert all(s["loss_mask"].sum().item() == seq_len for s in samples)  # no pad inside data
    # the documents' boundaries are the eod tokens
    assert int((tokens == tok.eos_token_id).sum()) == int(
        (stream[: len(tokens)] == tok.eos_token_id).sum()
    )


def test_failed_write_leaves_no_dataset_and_keeps_the_old_one(tmp_path, tok_dir, monkeypatch):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCS])
    prefix = tmp_path / "out" / "d"
    preprocess([str(path)], prefix, tok_dir, workers=1, progress=False)
    old = {ext: (tmp_path / "out" / f"d.{ext}").read_bytes() for ext in ("bin", "idx")}

    calls = {"n": 0}
    original = IndexedDatasetBuilder.add_document

    def failing(self, tensor, lengths, modes=None):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError("disk full (simulated)")
        return original(self, tensor, lengths, modes)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", failing)
    other = _write_jsonl(tmp_path / "e.jsonl", [{"text": t + " changed"} for t in DOCS])
    with pytest.raises(OSError, match="disk full"):
        preprocess([str(other)], prefix, tok_dir, workers=1, progress=False)
    assert calls["n"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d.bin", "d.idx"]
    assert {ext: (tmp_path / "out" / f"d.{ext}").read_bytes() for ext in ("bin", "idx")} == old

    with pytest.raises(OSError, match="disk full"):
        preprocess([str(other)], tmp_path / "new" / "x", tok_dir, workers=1, progress=False)
    assert list((tmp_path / "new").iterdir()) == []  # no temporaries, no half dataset


# ---------------------------------------------------------------------------------------------
# Errors: each names the file and the line / record, and the fix where there is one.


def test_missing_text_field_in_whole_file(tmp_path, tok_dir):
    records = [{"body": "x", "id": 1}, {"body": "y", "id": 2}]
    path = _write_jsonl(tmp_path / "nofield.jsonl", records)
    with pytest.raises(DataError) as err:
        preprocess([str(path)], tmp_path / "o", tok_dir, workers=1, progress=False)
    msg = str(err.value)
    assert f"file {str(path)!r}, line 1" in msg
    assert "no field 'text'" in msg
    assert "['body', 'id']" in msg
    assert "--text-field" in msg
    assert not list(tmp_path.glob("o*"))


def test_missing_text_field_in_one_record_names_its_line(tmp_path, tok_dir):
    path = _write_jsonl(
        tmp_path / "holes.jsonl",
        [{"text": "a", "id": 1}, {"text": "b", "id": 2}, {"id": 3, "title": "t"}, {"text": "d"}],
        blank_after=0,  # a blank line 2: the bad record is on line 4
    )
    with pytest.raises(DataError) as err:
        preprocess([str(path)], tmp_path / "o", tok_dir, workers=1, progress=False)
    msg = str(err.value)
    assert f"file {str(path)!r}, line 4" in msg
    assert "no field 'text'" in msg and "['id', 'title']" in msg

    table_path = _write_parquet(tmp_path / "holes.parquet", ["a", None, "c"], id=[1, 2, 3])
    with pytest.raises(DataError) as err:
        preprocess([str(table_path)], tmp_path / "o", tok_dir, workers=1, progress=False)
    assert f"file {str(table_path)!r}, record 2" in str(err.value)
    assert "['id']" in str(err.value)

    with pytest.raises(DataError, match=r"no field 'body'.*fields that exist are \['id', 'text'\]"):
        preprocess([str(table_path)], tmp_path / "o", tok_dir, text_field="body", progress=False)


def test_unreadable_records_name_their_line(tmp_path, tok_dir):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=rf"file '{bad_json}', line 2: invalid JSON"):
        preprocess([str(bad_json)], tmp_path / "o", tok_dir, workers=1, progress=False)

    bad_type = _write_jsonl(tmp_path / "type.jsonl", [{"text": "fine"}, {"text": 5}])
    with pytest.raises(DataError, match=rf"file '{bad_type}', line 2: field 'text' is a int"):
        preprocess([str(bad_type)], tmp_path / "o", tok_dir, workers=1, progress=False)

    with pytest.raises(DataError, match="does not exist"):
        preprocess([str(tmp_path / "missing.jsonl")], tmp_path / "o", tok_dir, progress=False)
    with pytest.raises(DataError, match=r"cannot tell the format.*\.csv"):
        csv = tmp_path / "x.csv"
        csv.write_text("text\nhello\n")
        preprocess([str(csv)], tmp_path / "o", tok_dir, progress=False)


def test_empty_corpus(tmp_path, tok_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError) as err:
        preprocess([str(empty), str(blank)], tmp_path / "o", tok_dir, progress=False)
    msg = str(err.value)
    assert "empty corpus" in msg and str(empty) in msg and str(blank) in msg

    spaces = _write_txt(tmp_path / "spaces.txt", ["", "   ", "\t"])
    with pytest.raises(DataError, match=r"empty corpus: all 3 records of .*spaces\.txt.* empty"):
        preprocess([str(spaces)], tmp_path / "o", tok_dir, workers=1, progress=False)
    assert not list(tmp_path.glob("o.*"))


@pytest.fixture(scope="module")
def big_vocab_tokenizer(tmp_path_factory) -> Path:
    """A word-level tokenizer with 70,000 words: ids above the uint16 range."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eod>": 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("wordlevel") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_token_ids_that_do_not_fit_the_dtype(tmp_path, big_vocab_tokenizer):
    path = _write_jsonl(tmp_path / "ids.jsonl", [{"text": "w1 w2 w3"}, {"text": "w5 w69999 w7"}])
    with pytest.raises(DataError) as err:
        preprocess([str(path)], tmp_path / "o", big_vocab_tokenizer, dtype="uint16", progress=False)
    msg = str(err.value)
    assert f"file {str(path)!r}, line 2" in msg
    assert "token id 70001" in msg and "uint16" in msg and "0..65535" in msg
    assert "int32" in msg  # the fix
    assert not list(tmp_path.glob("o*"))

    # left unset, the dtype follows megatron-core's DType.optimal_dtype: int32 for this vocabulary
    result = preprocess([str(path)], tmp_path / "o", big_vocab_tokenizer, progress=False)
    assert (result.dtype, result.vocab_size, result.eod_id) == ("int32", 70_002, 0)
    assert _documents(result.output_prefix) == [[3, 4, 5, 0], [7, 70_001, 9, 0]]


def test_tokenizer_without_eod_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=r"no end-of-document \(eos\) token.*--eod-token"):
        load_tokenizer(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json", eod_token="a").eos_token_id == 1


def test_tokenizer_vocabulary_larger_than_the_model(tmp_path, tok_dir):
    path = _write_jsonl(tmp_path / "v.jsonl", [{"text": t} for t in DOCS])
    with pytest.raises(DataError) as err:
        preprocess([str(path)], tmp_path / "o", tok_dir, model_vocab_size=256, progress=False)
    msg = str(err.value)
    assert "384 tokens" in msg and "is 256" in msg and "--model-vocab-size" in msg
    assert "at least 384" in msg  # the fix
    assert not list(tmp_path.glob("o*"))
    ok = preprocess([str(path)], tmp_path / "o", tok_dir, model_vocab_size=384, progress=False)
    assert ok.num_documents == len(DOCS)


def test_cli(tmp_path, capsys):
    docs = _write_jsonl(tmp_path / "c.jsonl", [{"content": t} for t in TRAIN_TEXTS])
    status = cli_main(
        [
            "--input", str(docs),
            "--output-prefix", str(tmp_path / "cli" / "c_text_document"),
            "--train-tokenizer", str(tmp_path / "cli_tok"),
            "--vocab-size", "512",
            "--text-field", "content",
            "--workers", "1",
            "--quiet",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"wrote {len(TRAIN_TEXTS)} documents" in out
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "cli_tok"), local_files_only=True)
    assert len(hf) == 512
    assert _documents(str(tmp_path / "cli" / "c_text_document")) == _expected(hf, TRAIN_TEXTS)

    status = cli_main(
        [
            "--input", str(docs),
            "--output-prefix", str(tmp_path / "cli" / "bad"),
            "--tokenizer", str(tmp_path / "cli_tok"),
            "--quiet",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.startswith("error: ")
    assert "no field 'text'" in captured.err and "['content']" in captured.err


def test_command_line_entry_points():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for cmd, option in (
        ([str(root / "tools" / "preprocess_data.py")], "--train-tokenizer"),
        (["-m", "megatron_ext.data.default_corpus"], "--max-source-bytes"),
    ):
        done = subprocess.run(
            [sys.executable, *cmd, "--help"], capture_output=True, text=True, cwd=root, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert option in done.stdout
        assert "RuntimeWarning" not in done.stderr  # no double import of the module run
