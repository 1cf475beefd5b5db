"""Up-front checks of indexed datasets: every corruption gives a DataError naming the facts.

Good datasets are written by megatron-core's own builder (through `write_synthetic_dataset`, and
directly for int32 data); bad ones are corrupted copies. Counts and token ids are compared with
megatron's `IndexedDataset`, read independently of the validator.
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_ext.data import DataError, check_indexed_dataset, check_indexed_datasets, validate
from megatron_ext.training.synthetic import write_synthetic_dataset
from tests.reliability_report import record

VOCAB = 100  # the uint16 dataset
VOCAB_INT32 = 70_000  # the int32 dataset: above the uint16 range
HEADER = 34  # bytes before the .idx arrays


def _copy(prefix: str, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx"):
        shutil.copyfile(prefix + ext, str(dst) + ext)
    return str(dst)


def _error(prefix: str, vocab_size: int = VOCAB, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        check_indexed_dataset(prefix, vocab_size=vocab_size, **kwargs)
    return str(info.value)


def _record(description: str, message: str) -> None:
    """Add the case to the reliability report, temporary folders cut from the paths."""
    first = re.sub(r"/\S*/(?=[^/\s]+)", "", message.splitlines()[0])
    record(
        "bad_input", input=description, error=first if len(first) <= 120 else first[:117] + "..."
    )


def _counts(prefix: str) -> tuple[int, int]:
    """(sequence count, document index count) from the .idx header."""
    with open(prefix + ".idx", "rb") as stream:
        return struct.unpack_from("<QQ", stream.read(HEADER), 18)


def _locate(prefix: str, position: int) -> tuple[int, int]:
    """(sequence, document) of a global token position, from megatron's reader."""
    ds = IndexedDataset(prefix)
    ends = np.cumsum(ds.sequence_lengths)
    sequence = int(np.searchsorted(ends, position, side="right"))
    document = int(np.searchsorted(ds.document_indices, sequence, side="right")) - 1
    return sequence, document


def _set_token(prefix: str, position: int, value: int, dtype: type[np.generic]) -> None:
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r+")
    data[position] = value
    data.flush()
    del data


@pytest.fixture(scope="module")
def uint16_data(tmp_path_factory) -> str:
    prefix = tmp_path_factory.mktemp("uint16") / "synthetic"
    return write_synthetic_dataset(prefix, vocab_size=VOCAB, num_documents=30, seed=1)


@pytest.fixture(scope="module")
def int32_data(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("int32") / "wide")
    rng = np.random.default_rng(2)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(12):
        lengths = rng.integers(1, 40, size=int(rng.integers(1, 4))).tolist()
        tokens = rng.integers(0, VOCAB_INT32 - 1, size=sum(lengths))
        builder.add_document(tokens, lengths)  # several sequences per document
    builder.add_document(np.array([VOCAB_INT32 - 1]), [1])  # the largest id in the vocabulary
    builder.finalize(prefix + ".idx")
    return prefix


# -- good data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["uint16", "int32"])
def test_valid_dataset_counts_match_megatron(request, which):
    prefix = request.getfixturevalue(f"{which}_data")
    vocab = VOCAB if which == "uint16" else VOCAB_INT32
    summary = check_indexed_dataset(prefix, vocab_size=vocab)
    ds = IndexedDataset(prefix)
    tokens = np.concatenate([ds[i] for i in range(len(ds))])
    assert summary == validate.IndexedDataSummary(
        prefix=prefix,
        num_sequences=len(ds),
        num_documents=ds.document_indices.shape[0] - 1,
        num_tokens=int(ds.sequence_lengths.sum()),
        dtype=which,
        max_token_id=int(tokens.max()),
    )
    assert tokens.size == summary.num_tokens
    if which == "int32":
        assert summary.num_sequences > summary.num_documents  # multi-sequence documents
        assert summary.max_token_id == VOCAB_INT32 - 1  # the edge of the vocabulary is valid
    unscanned = check_indexed_dataset(Path(prefix), vocab_size=vocab, scan_tokens=False)
    assert unscanned.max_token_id is None
    assert (unscanned.num_sequences, unscanned.num_tokens) == (len(ds), summary.num_tokens)


def test_small_chunks_give_the_same_summary(uint16_data, int32_data, monkeypatch):
    expected = check_indexed_datasets([uint16_data, int32_data], vocab_size=VOCAB_INT32)
    monkeypatch.setattr(validate, "SCAN_CHUNK_TOKENS", 7)
    monkeypatch.setattr(validate, "INDEX_CHUNK_ENTRIES", 3)
    assert check_indexed_datasets([uint16_data, int32_data], vocab_size=VOCAB_INT32) == expected
    assert [s.prefix for s in expected] == [uint16_data, int32_data]


def test_progress_lines(uint16_data, monkeypatch, capsys):
    num_tokens = check_indexed_dataset(uint16_data, vocab_size=VOCAB).num_tokens
    monkeypatch.setattr(validate, "SCAN_CHUNK_TOKENS", 100)
    monkeypatch.setattr(validate, "PROGRESS_EVERY_BYTES", 1000)
    check_indexed_dataset(uint16_data, vocab_size=VOCAB, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(
        line.startswith("checked ") and line.endswith(f" GiB of {uint16_data}.bin")
        for line in lines
    )
    total_bytes = 2 * num_tokens
    assert len(lines) == -(-total_bytes // 1000)  # one per 1000 bytes: chunks are 200 bytes
    check_indexed_dataset(uint16_data, vocab_size=VOCAB)  # progress off: silent
    assert capsys.readouterr().err == ""


def test_dtype_table_matches_megatron():
    assert validate.INDEX_DTYPES == {d.value: np.dtype(getattr(np, d.name)) for d in DType}
    assert validate.INDEX_MAGIC == b"MMIDIDX\x00\x00"


def test_lazy_exports():
    from megatron_ext import data

    assert data.check_indexed_dataset is validate.check_indexed_dataset
    assert data.check_indexed_datasets is validate.check_indexed_datasets
    assert data.IndexedDataSummary is validate.IndexedDataSummary
    assert {"IndexedDataSummary", "check_indexed_dataset", "check_indexed_datasets"} <= set(
        data.__all__
    )


# -- missing files -----------------------------------------------------------------------------


@pytest.mark.reliability
@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file(uint16_data, tmp_path, missing):
    prefix = _copy(uint16_data, tmp_path / "data")
    Path(prefix + missing).unlink()
    other = ".idx" if missing == ".bin" else ".bin"
    message = _error(prefix)
    assert f"{prefix}{missing} is missing" in message
    assert f"its pair {prefix}{other} exists" in message
    _record(f"missing {missing} (its {other} present)", message)


@pytest.mark.reliability
@pytest.mark.parametrize("ext", [".bin", ".idx"])
def test_prefix_given_with_extension(uint16_data, tmp_path, ext):
    prefix = _copy(uint16_data, tmp_path / "data")
    message = _error(prefix + ext)
    assert f"neither {prefix}{ext}.bin nor {prefix}{ext}.idx exists" in message
    assert f"without the extension: {prefix!r} instead of {prefix + ext!r}" in message
    _record(f"prefix given as a file name, ending in {ext}", message)


@pytest.mark.reliability
def test_wrong_prefix_lists_the_datasets_found(uint16_data, tmp_path):
    _copy(uint16_data, tmp_path / "train_text_document")
    _copy(uint16_data, tmp_path / "valid_text_document")
    (tmp_path / "orphan.bin").write_bytes(b"")  # no .idx: not listed
    message = _error(str(tmp_path / "train_text"))
    assert f"neither {tmp_path}/train_text.bin nor {tmp_path}/train_text.idx exists" in message
    assert repr(str(tmp_path / "train_text_document")) in message
    assert repr(str(tmp_path / "valid_text_document")) in message
    assert "orphan" not in message
    _record("misspelt prefix (two datasets in its folder)", message)


# -- the .idx header and size ------------------------------------------------------------------


def _patch_header(prefix: str, offset: int, data: bytes) -> None:
    with open(prefix + ".idx", "r+b") as stream:
        stream.seek(offset)
        stream.write(data)


@pytest.mark.reliability
def test_bad_magic(uint16_data, tmp_path):
    prefix = _copy(uint16_data, tmp_path / "data")
    _patch_header(prefix, 0, b"NOTANIDX\x00")
    message = _error(prefix)
    assert f"{prefix}.idx: not a megatron-core index file" in message
    assert "b'NOTANIDX\\x00'" in message and "b'MMIDIDX\\x00\\x00'" in message
    _record("bad .idx magic (b'NOTANIDX\\x00')", message)


@pytest.mark.reliability
def test_bad_version(uint16_data, tmp_path):
    prefix = _copy(uint16_data, tmp_path / "data")
    _patch_header(prefix, 9, struct.pack("<Q", 2))
    message = _error(prefix)
    assert f"{prefix}.idx: index version 2, expected 1" in message
    _record(".idx version 2", message)


@pytest.mark.reliability
@pytest.mark.parametrize("code", [0, 9, 255, 7])
def test_bad_dtype_code(uint16_data, tmp_path, code):
    prefix = _copy(uint16_data, tmp_path / "data")
    _patch_header(prefix, 17, struct.pack("<B", code))
    message = _error(prefix)
    if code == 7:  # float32: a known code, but no token ids
        assert f"{prefix}.idx: token dtype float32 cannot hold token ids" in message
        _record(".idx dtype code 7 (float32)", message)
    else:
        assert f"{prefix}.idx: unknown token dtype code {code}" in message
        assert "8=uint16" in message
        _record(f".idx dtype code {code} (unknown)", message)


@pytest.mark.reliability
@pytest.mark.parametrize("change", [-10, +5, "header"])
def test_idx_size_mismatch(uint16_data, tmp_path, change):
    prefix = _copy(uint16_data, tmp_path / "data")
    path = Path(prefix + ".idx")
    data = path.read_bytes()
    size = len(data)
    if change == "header":  # cut inside the header itself
        path.write_bytes(data[:20])
        message = _error(prefix)
        assert f"{prefix}.idx: index file too short: 20 bytes" in message
        assert f"the header alone takes {HEADER}" in message
        _record(f".idx cut to 20 of {size} bytes, inside the header", message)
        return
    path.write_bytes(data[:change] if change < 0 else data + b"\x00" * change)
    message = _error(prefix)
    seqs, docs = _counts(prefix)
    kind, amount = (
        ("truncated", "missing") if change < 0 else ("longer than its header says", "extra")
    )
    assert f"{prefix}.idx: index file {kind}: {size + change} bytes" in message
    assert f"({seqs} sequences, {docs} document indices) implies {size} bytes" in message
    assert f"({abs(change)} bytes {amount})" in message
    if change < 0:
        _record(f"truncated .idx ({-change} of {size} bytes missing)", message)
    else:
        _record(f"padded .idx ({change} bytes beyond its {size})", message)


@pytest.mark.reliability
def test_idx_with_multimodal_modes_hints(uint16_data, tmp_path):
    prefix = _copy(uint16_data, tmp_path / "data")
    seqs, _ = _counts(prefix)
    with open(prefix + ".idx", "ab") as stream:
        stream.write(b"\x00" * seqs)
    message = _error(prefix)
    assert f"({seqs} bytes extra)" in message and "pass multimodal=True" in message
    summary = check_indexed_dataset(prefix, vocab_size=VOCAB, multimodal=True)
    assert summary.num_sequences == seqs
    _record(f".idx with {seqs} per-sequence mode bytes, read as text-only", message)


# -- the .idx arrays ---------------------------------------------------------------------------


def _corrupt_array(prefix: str, kind: str) -> tuple[int, str]:
    """Corrupt one .idx entry in place; returns (entry index, fact the message must hold)."""
    seqs, docs = _counts(prefix)
    lengths_at, pointers_at, docs_at = HEADER, HEADER + 4 * seqs, HEADER + 12 * seqs
    ds = IndexedDataset(prefix)
    pointers, doc_index = ds.index.sequence_pointers.copy(), ds.document_indices.copy()
    del ds
    i = seqs - 3  # late in the index: in a later chunk when chunks are small
    if kind == "pointer":
        _patch_header(prefix, pointers_at + 8 * i, struct.pack("<q", int(pointers[i]) + 2))
        return i, f"sequence pointer {i} is {int(pointers[i]) + 2}, expected {int(pointers[i])}"
    if kind == "first pointer":
        _patch_header(prefix, pointers_at, struct.pack("<q", 4))
        return 0, "sequence pointer 0 is 4, expected 0 (the first pointer must be 0"
    if kind == "negative length":
        _patch_header(prefix, lengths_at + 4 * i, struct.pack("<i", -7))
        return i, f"sequence {i} has negative length -7"
    if kind == "first document index":
        _patch_header(prefix, docs_at, struct.pack("<q", 1))
        return 0, "document index 0 is 1, expected 0"
    if kind == "decreasing document indices":
        j = docs - 3
        _patch_header(prefix, docs_at + 8 * j, struct.pack("<q", int(doc_index[j - 1]) - 1))
        return j, (
            f"document indices decrease at {j}: {int(doc_index[j - 1])} then "
            f"{int(doc_index[j - 1]) - 1}"
        )
    assert kind == "last document index"
    _patch_header(prefix, docs_at + 8 * (docs - 1), struct.pack("<q", seqs - 1))
    return docs - 1, f"the last document index is {seqs - 1}, expected {seqs}"


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("kind", "chunk"),
    [
        ("pointer", None),
        ("first pointer", None),
        ("negative length", None),
        ("first document index", None),
        ("decreasing document indices", None),
        ("last document index", None),
        # the entry in a later chunk of the index than the first: checks carried across chunks
        ("pointer", 4),
        ("negative length", 4),
        ("decreasing document indices", 4),
    ],
)
def test_inconsistent_index(uint16_data, tmp_path, monkeypatch, kind, chunk):
    prefix = _copy(uint16_data, tmp_path / "data")
    if chunk:
        monkeypatch.setattr(validate, "INDEX_CHUNK_ENTRIES", chunk)
    index, fact = _corrupt_array(prefix, kind)
    message = _error(prefix)
    assert message.startswith(f"{prefix}.idx: ") and fact in message
    assert "re-run tools/preprocess_data.py" in message
    where = f", {chunk}-entry chunks" if chunk else ""
    _record(f"inconsistent .idx: bad {kind} (entry {index}{where})", message)


# -- the .bin size -----------------------------------------------------------------------------


@pytest.mark.reliability
@pytest.mark.parametrize("change", [-200, +6, -1])
def test_bin_size_mismatch(uint16_data, tmp_path, change):
    prefix = _copy(uint16_data, tmp_path / "data")
    path = Path(prefix + ".bin")
    size = path.stat().st_size
    data = path.read_bytes()
    path.write_bytes(data[:change] if change < 0 else data + b"\x01" * change)
    message = _error(prefix)
    tokens = size // 2
    facts = f"{prefix}.idx describes {tokens} uint16 tokens = {size} bytes"
    assert facts in message and f"{size + change} bytes" in message
    whole = f"{abs(change) // 2} tokens" if change % 2 == 0 else "not a whole token"
    if change < 0:
        assert message.startswith(f"{prefix}.bin: data file truncated: {size + change} bytes")
        assert f"{-change} bytes ({whole}) missing" in message
        _record(f"truncated .bin ({-change} of {size} bytes missing)", message)
    else:
        assert message.startswith(f"{prefix}.bin: data file has {change} extra bytes ({whole})")
        _record(f".bin with {change} extra bytes ({size} expected)", message)


# -- token ids ---------------------------------------------------------------------------------


@pytest.mark.reliability
def test_token_id_equal_to_vocab_size(uint16_data, tmp_path):
    prefix = _copy(uint16_data, tmp_path / "data")
    num_tokens = check_indexed_dataset(prefix, vocab_size=VOCAB).num_tokens
    position = num_tokens // 2 + 3
    _set_token(prefix, position, VOCAB, np.uint16)
    sequence, document = _locate(prefix, position)
    message = _error(prefix)
    assert message.startswith(f"{prefix}.bin: token id {VOCAB} is outside the vocabulary")
    assert f"vocab_size {VOCAB}" in message
    assert f"1 of {num_tokens} tokens out of range" in message
    assert f"first at token {position} (sequence {sequence}, " in message
    assert f"document {document}): id {VOCAB}" in message
    assert f"set model.vocab_size >= {VOCAB + 1}" in message
    # a model with a larger vocabulary accepts the same file
    assert check_indexed_dataset(prefix, vocab_size=VOCAB + 1).max_token_id == VOCAB
    # the unscanned check cannot see token ids
    assert check_indexed_dataset(prefix, vocab_size=VOCAB, scan_tokens=False).max_token_id is None
    _record(f"token id {VOCAB} == vocab_size at token {position} of {num_tokens} (uint16)", message)


@pytest.mark.reliability
def test_tokenizer_larger_than_model(int32_data):
    vocab = 50_000  # data made with a 70k tokenizer, model configured for 50k
    message = _error(int32_data, vocab_size=vocab)
    ds = IndexedDataset(int32_data)
    tokens = np.concatenate([ds[i] for i in range(len(ds))])
    first = int(np.flatnonzero(tokens >= vocab)[0])
    sequence, document = _locate(int32_data, first)
    assert f"token id {int(tokens.max())} is outside the vocabulary (vocab_size {vocab}" in message
    assert f"{int((tokens >= vocab).sum())} of {tokens.size} tokens out of range" in message
    assert f"first at token {first} (sequence {sequence}, " in message
    assert f"document {document}): id {int(tokens[first])}" in message
    _record(f"int32 data with ids up to {int(tokens.max())}, vocab_size {vocab}", message)


@pytest.mark.reliability
def test_negative_token_id(int32_data, tmp_path):
    prefix = _copy(int32_data, tmp_path / "data")
    ds = IndexedDataset(prefix)
    num_tokens = int(ds.sequence_lengths.sum())
    del ds
    position = num_tokens - 5
    _set_token(prefix, position, -5, np.int32)
    sequence, document = _locate(prefix, position)
    message = _error(prefix, vocab_size=VOCAB_INT32)
    assert message.startswith(f"{prefix}.bin: negative token ids (smallest -5, largest ")
    assert f"vocab_size {VOCAB_INT32}" in message
    assert f"first at token {position} (sequence {sequence}, " in message
    assert f"document {document}): id -5" in message
    _record(f"negative token id -5 at token {position} of {num_tokens} (int32)", message)


@pytest.mark.reliability
def test_out_of_range_id_found_in_a_later_chunk(uint16_data, tmp_path, monkeypatch):
    prefix = _copy(uint16_data, tmp_path / "data")
    num_tokens = check_indexed_dataset(prefix, vocab_size=VOCAB).num_tokens
    chunk = 64
    monkeypatch.setattr(validate, "SCAN_CHUNK_TOKENS", chunk)
    first, second = 5 * chunk + 17, 9 * chunk + 1  # chunks 5 and 9 of the scan
    assert second < num_tokens
    _set_token(prefix, second, 4321, np.uint16)  # the larger id, in the later chunk
    _set_token(prefix, first, 123, np.uint16)
    sequence, document = _locate(prefix, first)
    message = _error(prefix)
    assert f"token id 4321 is outside the vocabulary (vocab_size {VOCAB}" in message
    assert f"2 of {num_tokens} tokens out of range" in message
    assert f"first at token {first} (sequence {sequence}, " in message
    assert f"document {document}): id 123" in message
    _record(
        f"ids 123 and 4321 >= vocab_size {VOCAB} in chunks 5 and 9 ({chunk}-token chunks)", message
    )


# -- empty datasets, several datasets, bad arguments -------------------------------------------


@pytest.mark.reliability
@pytest.mark.parametrize("sequences", [0, 2])
def test_empty_dataset(tmp_path, sequences):
    prefix = str(tmp_path / "empty")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    if sequences:
        builder.add_document(np.array([], dtype=np.int64), [0] * sequences)
    builder.finalize(prefix + ".idx")
    message = _error(prefix)
    assert message.startswith(f"{prefix}.idx: empty dataset: ")
    if sequences:
        assert f"its {sequences} sequences hold 0 tokens" in message
        _record(f"empty dataset ({sequences} sequences of 0 tokens)", message)
    else:
        assert "0 sequences, 0 tokens" in message
        _record("empty dataset (0 sequences)", message)


@pytest.mark.reliability
def test_several_bad_datasets_reported_together(uint16_data, tmp_path):
    truncated = _copy(uint16_data, tmp_path / "truncated")
    Path(truncated + ".bin").write_bytes(Path(truncated + ".bin").read_bytes()[:-20])
    missing = str(tmp_path / "missing")
    with pytest.raises(DataError) as info:
        check_indexed_datasets([uint16_data, truncated, missing], vocab_size=VOCAB)
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0] == "2 of 3 indexed datasets are bad:"
    assert lines[1].startswith(f"- {truncated}.bin: data file truncated: ")
    assert lines[2].startswith(f"- dataset prefix {missing!r}: neither {missing}.bin")
    assert len(lines) == 3
    with pytest.raises(DataError) as one:  # one bad dataset: its own message, unwrapped
        check_indexed_datasets([uint16_data, truncated], vocab_size=VOCAB)
    assert str(one.value) == _error(truncated)
    _record("3 datasets: 1 good, 1 truncated .bin, 1 missing", message)


@pytest.mark.reliability
@pytest.mark.parametrize("vocab", [0, -3, 1.5, True])
def test_bad_vocab_size(uint16_data, vocab):
    error = ValueError if isinstance(vocab, int) and not isinstance(vocab, bool) else TypeError
    with pytest.raises(error) as info:
        check_indexed_dataset(uint16_data, vocab_size=vocab)
    assert repr(vocab) in str(info.value)
    _record(f"vocab_size={vocab!r}", str(info.value))


@pytest.mark.reliability
def test_no_prefix():
    with pytest.raises(DataError) as info:
        check_indexed_datasets([], vocab_size=VOCAB)
    assert "no indexed dataset prefix given" in str(info.value)
    _record("empty list of dataset prefixes", str(info.value))
