#!/usr/bin/env python
"""Tokenize jsonl / parquet / text files into a megatron-core indexed dataset (.bin/.idx).

Examples::

    python tools/preprocess_data.py --input data/*.jsonl --output-prefix out/my_text_document \
        --tokenizer path/to/tokenizer_dir --workers 8 --model-vocab-size 50304
    python tools/preprocess_data.py --input corpus.txt --output-prefix out/corpus \
        --train-tokenizer out/tokenizer --vocab-size 8192

The embedded default corpus (no network): python -m megatron_ext.data.default_corpus --out DIR
"""

import sys
from pathlib import Path

try:
    from megatron_ext.data.cli import main
except ModuleNotFoundError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_ext.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
