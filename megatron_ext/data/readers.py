"""Reading documents from local jsonl / parquet / text files (or a hub dataset) with `datasets`.

Every input is loaded on its own so that a bad record can be reported by file and line (jsonl and
text files) or record number (parquet, JSON arrays, hub datasets).
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import io
import json
import lzma
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from megatron_ext.data.errors import DataError

if TYPE_CHECKING:
    import datasets

__all__ = [
    "InputSource",
    "SourceKind",
    "TextSampleBy",
    "SUPPORTED_SUFFIXES",
    "resolve_inputs",
    "load_source",
    "iter_texts",
]

SourceKind = Literal["json", "parquet", "text", "hub"]
TextSampleBy = Literal["line", "paragraph", "document"]

_KIND_BY_SUFFIX: dict[str, SourceKind] = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".rst": "text",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(sorted(_KIND_BY_SUFFIX))
"""File suffixes read by the pipeline (text and jsonl files may also end in .gz, .bz2 or .xz)."""

TEXT_COLUMN = "text"
"""The name of the single column of the datasets returned by `load_source`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputSource:
    """One input: a local file or a Hugging Face hub dataset name."""

    name: str
    """The file path (or the hub dataset name) as reported in messages."""
    kind: SourceKind
    """How the input is read: the `datasets` builder, or "hub" for a hub dataset name."""

    @property
    def path(self) -> Path | None:
        """The local file, or None for a hub dataset."""
        return None if self.kind == "hub" else Path(self.name)

    @property
    def label(self) -> str:
        """"file '<path>'" or "hub dataset '<name>'", for messages."""
        return f"hub dataset {self.name!r}" if self.kind == "hub" else f"file {self.name!r}"

    def locate(self, record: int, *, sample_by: TextSampleBy = "line") -> str:
        """Describe where record `record` (0-based) of this input is, for error messages.

        Args:
            record: The 0-based record index inside this input.
            sample_by: How text files were split into documents.

        Returns:
            For example "file 'a.jsonl', line 4" or "file 'b.parquet', record 3".
        """
        where = self.label
        if self.kind == "hub":
            return f"{where}, record {record + 1}"
        if self.kind == "json":
            line = _json_line_of_record(Path(self.name), record)
            if line is not None:
                return f"{where}, line {line}"
        elif self.kind == "text":
            if sample_by == "line":
                return f"{where}, line {record + 1}"
            if sample_by == "paragraph":
                return f"{where}, paragraph {record + 1}"
            return where
        return f"{where}, record {record + 1}"


def _kind_of(path: Path) -> SourceKind | None:
    """The builder kind of a file from its suffix (ignoring a compression suffix)."""
    name = path.name.lower()
    for comp in _COMPRESSION_SUFFIXES:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    return _KIND_BY_SUFFIX.get(Path(name).suffix)


def resolve_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[InputSource]:
    """Expand the inputs into an ordered list of sources.

    A file is read by its suffix (see `SUPPORTED_SUFFIXES`); a directory stands for every supported
    file below it, sorted; a glob pattern for its sorted matches. Anything else that does not look
    like a path is taken as a Hugging Face hub dataset name (loaded only when the machine is
    online).

    Args:
        inputs: Files, directories, glob patterns or hub dataset names.

    Returns:
        The sources, in the order given (directory and glob expansions sorted).

    Raises:
        DataError: No inputs, a missing file, an unsupported suffix, or an empty expansion.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no input given: pass at least one jsonl, parquet or text file")
    sources: list[InputSource] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_file():
            kind = _kind_of(path)
            if kind is None:
                raise DataError(
                    f"cannot tell the format of input file {text!r} from its suffix; supported "
                    f"suffixes: {', '.join(SUPPORTED_SUFFIXES)} (optionally compressed "
                    ".gz/.bz2/.xz)"
                )
            sources.append(InputSource(name=text, kind=kind))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind_of(p) is not None)
            if not found:
                raise DataError(
                    f"input directory {text!r} holds no file with a supported suffix "
                    f"({', '.join(SUPPORTED_SUFFIXES)})"
                )
            sources.extend(InputSource(name=str(p), kind=_kind_of(p)) for p in found)
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            files = [m for m in matches if m.is_file() and _kind_of(m) is not None]
            if not files:
                raise DataError(f"input pattern {text!r} matches no supported file")
            sources.extend(InputSource(name=str(m), kind=_kind_of(m)) for m in files)
        elif (
            _kind_of(path) is not None
            or text.startswith((".", "/", "~"))
            or (path.parent != Path(".") and path.parent.is_dir())
        ):
            raise DataError(f"input file {text!r} does not exist")
        else:
            sources.append(InputSource(name=text, kind="hub"))
    return sources


def _open_text(path: Path) -> io.TextIOBase:
    """Open a possibly compressed text file for reading."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", errors="replace")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _is_json_array(path: Path) -> bool:
    """Whether a JSON file holds one array of records (rather than one record per line)."""
    with _open_text(path) as stream:
        while chunk := stream.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith("[")
    return False


def _has_content(path: Path) -> bool:
    """Whether a text file holds anything but whitespace."""
    with _open_text(path) as stream:
        while chunk := stream.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _json_line_of_record(path: Path, record: int) -> int | None:
    """The 1-based line of the record-th (0-based) record of a jsonl file (blank lines skipped).

    Returns None for a JSON-array file or when the file has fewer records.
    """
    if _is_json_array(path):
        return None
    seen = -1
    with _open_text(path) as stream:
        for lineno, line in enumerate(stream, start=1):
            if line.strip():
                seen += 1
                if seen == record:
                    return lineno
    return None


def _diagnose_json(source: InputSource, text_field: str) -> str | None:
    """Find the first bad line of a jsonl file the loader could not read, for the message."""
    path = Path(source.name)
    if _is_json_array(path):
        return None
    with _open_text(path) as stream:
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                return (
                    f"{source.label}, line {lineno}: invalid JSON ({err.msg} at column "
                    f"{err.colno})"
                )
            if not isinstance(obj, dict):
                return (
                    f"{source.label}, line {lineno}: expected a JSON object with a "
                    f"{text_field!r} field, got a {type(obj).__name__}"
                )
            value = obj.get(text_field)
            if value is not None and not isinstance(value, str):
                return (
                    f"{source.label}, line {lineno}: field {text_field!r} is a "
                    f"{type(value).__name__}, expected a string"
                )
    return None


def _record_fields(source: InputSource, ds: datasets.Dataset, record: int) -> list[str]:
    """The fields that record `record` actually has (non-null), for 'missing field' messages."""
    if source.kind == "json" and not _is_json_array(Path(source.name)):
        line = _json_line_of_record(Path(source.name), record)
        if line is not None:
            with _open_text(Path(source.name)) as stream:
                for lineno, text in enumerate(stream, start=1):
                    if lineno == line:
                        try:
                            obj = json.loads(text)
                        except json.JSONDecodeError:
                            break
                        return sorted(obj) if isinstance(obj, dict) else []
    row = ds[record]
    return sorted(k for k, v in row.items() if v is not None)


def _empty_text_dataset() -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict(
        {TEXT_COLUMN: []}, features=datasets.Features({TEXT_COLUMN: datasets.Value("string")})
    )


def load_source(
    source: InputSource,
    *,
    text_field: str = "text",
    cache_dir: str | os.PathLike[str] | None = None,
    sample_by: TextSampleBy = "line",
    hub_split: str = "train",
) -> datasets.Dataset:
    """Load one input as a dataset with a single string column "text", checked record by record.

    Args:
        source: The input.
        text_field: The field holding the document text (jsonl, parquet, hub); text files always
            use their own text.
        cache_dir: The `datasets` cache directory for the Arrow files (default: the `datasets` one).
        sample_by: How a text file is split into documents: one per line (default, empty lines
            are skipped later), per blank-line separated paragraph, or the whole file.
        hub_split: The split of a hub dataset.

    Returns:
        The dataset, in file order, with no null text (records may be empty strings).

    Raises:
        DataError: Unreadable file (with the bad line where one can be found), missing text field
            (naming the field, file, line and the fields that exist), or a non-string text field.
    """
    import datasets
    import pyarrow.compute as pc

    cache = None if cache_dir is None else os.fspath(cache_dir)
    field = TEXT_COLUMN if source.kind == "text" else text_field
    if source.kind != "hub" and (
        Path(source.name).stat().st_size == 0
        or (source.kind == "json" and not _has_content(Path(source.name)))
    ):
        return _empty_text_dataset()
    try:
        if source.kind == "hub":
            ds = datasets.load_dataset(source.name, split=hub_split, cache_dir=cache)
        elif source.kind == "text":
            ds = datasets.load_dataset(
                "text",
                data_files=[source.name],
                split="train",
                cache_dir=cache,
                sample_by=sample_by,
            )
        else:
            ds = datasets.load_dataset(
                source.kind, data_files=[source.name], split="train", cache_dir=cache
            )
    except StopIteration:  # a jsonl file of blank lines only
        return _empty_text_dataset()
    except Exception as err:  # noqa: BLE001 - turned into a message naming the file and line
        detail = _diagnose_json(source, field) if source.kind == "json" else None
        if detail is None:
            cause = err.__cause__ or err
            detail = f"could not read {source.label}: {cause}"
        raise DataError(detail) from err
    if ds.num_rows == 0:
        return _empty_text_dataset()
    if field not in ds.column_names:
        raise DataError(
            f"{source.locate(0, sample_by=sample_by)}: no field {field!r} (text field); "
            f"the fields that exist are {sorted(ds.column_names)}; pick one with "
            f"--text-field / text_field="
        )
    feature = ds.features[field]
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string", "null"):
        detail = _diagnose_json(source, field) if source.kind == "json" else None
        if detail is not None:
            raise DataError(detail)
        raise DataError(
            f"{source.label}: field {field!r} holds {feature}, expected strings; "
            f"choose the text field with --text-field / text_field="
        )
    column = ds.data.column(field)
    if column.null_count:
        first = int(pc.index(pc.is_null(column), True).as_py())
        raise DataError(
            f"{source.locate(first, sample_by=sample_by)}: record has no field {field!r} (text "
            f"field); its fields are {_record_fields(source, ds, first)}"
        )
    ds = ds.select_columns([field])
    if field != TEXT_COLUMN:
        ds = ds.rename_column(field, TEXT_COLUMN)
    if dtype != "string":
        ds = ds.cast_column(TEXT_COLUMN, datasets.Value("string"))
    return ds


def iter_texts(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    text_field: str = "text",
    sample_by: TextSampleBy = "line",
    skip_empty: bool = True,
) -> Iterator[str]:
    """Yield the texts of local files in order, without `datasets` (for tokenizer training).

    Args:
        inputs: Files, directories or glob patterns (no hub names).
        text_field: The field holding the text in jsonl / parquet records.
        sample_by: How text files are split into documents (see `load_source`).
        skip_empty: Skip documents that are empty or whitespace only.

    Yields:
        The texts.

    Raises:
        DataError: As `resolve_inputs` and `load_source`.
    """
    for source in resolve_inputs(inputs):
        if source.kind == "hub":
            raise DataError(f"iter_texts reads local files only, got hub dataset {source.name!r}")
        if source.kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(source.name)
            if text_field not in table.column_names:
                raise DataError(
                    f"{source.locate(0)}: no field {text_field!r} (text field); the fields that "
                    f"exist are {sorted(table.column_names)}"
                )
            texts = table.column(text_field).to_pylist()
        elif source.kind == "json" and _is_json_array(Path(source.name)):
            with _open_text(Path(source.name)) as stream:
                records = json.load(stream)
            texts = [_json_text(r, text_field, source, i) for i, r in enumerate(records)]
        elif source.kind == "json":
            texts = _iter_jsonl_texts(source, text_field)
        else:
            texts = _iter_text_file(Path(source.name), sample_by)
        for index, text in enumerate(texts):
            if text is None:
                raise DataError(f"{source.locate(index)}: record has no field {text_field!r}")
            if skip_empty and not text.strip():
                continue
            yield text


def _json_text(obj: object, field: str, source: InputSource, index: int) -> str:
    if not isinstance(obj, dict) or field not in obj:
        fields = sorted(obj) if isinstance(obj, dict) else []
        raise DataError(
            f"{source.locate(index)}: record has no field {field!r} (text field); its fields are "
            f"{fields}"
        )
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(
            f"{source.locate(index)}: field {field!r} is a {type(value).__name__}, expected a "
            "string"
        )
    return value


def _iter_jsonl_texts(source: InputSource, field: str) -> Iterator[str]:
    with _open_text(Path(source.name)) as stream:
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"file {source.name!r}, line {lineno}: invalid JSON ({err.msg})"
                ) from err
            if not isinstance(obj, dict) or field not in obj or not isinstance(obj[field], str):
                fields = sorted(obj) if isinstance(obj, dict) else []
                raise DataError(
                    f"file {source.name!r}, line {lineno}: record has no string field {field!r} "
                    f"(text field); its fields are {fields}"
                )
            yield obj[field]


def _iter_text_file(path: Path, sample_by: TextSampleBy) -> Iterator[str]:
    with _open_text(path) as stream:
        if sample_by == "line":
            for line in stream:
                yield line.rstrip("\r\n")
        elif sample_by == "paragraph":
            yield from stream.read().split("\n\n")
        else:
            yield stream.read()
