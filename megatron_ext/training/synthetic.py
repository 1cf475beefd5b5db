"""A small synthetic indexed dataset (.bin/.idx) with learnable structure, for tests, benchmarks
and smoke runs; real data come from tools/preprocess_data.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

__all__ = ["write_synthetic_dataset"]


def write_synthetic_dataset(
    prefix: str | Path,
    *,
    vocab_size: int,
    num_documents: int = 200,
    min_length: int = 20,
    max_length: int = 200,
    eod_id: int = 0,
    noise: float = 0.1,
    seed: int = 0,
) -> str:
    """Write documents whose tokens mostly follow a fixed random successor table (so a model can
    learn them: the loss falls from log(vocab_size) towards the noise level), each ending with
    eod_id. Returns the path prefix to put in DataConfig.paths.
    """
    if not 0 <= eod_id < vocab_size:
        raise ValueError(f"eod_id={eod_id} is outside the vocabulary of size {vocab_size}")
    rng = np.random.default_rng(seed)
    successor = rng.permutation(vocab_size)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    for _ in range(num_documents):
        length = int(rng.integers(min_length, max_length + 1))
        tokens = np.empty(length, dtype=np.int64)
        tokens[0] = rng.integers(1, vocab_size)
        jumps = rng.random(length) < noise
        random_tokens = rng.integers(1, vocab_size, size=length)
        for i in range(1, length - 1):
            tokens[i] = random_tokens[i] if jumps[i] else successor[tokens[i - 1]]
            if tokens[i] == eod_id:
                tokens[i] = (eod_id + 1) % vocab_size
        tokens[-1] = eod_id
        builder.add_document(tokens, [length])
    builder.finalize(get_idx_path(prefix))
    return prefix
