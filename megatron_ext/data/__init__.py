"""Data pipeline: tokenize local jsonl / parquet / text files into megatron-core indexed datasets,
train byte-level BPE tokenizers offline, build the embedded default corpus, and check indexed
datasets before training.

The names below are imported lazily (megatron-core, `datasets` and `transformers` are slow to
import), so `import megatron_ext.data` is cheap and `python -m megatron_ext.data.default_corpus`
runs cleanly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_ext._lazy import lazy_exports

if TYPE_CHECKING:
    from megatron_ext.data.default_corpus import (
        DefaultCorpus,
        DefaultCorpusConfig,
        build_default_corpus,
        collect_default_documents,
    )
    from megatron_ext.data.errors import DataError
    from megatron_ext.data.preprocess import PreprocessResult, choose_token_dtype, preprocess
    from megatron_ext.data.readers import InputSource, iter_texts, load_source, resolve_inputs
    from megatron_ext.data.tokenizer import (
        HFTokenizerAdapter,
        check_model_vocab_size,
        load_tokenizer,
        resolve_eod_id,
        save_tokenizer,
        tokenizer_vocab_size,
        train_bpe_tokenizer,
    )
    from megatron_ext.data.validate import (
        IndexedDataSummary,
        check_indexed_dataset,
        check_indexed_datasets,
    )

_EXPORTS = {
    "DataError": "errors",
    "DefaultCorpus": "default_corpus",
    "DefaultCorpusConfig": "default_corpus",
    "HFTokenizerAdapter": "tokenizer",
    "IndexedDataSummary": "validate",
    "InputSource": "readers",
    "PreprocessResult": "preprocess",
    "build_default_corpus": "default_corpus",
    "check_indexed_dataset": "validate",
    "check_indexed_datasets": "validate",
    "check_model_vocab_size": "tokenizer",
    "choose_token_dtype": "preprocess",
    "collect_default_documents": "default_corpus",
    "iter_texts": "readers",
    "load_source": "readers",
    "load_tokenizer": "tokenizer",
    "preprocess": "preprocess",
    "resolve_eod_id": "tokenizer",
    "resolve_inputs": "readers",
    "save_tokenizer": "tokenizer",
    "tokenizer_vocab_size": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
