"""Up-front checks of megatron-core indexed datasets (.bin/.idx pairs) used as training data.

Megatron's own `IndexedDataset` trusts its files: a truncated or foreign file fails with a bare
assertion or a numpy buffer error deep inside dataset building, and an out-of-range token id only
shows up mid-run as an embedding index error on some rank. `check_indexed_dataset` reads the index
itself and checks every invariant the reader relies on, so that a bad file gives a `DataError`
naming the file, the numbers and the fix before any training work starts.

The .idx layout (megatron-core 0.19, `megatron/core/datasets/indexed_dataset.py`), little-endian:

    magic      9 bytes  b"MMIDIDX\\x00\\x00"
    version    <Q       1
    dtype      <B       token dtype code (megatron's `DType` enum)
    seq_count  <Q       number of sequences
    doc_count  <Q       number of document indices (documents + 1, the first one is 0)
    lengths    int32[seq_count]   tokens per sequence
    pointers   int64[seq_count]   byte offset of each sequence in the .bin
    doc_index  int64[doc_count]   sequence index where each document starts; the last is seq_count
    modes      int8[seq_count]    multimodal datasets only

Only numpy is imported: megatron's module pulls in torch and the object-storage clients, which
would make this check (and `import megatron_ext.data`) slow. The dtype table below is therefore a
copy of megatron's `DType` enum; `tests/test_data_validation.py` checks that the two agree.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_ext.data.errors import DataError

__all__ = [
    "IndexedDataSummary",
    "check_files_exist",
    "check_indexed_dataset",
    "check_indexed_datasets",
]

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, two counts: 34
"""Bytes before the per-sequence arrays of an .idx file."""

INDEX_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
"""Token dtype by the .idx dtype code (megatron-core `DType`)."""

SCAN_CHUNK_TOKENS = 64 * 2**20
"""Tokens read per step when scanning a .bin: bounds the memory of a scan whatever the file size."""

INDEX_CHUNK_ENTRIES = 4 * 2**20
"""Sequence lengths/pointers (or document indices) read per step when checking an .idx (a step
holds a few int64 arrays of this length, about 150 MiB)."""

PROGRESS_EVERY_BYTES = 2**30
"""With progress=True, one line to stderr per this many .bin bytes scanned."""

_GIB = 2**30
_REBUILD = "re-run tools/preprocess_data.py on the source data to rebuild the .bin/.idx pair"


@dataclass(frozen=True)
class IndexedDataSummary:
    """What a checked indexed dataset holds."""

    prefix: str
    """The path prefix, as given (without .bin/.idx)."""
    num_sequences: int
    """Sequences in the index."""
    num_documents: int
    """Documents in the index (one less than the document indices)."""
    num_tokens: int
    """Tokens in the .bin."""
    dtype: str
    """Token dtype name, e.g. "uint16"."""
    max_token_id: int | None
    """Largest token id in the .bin; None when the tokens were not scanned."""


def check_indexed_dataset(
    prefix: str | os.PathLike[str],
    *,
    vocab_size: int,
    scan_tokens: bool = True,
    progress: bool = False,
    multimodal: bool = False,
) -> IndexedDataSummary:
    """Check one megatron-core indexed dataset before training reads it.

    Checks that both files exist, the .idx header (magic, version, dtype code) and its exact size,
    the sequence lengths, pointers and document indices, that the .bin holds exactly the tokens
    the index describes, that the dataset is not empty and, with scan_tokens, that every token id
    lies in [0, vocab_size).

    Args:
        prefix: Path prefix of the pair, the `.bin` and `.idx` are appended to it.
        vocab_size: The model's vocabulary size; every token id must be below it.
        scan_tokens: Read the whole .bin (`SCAN_CHUNK_TOKENS` at a time) to check token ids;
            without it the check reads only the .idx and the size of the .bin.
        progress: Print "checked X/Y GiB of FILE" lines to stderr while scanning large files.
        multimodal: The index carries per-sequence modes (megatron's multimodal datasets).

    Returns:
        The counts of the dataset, and its largest token id when scanned.

    Raises:
        DataError: A file is missing or malformed, or a token id is out of range; the message
            names the file, the numbers and the fix.
        TypeError: vocab_size is not an int.
        ValueError: vocab_size is not positive.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int | np.integer):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    vocab_size = int(vocab_size)
    prefix = os.fspath(prefix)
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    _check_exists(prefix, bin_path, idx_path)

    dtype, num_sequences, num_doc_indices = _read_header(idx_path, multimodal)
    num_tokens = _check_index_arrays(idx_path, dtype, num_sequences, num_doc_indices)
    _check_bin_size(bin_path, idx_path, dtype, num_tokens)
    if num_tokens == 0:
        raise DataError(
            f"{idx_path}: empty dataset: its {num_sequences} sequences hold 0 tokens; training "
            f"needs at least one token; {_REBUILD}, or drop {prefix!r} from data.paths"
        )
    max_id = None
    if scan_tokens:
        max_id = _scan_tokens(
            bin_path, idx_path, dtype, num_sequences, num_tokens, vocab_size, progress
        )
    return IndexedDataSummary(
        prefix=prefix,
        num_sequences=num_sequences,
        num_documents=num_doc_indices - 1,
        num_tokens=num_tokens,
        dtype=dtype.name,
        max_token_id=max_id,
    )


def check_indexed_datasets(
    prefixes: Iterable[str | os.PathLike[str]],
    *,
    vocab_size: int,
    scan_tokens: bool = True,
    progress: bool = False,
    multimodal: bool = False,
) -> list[IndexedDataSummary]:
    """Check several indexed datasets, reporting every bad one together.

    Args:
        prefixes: Path prefixes of the pairs (e.g. DataConfig.paths).
        vocab_size: The model's vocabulary size; every token id must be below it.
        scan_tokens: Read every .bin to check token ids.
        progress: Print progress lines to stderr while scanning large files.
        multimodal: The indices carry per-sequence modes.

    Returns:
        One summary per prefix, in order.

    Raises:
        DataError: No prefix given, one dataset is bad (its own message), or several are (one line per dataset
            after a first line counting them).
        TypeError, ValueError: vocab_size is not a positive int.
    """
    prefixes = [os.fspath(p) for p in prefixes]
    if not prefixes:
        raise DataError("no indexed dataset prefix given: pass at least one (data.paths)")
    summaries: list[IndexedDataSummary] = []
    errors: list[DataError] = []
    for prefix in prefixes:
        try:
            summaries.append(
                check_indexed_dataset(
                    prefix,
                    vocab_size=vocab_size,
                    scan_tokens=scan_tokens,
                    progress=progress,
                    multimodal=multimodal,
                )
            )
        except DataError as error:
            errors.append(error)
    _raise_all(errors, f"{len(errors)} of {len(prefixes)} indexed datasets are bad")
    return summaries


def _raise_all(errors: list[DataError], heading: str) -> None:
    """Raise the one error, or all of them under `heading`, one line each; nothing if none."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        lines = "\n".join(f"- {error}" for error in errors)
        raise DataError(f"{heading}:\n{lines}")


def check_files_exist(prefixes: Iterable[str]) -> None:
    """Check that every prefix's .bin and .idx files exist (nothing is read).

    Raises:
        DataError: naming every prefix with a missing file and the fix.
    """
    prefixes = [os.fspath(p) for p in prefixes]
    errors = []
    for prefix in prefixes:
        try:
            _check_exists(prefix, f"{prefix}.bin", f"{prefix}.idx")
        except DataError as error:
            errors.append(error)
    _raise_all(errors, f"{len(errors)} of {len(prefixes)} indexed datasets are missing files")


def _check_exists(prefix: str, bin_path: str, idx_path: str) -> None:
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if not missing:
        return
    if len(missing) == 2:
        what = f"dataset prefix {prefix!r}: neither {bin_path} nor {idx_path} exists"
    else:
        present = idx_path if missing[0] == bin_path else bin_path
        what = f"{missing[0]} is missing (its pair {present} exists)"
    stem, ext = os.path.splitext(prefix)
    if ext in (".bin", ".idx"):
        fix = (
            f"give the prefix without the extension: {stem!r} instead of {prefix!r} "
            "(megatron appends .bin and .idx itself)"
        )
    elif len(missing) == 1:
        fix = f"copy the missing file next to its pair, or {_REBUILD}"
    else:
        found = _prefixes_in(Path(prefix).parent)
        if found:
            listed = ", ".join(repr(p) for p in found[:5]) + (", ..." if len(found) > 5 else "")
            fix = f"check the path; dataset prefixes in {Path(prefix).parent}: {listed}"
        else:
            fix = (
                "check the path, or build a dataset: the embedded default corpus with "
                "`python -m megatron_ext.data.default_corpus --out DIR` (prefix "
                "DIR/train_text_document), or your own files with tools/preprocess_data.py"
            )
    raise DataError(f"{what}; {fix}")


def _prefixes_in(directory: Path) -> list[str]:
    """Prefixes of the complete .bin/.idx pairs directly inside directory, sorted."""
    try:
        names = {p.name for p in directory.iterdir() if p.is_file()}
    except OSError:
        return []
    return sorted(
        str(directory / n[: -len(".bin")])
        for n in names
        if n.endswith(".bin") and n[: -len(".bin")] + ".idx" in names
    )


def _read_header(idx_path: str, multimodal: bool) -> tuple[np.dtype, int, int]:
    """Check the header and the exact .idx size; return (dtype, seq_count, doc_count)."""
    actual = os.path.getsize(idx_path)
    if actual < HEADER_BYTES:
        raise DataError(
            f"{idx_path}: index file too short: {actual} bytes, the header alone takes "
            f"{HEADER_BYTES}; the file is truncated or not an index; {_REBUILD}"
        )
    with open(idx_path, "rb") as stream:
        header = stream.read(HEADER_BYTES)
    magic = header[: len(INDEX_MAGIC)]
    if magic != INDEX_MAGIC:
        raise DataError(
            f"{idx_path}: not a megatron-core index file: it starts with {magic!r}, expected "
            f"{INDEX_MAGIC!r}; check that the path points at an indexed dataset, or {_REBUILD}"
        )
    version, code, seq_count, doc_count = struct.unpack_from("<QBQQ", header, len(INDEX_MAGIC))
    if version != INDEX_VERSION:
        raise DataError(
            f"{idx_path}: index version {version}, expected {INDEX_VERSION} (the only version "
            f"megatron-core reads); the header is corrupt; {_REBUILD}"
        )
    dtype = INDEX_DTYPES.get(code)
    if dtype is None:
        known = ", ".join(f"{c}={d.name}" for c, d in INDEX_DTYPES.items())
        raise DataError(
            f"{idx_path}: unknown token dtype code {code} in the header (known: {known}); the "
            f"header is corrupt; {_REBUILD}"
        )
    if dtype.kind == "f":
        raise DataError(
            f"{idx_path}: token dtype {dtype.name} cannot hold token ids (they are integers); "
            f"{_REBUILD} with an integer dtype (uint16 or int32)"
        )
    # [lengths int32 | pointers int64 | doc_index int64 | modes int8 if multimodal]
    per_sequence = 4 + 8 + (1 if multimodal else 0)
    expected = HEADER_BYTES + per_sequence * seq_count + 8 * doc_count
    if actual != expected:
        kind = "truncated" if actual < expected else "longer than its header says"
        hint = ""
        if not multimodal and actual == expected + seq_count:
            hint = " (the extra bytes match per-sequence modes: pass multimodal=True if it is)"
        raise DataError(
            f"{idx_path}: index file {kind}: {actual} bytes, but its header ({seq_count} "
            f"sequences, {doc_count} document indices) implies {expected} bytes "
            f"({abs(actual - expected)} bytes {'missing' if actual < expected else 'extra'})"
            f"{hint}; {_REBUILD}"
        )
    if doc_count == 0:
        raise DataError(
            f"{idx_path}: the index holds no document indices (at least the leading 0 is "
            f"required); {_REBUILD}"
        )
    if seq_count == 0:
        raise DataError(
            f"{idx_path}: empty dataset: 0 sequences, 0 tokens; training needs at least one "
            f"token; {_REBUILD}, or drop this prefix from data.paths"
        )
    return dtype, seq_count, doc_count


def _check_index_arrays(idx_path: str, dtype: np.dtype, seq_count: int, doc_count: int) -> int:
    """Check lengths, pointers and document indices; return the number of tokens they describe."""
    itemsize = dtype.itemsize
    lengths_at = HEADER_BYTES
    pointers_at = lengths_at + 4 * seq_count
    docs_at = pointers_at + 8 * seq_count
    step = INDEX_CHUNK_ENTRIES
    next_pointer = 0  # byte offset where the next sequence must start
    for start in range(0, seq_count, step):
        count = min(step, seq_count - start)
        lengths = _read_array(idx_path, np.int32, lengths_at, start, count).astype(np.int64)
        negative = np.flatnonzero(lengths < 0)
        if negative.size:
            i = start + int(negative[0])
            raise DataError(
                f"{idx_path}: sequence {i} has negative length {int(lengths[negative[0]])}; the "
                f"index is corrupt; {_REBUILD}"
            )
        pointers = _read_array(idx_path, np.int64, pointers_at, start, count)
        ends = next_pointer + np.cumsum(lengths * itemsize)  # [count] end byte of each sequence
        expected = np.concatenate(([next_pointer], ends[:-1]))  # [count]
        wrong = np.flatnonzero(pointers != expected)
        if wrong.size:
            i = start + int(wrong[0])
            rule = (
                "the first pointer must be 0"
                if i == 0
                else f"pointer[{i}] must equal pointer[{i - 1}] + length[{i - 1}] * {itemsize}"
            )
            raise DataError(
                f"{idx_path}: sequence pointer {i} is {int(pointers[wrong[0]])}, expected "
                f"{int(expected[wrong[0]])} ({rule}, {dtype.name} tokens); the index is "
                f"corrupt; {_REBUILD}"
            )
        next_pointer = int(ends[-1])

    previous = None
    for start in range(0, doc_count, step):
        count = min(step, doc_count - start)
        docs = _read_array(idx_path, np.int64, docs_at, start, count)
        if start == 0 and docs[0] != 0:
            raise DataError(
                f"{idx_path}: document index 0 is {int(docs[0])}, expected 0 (documents start "
                f"at the first sequence); the index is corrupt; {_REBUILD}"
            )
        joined = docs if previous is None else np.concatenate(([previous], docs))
        down = np.flatnonzero(np.diff(joined) < 0)
        if down.size:
            j = int(down[0])  # joined[j + 1] < joined[j]
            i = start + j + (1 if previous is None else 0)  # index of joined[j + 1] in the file
            raise DataError(
                f"{idx_path}: document indices decrease at {i}: {int(joined[j])} then "
                f"{int(joined[j + 1])} (they must be non-decreasing sequence indices); the index "
                f"is corrupt; {_REBUILD}"
            )
        previous = int(docs[-1])
    if previous != seq_count:
        raise DataError(
            f"{idx_path}: the last document index is {previous}, expected {seq_count} (the "
            f"number of sequences); the index is corrupt; {_REBUILD}"
        )
    return next_pointer // itemsize


def _read_array(path: str, dtype: type[np.generic], at: int, start: int, count: int) -> np.ndarray:
    """Entries start..start+count of the array of dtype at byte offset `at` of path."""
    size = np.dtype(dtype).itemsize
    with open(path, "rb") as stream:
        return np.fromfile(stream, dtype=dtype, count=count, offset=at + start * size)


def _check_bin_size(bin_path: str, idx_path: str, dtype: np.dtype, num_tokens: int) -> None:
    itemsize = dtype.itemsize
    expected = num_tokens * itemsize
    actual = os.path.getsize(bin_path)
    if actual == expected:
        return
    diff = abs(actual - expected)
    tokens = f"{diff // itemsize} tokens" if diff % itemsize == 0 else "not a whole token"
    described = (
        f"its index {idx_path} describes {num_tokens} {dtype.name} tokens = {expected} bytes"
    )
    if actual < expected:
        raise DataError(
            f"{bin_path}: data file truncated: {actual} bytes, but {described}; {diff} bytes "
            f"({tokens}) missing; the copy or the write was cut short; {_REBUILD} or copy the "
            "file again"
        )
    raise DataError(
        f"{bin_path}: data file has {diff} extra bytes ({tokens}): {actual} bytes, but "
        f"{described}; the .bin and .idx do not belong together; {_REBUILD}"
    )


def _scan_tokens(
    bin_path: str,
    idx_path: str,
    dtype: np.dtype,
    seq_count: int,
    num_tokens: int,
    vocab_size: int,
    progress: bool,
) -> int:
    """Scan every token id in chunks; return the largest, raise if any is outside the vocab."""
    itemsize = dtype.itemsize
    total_bytes = num_tokens * itemsize
    signed = dtype.kind == "i"
    max_id: int | None = None
    min_id: int | None = None
    first_bad: int | None = None  # global token position of the first out-of-range id
    bad_count = 0
    reported = 0
    for start in range(0, num_tokens, SCAN_CHUNK_TOKENS):
        count = min(SCAN_CHUNK_TOKENS, num_tokens - start)
        # One small mapping per chunk, dropped after it: the scan never holds the whole file.
        chunk = np.memmap(bin_path, dtype=dtype, mode="r", offset=start * itemsize, shape=(count,))
        chunk_max = int(chunk.max())
        chunk_min = int(chunk.min()) if signed else 0
        max_id = chunk_max if max_id is None else max(max_id, chunk_max)
        min_id = chunk_min if min_id is None else min(min_id, chunk_min)
        if chunk_max >= vocab_size or chunk_min < 0:
            bad_mask = chunk < 0 if chunk_min < 0 else np.zeros(count, dtype=bool)
            if chunk_max >= vocab_size:  # then vocab_size <= chunk_max fits the dtype
                bad_mask |= chunk >= vocab_size
            bad = np.flatnonzero(bad_mask)
            bad_count += int(bad.size)
            if first_bad is None:
                first_bad = start + int(bad[0])
        del chunk
        done = (start + count) * itemsize
        if (
            progress
            and total_bytes > PROGRESS_EVERY_BYTES
            and (done - reported >= PROGRESS_EVERY_BYTES or done == total_bytes)
        ):
            print(
                f"checked {done / _GIB:.2f}/{total_bytes / _GIB:.2f} GiB of {bin_path}",
                file=sys.stderr,
                flush=True,
            )
            reported = done
    assert max_id is not None and min_id is not None  # num_tokens > 0
    if first_bad is None:
        return max_id

    value = int(np.fromfile(bin_path, dtype=dtype, count=1, offset=first_bad * itemsize)[0])
    sequence, offset, document = _locate(idx_path, seq_count, itemsize, first_bad)
    where = (
        f"first at token {first_bad} (sequence {sequence}, token {offset} of it; "
        f"document {document}): id {value}"
    )
    counted = f"{bad_count} of {num_tokens} tokens out of range"
    if min_id < 0:
        raise DataError(
            f"{bin_path}: negative token ids (smallest {min_id}, largest {max_id}; vocab_size "
            f"{vocab_size}); {counted}, {where}; token ids are never negative, so the data is "
            f"corrupt or was written with another dtype; {_REBUILD}"
        )
    raise DataError(
        f"{bin_path}: token id {max_id} is outside the vocabulary (vocab_size {vocab_size}, ids "
        f"must be < {vocab_size}); {counted}, {where}; set model.vocab_size >= {max_id + 1}, or "
        "train with the tokenizer the data was made with"
    )


def _locate(idx_path: str, seq_count: int, itemsize: int, position: int) -> tuple[int, int, int]:
    """(sequence, token within it, document) of a global token position; the index is valid."""
    pointers_at = HEADER_BYTES + 4 * seq_count
    pointers = np.memmap(idx_path, dtype=np.int64, mode="r", offset=pointers_at, shape=(seq_count,))
    # side="right": empty sequences share their successor's pointer; take the last, non-empty one
    sequence = int(np.searchsorted(pointers, position * itemsize, side="right")) - 1
    offset = position - int(pointers[sequence]) // itemsize
    del pointers
    with open(idx_path, "rb") as stream:
        doc_count = struct.unpack_from("<Q", stream.read(HEADER_BYTES), HEADER_BYTES - 8)[0]
    docs_at = HEADER_BYTES + 12 * seq_count
    docs = np.memmap(idx_path, dtype=np.int64, mode="r", offset=docs_at, shape=(doc_count,))
    document = int(np.searchsorted(docs, sequence, side="right")) - 1
    del docs
    return sequence, offset, document
