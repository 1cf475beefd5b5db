"""Command line of tools/preprocess_data.py: tokenize files into a megatron-core indexed dataset."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_ext.data.errors import DataError
from megatron_ext.data.readers import resolve_inputs

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of tools/preprocess_data.py."""
    parser = argparse.ArgumentParser(
        prog="tools/preprocess_data.py",
        description="Tokenize jsonl / parquet / text files (or a hub dataset when online) with a "
        "Hugging Face tokenizer and write a megatron-core indexed dataset (PREFIX.bin/.idx). "
        "Without a tokenizer, --train-tokenizer DIR trains a byte-level BPE on the inputs first.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="files, directories or glob patterns (.jsonl/.json/.parquet/.txt, "
                        "optionally .gz), or a hub dataset name")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="output prefix: PREFIX.bin and PREFIX.idx are written")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer directory, tokenizer.json file or hub name")
    source.add_argument("--train-tokenizer", metavar="DIR",
                        help="train a byte-level BPE tokenizer on the inputs, save it in DIR "
                        "(Hugging Face format) and use it")
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="vocabulary size of --train-tokenizer (default %(default)s)")
    parser.add_argument("--text-field", default="text",
                        help="field holding the text in jsonl / parquet records "
                        "(default %(default)s)")
    parser.add_argument("--text-sample-by", choices=("line", "paragraph", "document"),
                        default="line", help="documents of text files (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenization processes (default: CPU count)")
    parser.add_argument("--model-vocab-size", type=int, default=None,
                        help="the model's vocabulary size; fail if the tokenizer's is larger")
    parser.add_argument("--dtype", choices=("uint16", "int32", "int64"), default=None,
                        help="token dtype (default: from the vocabulary size)")
    parser.add_argument("--eod-token", default=None,
                        help="end-of-document token (default: the tokenizer's eos token)")
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                        help="do not append the end-of-document token")
    parser.add_argument("--hub-split", default="train", help="split of a hub dataset")
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="records per tokenization batch (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def check_output_location(path: str | Path, what: str) -> None:
    """Raise DataError unless `path` can be created: its nearest existing parent is a writable
    folder (checked before any slow import or work)."""
    parent = Path(path).expanduser().absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"{what} {str(path)!r} cannot be written: {parent} is not a writable folder")


def check_args(args: argparse.Namespace) -> None:
    """The checks that need no tokenizer or dataset library: the inputs exist and have a known
    format, a local tokenizer exists, and the output can be written.

    Raises:
        DataError: naming the argument and the path.
    """
    resolve_inputs(args.input)
    tok = args.tokenizer
    if tok is not None and not Path(tok).expanduser().exists():
        parts = tok.split("/")
        hub_like = len(parts) == 2 and all(parts) and not tok.startswith((".", "~"))
        if not hub_like:
            raise DataError(f"--tokenizer {tok!r} does not exist (a folder, a tokenizer.json file "
                            "or a hub name owner/name)")
    check_output_location(args.output_prefix, "--output-prefix")
    if args.train_tokenizer is not None:
        check_output_location(Path(args.train_tokenizer) / "tokenizer.json", "--train-tokenizer")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from megatron_ext.data.preprocess import preprocess  # slow imports after the checks
    from megatron_ext.data.tokenizer import train_bpe_tokenizer

    try:
        tokenizer = args.tokenizer
        if args.train_tokenizer is not None:
            tokenizer = args.train_tokenizer
            train_bpe_tokenizer([Path(p) for p in args.input], args.train_tokenizer,
                                args.vocab_size,
                                text_field=args.text_field)
            print(f"trained a byte-level BPE tokenizer (vocab {args.vocab_size}) -> "
                  f"{args.train_tokenizer}")
        result = preprocess(
            args.input,
            args.output_prefix,
            tokenizer,
            text_field=args.text_field,
            workers=args.workers,
            append_eod=args.append_eod,
            model_vocab_size=args.model_vocab_size,
            dtype=args.dtype,
            eod_token=args.eod_token,
            sample_by=args.text_sample_by,
            hub_split=args.hub_split,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.num_documents} documents, {result.num_tokens} tokens ({result.dtype}, "
        f"vocab {result.vocab_size}, eod {result.eod_id}) to {result.bin_path} and "
        f"{result.idx_path} in {result.seconds:.1f}s"
        + (f"; skipped {result.num_skipped} empty records" if result.num_skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
