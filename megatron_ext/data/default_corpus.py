"""The embedded default corpus: real text that is on every machine, built with no network.

The documents are the running interpreter's standard-library sources (one document per .py file,
test directories, site-packages and generated tables skipped, a deterministic subset up to a byte
budget) and its bundled reference documentation (`pydoc_data.topics.topics`, one document per
topic). A byte-level BPE tokenizer is trained on the training documents, and megatron-core
indexed datasets are written for a training prefix and a small held-out validation prefix,
with a manifest (counts, vocabulary size, paths, and the sha256 of the inputs and outputs).

Command line::

    python -m megatron_ext.data.default_corpus --out DIR [--vocab-size 8192] [--force]

Layout of DIR: tokenizer/ (Hugging Face format), train_text_document.bin/.idx,
valid_text_document.bin/.idx, manifest.json (written last; its presence marks a complete build).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_ext.data.errors import DataError

__all__ = [
    "CorpusDocument",
    "DefaultCorpus",
    "DefaultCorpusConfig",
    "MANIFEST_NAME",
    "build_default_corpus",
    "collect_default_documents",
    "corpus_tokens",
    "inputs_sha256",
    "main",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
"""The manifest file of a built corpus directory."""
_FORMAT = 1
_SKIPPED_DIRS = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "pydoc_data",  # included as documentation topics instead of as a 0.5 MB Python literal
        "encodings",  # generated codec tables
        "ensurepip",
        "idle_test",
        "tests",
    }
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DefaultCorpusConfig:
    """Settings of the default corpus (all but `workers` and `progress` enter the manifest)."""

    vocab_size: int = 8192
    """Tokenizer vocabulary size; a multiple of 128 (the model's embedding needs no padding)."""
    max_source_bytes: int = 4_000_000
    """Byte budget of standard-library sources (about 10 MB are available; a subset is chosen)."""
    max_file_bytes: int = 200_000
    """Source files larger than this are skipped (generated tables, huge modules)."""
    include_topics: bool = True
    """Add the bundled reference documentation topics (about 0.5 MB, 80 documents)."""
    valid_every: int = 50
    """Every `valid_every`-th document (0, valid_every, ...) is held out for validation; 0: none."""
    min_frequency: int = 2
    """Minimum pair count of a BPE merge."""
    workers: int | None = None
    """Tokenization processes (default: the number of CPUs); not part of the manifest."""

    def __post_init__(self) -> None:
        if self.vocab_size % 128 or self.vocab_size < 384:
            raise ValueError(
                f"DefaultCorpusConfig.vocab_size={self.vocab_size} must be a multiple of 128 and "
                ">= 384 (256 byte symbols, special tokens and some merges)"
            )
        if self.max_source_bytes < 0 or self.max_file_bytes <= 0 or self.valid_every in (1,) or (
            self.valid_every < 0
        ):
            raise ValueError(f"invalid DefaultCorpusConfig sizes: {self}")

    def manifest_settings(self) -> dict[str, Any]:
        """The settings that determine the output (everything but `workers`)."""
        settings = dataclasses.asdict(self)
        settings.pop("workers")
        return settings


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorpusDocument:
    """One document of the default corpus."""

    name: str
    """"stdlib:<relative path>" or "topic:<pydoc topic>"."""
    text: str
    """The document text."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DefaultCorpus:
    """A built (or reused) default corpus."""

    out_dir: Path
    """The corpus directory."""
    tokenizer_dir: Path
    """The Hugging Face tokenizer directory (`AutoTokenizer.from_pretrained` loads it offline)."""
    train_prefix: str
    """The training dataset prefix (.bin/.idx)."""
    valid_prefix: str | None
    """The validation dataset prefix, or None when `valid_every` is 0."""
    manifest: dict[str, Any]
    """The manifest's content."""
    reused: bool
    """Whether an existing build matching the manifest was reused."""
    seconds: float
    """Time taken by this call (the build time of the manifest when reused is "build_seconds")."""

    @property
    def manifest_path(self) -> Path:
        """The manifest file."""
        return self.out_dir / MANIFEST_NAME

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return int(self.manifest["vocab_size"])

    @property
    def num_documents(self) -> int:
        """Documents in train + valid."""
        return sum(int(self.manifest["splits"][s]["documents"]) for s in self.manifest["splits"])

    @property
    def num_tokens(self) -> int:
        """Tokens in train + valid (end-of-document tokens included)."""
        return sum(int(self.manifest["splits"][s]["tokens"]) for s in self.manifest["splits"])


def _stdlib_files(root: Path, max_file_bytes: int) -> list[tuple[str, Path]]:
    """(relative path, path) of the candidate .py files of the standard library, sorted."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("test")
        )
        for filename in sorted(filenames):
            if not filename.endswith(".py") or filename.startswith("test_"):
                continue
            path = Path(dirpath) / filename
            if path.stat().st_size <= max_file_bytes:
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def collect_default_documents(config: DefaultCorpusConfig | None = None) -> list[CorpusDocument]:
    """The documents of the default corpus, deterministically (no tokenization).

    Standard-library files are taken in the order of the sha256 of their relative path while they
    fit the byte budget (a spread-out subset), then listed sorted by path, followed by the pydoc
    topics sorted by name.

    Args:
        config: The settings (default `DefaultCorpusConfig()`).

    Returns:
        The documents.
    """
    config = config or DefaultCorpusConfig()
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for rel, path in _stdlib_files(root, config.max_file_bytes):
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            candidates.append((hashlib.sha256(rel.encode()).hexdigest(), rel, text))
    chosen: list[tuple[str, str]] = []
    budget = config.max_source_bytes
    for _, rel, text in sorted(candidates):
        size = len(text.encode("utf-8"))
        if size <= budget:
            chosen.append((rel, text))
            budget -= size
    documents = [CorpusDocument(name=f"stdlib:{rel}", text=text) for rel, text in sorted(chosen)]
    if config.include_topics:
        from pydoc_data.topics import topics

        documents.extend(
            CorpusDocument(name=f"topic:{key}", text=topics[key])
            for key in sorted(topics)
            if topics[key].strip()
        )
    return documents


def inputs_sha256(documents: Sequence[CorpusDocument], config: DefaultCorpusConfig) -> str:
    """The sha256 identifying the corpus inputs: document names and texts, and the settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config.manifest_settings(), sort_keys=True).encode())
    for doc in documents:
        digest.update(doc.name.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(doc.text.encode("utf-8")).digest())
    return digest.hexdigest()


def _split(
    documents: Sequence[CorpusDocument], valid_every: int
) -> tuple[list[CorpusDocument], list[CorpusDocument]]:
    if valid_every <= 0:
        return list(documents), []
    train = [d for i, d in enumerate(documents) if i % valid_every]
    valid = [d for i, d in enumerate(documents) if i % valid_every == 0]
    return train, valid


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(
    out_dir: Path, manifest: dict[str, Any], sha: str, config: DefaultCorpusConfig
) -> bool:
    """Whether an existing build is complete and was made from the same inputs and settings."""
    if manifest.get("format") != _FORMAT or manifest.get("inputs_sha256") != sha:
        return False
    if manifest.get("config") != config.manifest_settings():
        return False
    for rel, expected in manifest.get("files_sha256", {}).items():
        path = out_dir / rel
        if not path.is_file() or _file_sha256(path) != expected:
            return False
    return bool(manifest.get("files_sha256"))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def corpus_tokens(corpus_dir: str | os.PathLike[str]) -> dict[str, int]:
    """{'vocab_size': ..., 'eod_id': ...} of a built default corpus (its manifest), or {} when
    the folder holds none; standard library only, for command lines checking their arguments."""
    manifest = _read_manifest(Path(corpus_dir) / MANIFEST_NAME)
    try:
        return {"vocab_size": int(manifest["vocab_size"]), "eod_id": int(manifest["eod_id"])}
    except (TypeError, KeyError, ValueError):
        return {}


def _corpus(out_dir: Path, manifest: dict[str, Any], reused: bool, seconds: float) -> DefaultCorpus:
    paths = manifest["paths"]
    return DefaultCorpus(
        out_dir=out_dir,
        tokenizer_dir=out_dir / paths["tokenizer"],
        train_prefix=str(out_dir / paths["train_prefix"]),
        valid_prefix=(
            None if paths["valid_prefix"] is None else str(out_dir / paths["valid_prefix"])
        ),
        manifest=manifest,
        reused=reused,
        seconds=seconds,
    )


def build_default_corpus(
    out_dir: str | os.PathLike[str],
    config: DefaultCorpusConfig | None = None,
    *,
    force: bool = False,
    progress: bool = False,
) -> DefaultCorpus:
    """Build the default corpus in `out_dir`, or reuse it when it is already there.

    An existing build is reused when its manifest records the same inputs (sha256 of the
    documents and the settings) and every output file still has the recorded sha256.

    Args:
        out_dir: The corpus directory (created if needed).
        config: The settings (default `DefaultCorpusConfig()`).
        force: Rebuild even if a matching build exists.
        progress: Show progress bars.

    Returns:
        The corpus: paths, manifest and whether it was reused.

    Raises:
        DataError: No document could be collected.
    """
    started = time.perf_counter()
    config = config or DefaultCorpusConfig()
    out = Path(out_dir)
    documents = collect_default_documents(config)
    if not documents:
        raise DataError("the default corpus is empty: no standard-library source or topic found")
    sha = inputs_sha256(documents, config)
    manifest_path = out / MANIFEST_NAME
    existing = _read_manifest(manifest_path)
    if not force and existing is not None and _matches(out, existing, sha, config):
        logger.info("default corpus at %s matches its manifest: reusing it", out)
        return _corpus(out, existing, True, time.perf_counter() - started)

    from megatron_ext.data.preprocess import preprocess  # slow imports: only when building
    from megatron_ext.data.tokenizer import train_bpe_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # the build is incomplete until the manifest is back
    train_docs, valid_docs = _split(documents, config.valid_every)
    tokenizer_dir = out / "tokenizer"
    logger.info(
        "building the default corpus in %s: %d documents (%d held out), %.2f MB of text",
        out,
        len(documents),
        len(valid_docs),
        sum(len(d.text.encode()) for d in documents) / 1e6,
    )
    tokenizer = train_bpe_tokenizer(
        (d.text for d in train_docs),
        tokenizer_dir,
        config.vocab_size,
        min_frequency=config.min_frequency,
    )
    splits: dict[str, dict[str, Any]] = {}
    prefixes: dict[str, str | None] = {"train": None, "valid": None}
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        for split, docs in (("train", train_docs), ("valid", valid_docs)):
            if not docs:
                continue
            jsonl = work / f"{split}.jsonl"
            with open(jsonl, "w", encoding="utf-8") as stream:
                for doc in docs:
                    stream.write(json.dumps({"text": doc.text, "name": doc.name}) + "\n")
            prefix = f"{split}_text_document"
            result = preprocess(
                [str(jsonl)],
                out / prefix,
                tokenizer,
                workers=config.workers,
                model_vocab_size=config.vocab_size,
                batch_size=16,
                cache_dir=work / "cache",
                progress=progress,
            )
            prefixes[split] = prefix
            splits[split] = {
                "prefix": prefix,
                "documents": result.num_documents,
                "tokens": result.num_tokens,
                "text_bytes": sum(len(d.text.encode("utf-8")) for d in docs),
                "first_documents": [d.name for d in docs[:3]],
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    files = sorted(
        [p.relative_to(out).as_posix() for p in tokenizer_dir.iterdir() if p.is_file()]
        + [f"{p}.{ext}" for p in prefixes.values() if p for ext in ("bin", "idx")]
    )
    manifest = {
        "format": _FORMAT,
        "description": "CPython standard-library sources and pydoc topics (megatron_ext default)",
        "python": sys.version.split()[0],
        "stdlib": sysconfig.get_paths()["stdlib"],
        "inputs_sha256": sha,
        "config": config.manifest_settings(),
        "num_documents": len(documents),
        "num_stdlib_files": sum(d.name.startswith("stdlib:") for d in documents),
        "num_topics": sum(d.name.startswith("topic:") for d in documents),
        "text_bytes": sum(len(d.text.encode("utf-8")) for d in documents),
        "vocab_size": len(tokenizer),
        "eod_id": int(tokenizer.eos_token_id),
        "pad_id": int(tokenizer.pad_token_id),
        "eod_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "dtype": result.dtype,
        "splits": splits,
        "paths": {
            "tokenizer": "tokenizer",
            "train_prefix": prefixes["train"],
            "valid_prefix": prefixes["valid"],
        },
        "files_sha256": {rel: _file_sha256(out / rel) for rel in files},
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    tmp_manifest = manifest_path.with_suffix(".json.tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, manifest_path)
    return _corpus(out, manifest, False, time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build (or reuse) the default corpus and print a summary."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_ext.data.default_corpus",
        description="Build the embedded default corpus (CPython stdlib sources + pydoc topics): "
        "a byte-level BPE tokenizer and megatron-core indexed datasets, with no network.",
    )
    defaults = DefaultCorpusConfig()
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size,
                        help="tokenizer vocabulary size, a multiple of 128 (default %(default)s)")
    parser.add_argument("--max-source-bytes", type=int, default=defaults.max_source_bytes,
                        help="byte budget of stdlib sources (default %(default)s)")
    parser.add_argument("--valid-every", type=int, default=defaults.valid_every,
                        help="hold out every N-th document for validation, 0: none "
                        "(default %(default)s)")
    parser.add_argument("--no-topics", action="store_true", help="leave out the pydoc topics")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenization processes (default: CPU count)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_ext.data.cli import check_output_location

    try:
        check_output_location(Path(args.out) / MANIFEST_NAME, "--out")
        config = DefaultCorpusConfig(
            vocab_size=args.vocab_size,
            max_source_bytes=args.max_source_bytes,
            valid_every=args.valid_every,
            include_topics=not args.no_topics,
            workers=args.workers,
        )
        corpus = build_default_corpus(
            args.out, config, force=args.force, progress=not args.quiet
        )
    except (DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = corpus.manifest
    state = "up to date (manifest matches): reused" if corpus.reused else "built"
    print(f"default corpus {state} at {corpus.out_dir} in {corpus.seconds:.1f}s")
    print(f"  documents: {corpus.num_documents} ({m['num_stdlib_files']} stdlib files, "
          f"{m['num_topics']} topics), {m['text_bytes'] / 1e6:.2f} MB of text")
    for split, info in m["splits"].items():
        print(f"  {split}: {info['documents']} documents, {info['tokens']} tokens -> "
              f"{corpus.out_dir / info['prefix']}")
    print(f"  tokenizer: {corpus.tokenizer_dir} (vocab {m['vocab_size']}, eod {m['eod_id']}, "
          f"pad {m['pad_id']}, dtype {m['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
