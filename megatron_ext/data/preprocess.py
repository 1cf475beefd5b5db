"""Tokenize documents and write megatron-core indexed datasets (.bin/.idx).

Inputs are read with Hugging Face `datasets` (see `megatron_ext.data.readers`), tokenized in
parallel (`datasets.Dataset.map`, batched, `num_proc` workers), an end-of-document token is
appended to every document, and the result is written with megatron-core's own
`IndexedDatasetBuilder` under temporary names that are renamed into place (.bin first, .idx last)
only once complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)
from tqdm.auto import tqdm

from megatron_ext.data.errors import DataError
from megatron_ext.data.readers import (
    TEXT_COLUMN,
    InputSource,
    TextSampleBy,
    load_source,
    resolve_inputs,
)
from megatron_ext.data.tokenizer import (
    check_model_vocab_size,
    load_tokenizer,
    resolve_eod_id,
    tokenizer_vocab_size,
)

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["PreprocessResult", "TOKEN_DTYPES", "choose_token_dtype", "preprocess"]

TOKEN_DTYPES: dict[str, type[np.integer]] = {
    "uint16": np.uint16,
    "int32": np.int32,
    "int64": np.int64,
}
"""The token dtypes `preprocess` writes (megatron-core's DType codes 8, 4 and 5)."""
_IDS = "input_ids"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreprocessResult:
    """What `preprocess` wrote."""

    output_prefix: str
    """The dataset prefix (what megatron-core's blend / --data-path takes)."""
    bin_path: str
    """The data file, `output_prefix + ".bin"`."""
    idx_path: str
    """The index file, `output_prefix + ".idx"`."""
    num_documents: int
    """Documents written (empty and whitespace-only records are skipped)."""
    num_tokens: int
    """Tokens written, end-of-document tokens included."""
    num_skipped: int
    """Records skipped because their text was empty or whitespace only."""
    dtype: str
    """The numpy dtype of the token ids in the .bin file."""
    vocab_size: int
    """The tokenizer's vocabulary size."""
    eod_id: int
    """The end-of-document token id (appended to every document when `append_eod`)."""
    inputs: tuple[str, ...]
    """The inputs read, in order (directories and patterns expanded)."""
    seconds: float
    """Wall-clock time of the whole run."""


def choose_token_dtype(vocab_size: int, dtype: str | None = None) -> type[np.integer]:
    """The numpy dtype of the token ids.

    Args:
        vocab_size: The tokenizer's vocabulary size.
        dtype: "uint16", "int32" or "int64"; None chooses megatron-core's
            `DType.optimal_dtype(vocab_size)` (uint16 below 65500 tokens, else int32).

    Returns:
        The numpy dtype.

    Raises:
        DataError: An unknown dtype name.
    """
    if dtype is None:
        return DType.optimal_dtype(vocab_size)
    try:
        return TOKEN_DTYPES[str(dtype)]
    except KeyError:
        raise DataError(
            f"unknown token dtype {dtype!r}; choose one of {sorted(TOKEN_DTYPES)} or leave it "
            "unset to choose from the vocabulary size"
        ) from None


def _tokenize_batch(
    batch: dict[str, list[str]],
    *,
    tokenizer: PreTrainedTokenizerBase,
    eod_id: int,
    append_eod: bool,
) -> dict[str, list[list[int]]]:
    """`datasets.map` function: token ids (+ eod) per text; [] for empty / whitespace texts."""
    texts = batch[TEXT_COLUMN]
    keep = [i for i, text in enumerate(texts) if text.strip()]
    out: list[list[int]] = [[] for _ in texts]
    if keep:
        encoded = tokenizer(
            [texts[i] for i in keep],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )[_IDS]
        for i, ids in zip(keep, encoded, strict=True):
            out[i] = list(ids) + [eod_id] if append_eod else list(ids)
    return {_IDS: out}


@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """Enable or disable the `datasets` progress bars for a block, restoring the setting after."""
    from datasets.utils import logging as ds_logging

    before = ds_logging.is_progress_bar_enabled()
    if enabled:
        ds_logging.enable_progress_bar()
    else:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            ds_logging.enable_progress_bar()
        else:
            ds_logging.disable_progress_bar()


def _chunks(ds: datasets.Dataset, batch_size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, flat token ids, per-row lengths) of the token-id column, in row order."""
    row = 0
    for table in ds.with_format("arrow").iter(batch_size=batch_size):
        column = table.column(_IDS).combine_chunks()
        lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        values = column.flatten().to_numpy(zero_copy_only=False)
        yield row, values, lengths
        row += len(lengths)


def _locate(sources: list[tuple[InputSource, int]], row: int, sample_by: TextSampleBy) -> str:
    """Describe global row `row` of the concatenated inputs (file and line / record)."""
    for source, start in reversed(sources):
        if row >= start:
            return source.locate(row - start, sample_by=sample_by)
    raise AssertionError(row)


def _cleanup(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def preprocess(
    inputs: Sequence[str | os.PathLike[str]],
    output_prefix: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase,
    *,
    text_field: str = "text",
    workers: int | None = None,
    append_eod: bool = True,
    model_vocab_size: int | None = None,
    dtype: str | None = None,
    eod_token: str | None = None,
    sample_by: TextSampleBy = "line",
    hub_split: str = "train",
    batch_size: int = 1000,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> PreprocessResult:
    """Tokenize documents and write a megatron-core indexed dataset `output_prefix`.bin/.idx.

    Every record with non-empty text becomes one document (one sequence) of token ids followed by
    the end-of-document token. Empty and whitespace-only records are skipped (and counted).
    Nothing is written until every input has been read and checked; the files are written under
    temporary names and renamed into place (.bin, then .idx) when complete, and removed on
    failure. An existing dataset at `output_prefix` is replaced.

    Args:
        inputs: jsonl / parquet / text files, directories, glob patterns, or a hub dataset name
            (see `megatron_ext.data.readers.resolve_inputs`).
        output_prefix: The prefix of the .bin/.idx files (parent directories are created).
        tokenizer: A tokenizer directory, a tokenizer.json file, a hub name, or a loaded tokenizer.
        text_field: The field holding the text in jsonl / parquet / hub records.
        workers: Tokenization processes (default: the number of CPUs); fewer are used for small
            inputs.
        append_eod: Append the end-of-document token to every document.
        model_vocab_size: The model's vocabulary size; the tokenizer's must not exceed it.
        dtype: The token dtype ("uint16", "int32", "int64"); default from the vocabulary size.
        eod_token: The end-of-document token (default: the tokenizer's eos token).
        sample_by: How text files are split into documents: "line", "paragraph" or "document".
        hub_split: The split of a hub dataset.
        batch_size: Records per tokenization batch and per write chunk.
        cache_dir: Where `datasets` keeps its Arrow files; default: a temporary directory next
            to the output, removed at the end.
        progress: Show progress bars (tokenization and writing).

    Returns:
        What was written.

    Raises:
        DataError: Bad input (missing text field, unreadable record, empty corpus, token ids that
            do not fit the dtype, tokenizer vocabulary larger than `model_vocab_size`), each
            naming the file and line or record.
    """
    import datasets

    started = time.perf_counter()
    sources = resolve_inputs(inputs)
    if isinstance(tokenizer, (str, os.PathLike)):
        tok = load_tokenizer(tokenizer, eod_token=eod_token)
    else:
        tok = tokenizer
        if eod_token is not None:
            tok.eos_token = eod_token
    tok_name = str(tok.name_or_path)
    eod_id = resolve_eod_id(tok)
    vocab_size = tokenizer_vocab_size(tok)
    check_model_vocab_size(vocab_size, model_vocab_size, name=tok_name)
    token_dtype = choose_token_dtype(vocab_size, dtype)
    limit = int(np.iinfo(token_dtype).max)
    if append_eod and eod_id > limit:
        raise DataError(
            f"the end-of-document id {eod_id} does not fit token dtype "
            f"{np.dtype(token_dtype).name} (max {limit}); use a wider --dtype or leave it unset"
        )
    prefix = os.fspath(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    own_cache = cache_dir is None
    cache = (
        tempfile.mkdtemp(prefix=".preprocess-cache-", dir=str(Path(prefix).parent))
        if own_cache
        else os.fspath(cache_dir)
    )
    workers = max(1, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    try:
        with _datasets_progress(progress):
            located: list[tuple[InputSource, int]] = []
            parts: list[datasets.Dataset] = []
            total = 0
            for source in sources:
                part = load_source(
                    source,
                    text_field=text_field,
                    cache_dir=cache,
                    sample_by=sample_by,
                    hub_split=hub_split,
                )
                located.append((source, total))
                parts.append(part)
                total += part.num_rows
            names = ", ".join(repr(s.name) for s in sources)
            if total == 0:
                raise DataError(f"empty corpus: the inputs hold no records ({names})")
            corpus = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            num_proc = min(workers, -(-total // batch_size))
            if num_proc > 1:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            tokenized = corpus.map(
                _tokenize_batch,
                batched=True,
                batch_size=batch_size,
                num_proc=num_proc if num_proc > 1 else None,
                remove_columns=[TEXT_COLUMN],
                fn_kwargs={"tokenizer": tok, "eod_id": eod_id, "append_eod": append_eod},
                new_fingerprint=uuid.uuid4().hex,
                desc="tokenizing",
            )

        # Check everything before writing anything.
        num_documents = num_tokens = 0
        for row, values, lengths in _chunks(tokenized, batch_size):
            num_documents += int(np.count_nonzero(lengths))
            num_tokens += int(values.size)
            if values.size and (int(values.max()) > limit or int(values.min()) < 0):
                bad = int(np.flatnonzero((values > limit) | (values < 0))[0])
                doc = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
                raise DataError(
                    f"{_locate(located, row + doc, sample_by)}: token id {int(values[bad])} does "
                    f"not fit token dtype {np.dtype(token_dtype).name} (range 0..{limit}) of "
                    f"tokenizer {tok_name!r} (vocabulary size {vocab_size}); use a wider --dtype "
                    "(int32) or leave it unset to choose it from the vocabulary size"
                )
            if model_vocab_size is not None and values.size and values.max() >= model_vocab_size:
                bad = int(np.flatnonzero(values >= model_vocab_size)[0])
                doc = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
                raise DataError(
                    f"{_locate(located, row + doc, sample_by)}: token id {int(values[bad])} is "
                    f"outside the model's vocabulary (--model-vocab-size {model_vocab_size})"
                )
        if num_documents == 0:
            raise DataError(
                f"empty corpus: all {total} records of {names} are empty or whitespace only"
            )
        _write(tokenized, prefix, token_dtype, batch_size, num_documents, progress)
    finally:
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    return PreprocessResult(
        output_prefix=prefix,
        bin_path=get_bin_path(prefix),
        idx_path=get_idx_path(prefix),
        num_documents=num_documents,
        num_tokens=num_tokens,
        num_skipped=total - num_documents,
        dtype=np.dtype(token_dtype).name,
        vocab_size=vocab_size,
        eod_id=eod_id,
        inputs=tuple(s.name for s in sources),
        seconds=time.perf_counter() - started,
    )


def _write(
    tokenized: datasets.Dataset,
    prefix: str,
    token_dtype: type[np.integer],
    batch_size: int,
    num_documents: int,
    progress: bool,
) -> None:
    """Write the documents under temporary names, then rename .bin and .idx (last) into place."""
    tmp_prefix = f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_bin, tmp_idx = get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)
    final_bin, final_idx = get_bin_path(prefix), get_idx_path(prefix)
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=token_dtype)
        bar: Any = tqdm(
            total=num_documents,
            desc=f"writing {Path(prefix).name}",
            unit="doc",
            disable=not progress,
            file=sys.stderr,
        )
        with bar:
            for _, values, lengths in _chunks(tokenized, batch_size):
                values = values.astype(token_dtype, copy=False)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                written = 0
                for k in np.flatnonzero(lengths):
                    builder.add_document(values[offsets[k] : offsets[k + 1]], [int(lengths[k])])
                    written += 1
                bar.update(written)
        builder.finalize(tmp_idx)
        # An old index must never describe the new data file: drop it before moving the .bin.
        _cleanup(final_idx)
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    except BaseException:
        with contextlib.suppress(Exception):
            builder.data_file.close()  # type: ignore[possibly-undefined]
        _cleanup(tmp_bin, tmp_idx)
        raise
