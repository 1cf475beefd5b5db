"""Hugging Face tokenizers for the data pipeline: loading, local byte-level BPE training, and an
adapter exposing the attributes megatron-core's datasets expect (`eod`, `pad`, `vocab_size`).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_ext.data.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "DEFAULT_EOS_TOKEN",
    "DEFAULT_PAD_TOKEN",
    "HFTokenizerAdapter",
    "check_model_vocab_size",
    "load_tokenizer",
    "resolve_eod_id",
    "save_tokenizer",
    "tokenizer_vocab_size",
    "train_bpe_tokenizer",
]

DEFAULT_EOS_TOKEN = "<|endoftext|>"
"""End-of-document token of the tokenizers trained here (also their bos token)."""
DEFAULT_PAD_TOKEN = "<|pad|>"
"""Padding token of the tokenizers trained here (distinct from eos, as megatron-core requires)."""
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<eod>")
_VERY_LARGE_LENGTH = int(1e30)


def _guess_eod_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    vocab = tokenizer.get_vocab()
    return next((tok for tok in _EOD_CANDIDATES if tok in vocab), None)


def load_tokenizer(
    tokenizer: str | os.PathLike[str], *, eod_token: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer and make sure it has an end-of-document (eos) token.

    Args:
        tokenizer: A tokenizer directory (loadable by `transformers.AutoTokenizer`), a local
            `tokenizer.json` file, or a hub name (needs the network).
        eod_token: The end-of-document token; default: the tokenizer's eos token, else the first
            of <|endoftext|>, <|end_of_text|>, </s>, <eos>, <|eos|>, <eod> in its vocabulary.

    Returns:
        The tokenizer, with `eos_token` set to the end-of-document token and a very large
        `model_max_length` (documents are long; no truncation warnings).

    Raises:
        DataError: The tokenizer cannot be loaded or has no end-of-document token.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = os.fspath(tokenizer)
    path = Path(spec)
    try:
        if path.is_file():
            if (path.parent / "tokenizer_config.json").is_file():
                tok = AutoTokenizer.from_pretrained(str(path.parent), local_files_only=True)
            else:
                tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        elif path.is_dir():
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        elif spec.startswith((".", "/", "~")) or spec.endswith(".json"):
            raise DataError(f"tokenizer {spec!r} does not exist (expected a tokenizer.json file "
                            "or a tokenizer directory)")
        else:
            tok = AutoTokenizer.from_pretrained(spec)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - reported with the tokenizer's name
        raise DataError(f"cannot load tokenizer {spec!r}: {err}") from err
    if eod_token is not None:
        if eod_token not in tok.get_vocab():
            raise DataError(
                f"end-of-document token {eod_token!r} is not in the vocabulary of tokenizer "
                f"{spec!r}"
            )
        tok.eos_token = eod_token
    elif tok.eos_token is None:
        guess = _guess_eod_token(tok)
        if guess is None:
            raise DataError(
                f"tokenizer {spec!r} has no end-of-document (eos) token and none of "
                f"{list(_EOD_CANDIDATES)} is in its vocabulary; pass --eod-token / eod_token="
            )
        tok.eos_token = guess
    tok.model_max_length = _VERY_LARGE_LENGTH
    return tok


def resolve_eod_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of the end-of-document token (the eos token) of a loaded tokenizer.

    Raises:
        DataError: The tokenizer has no eos token.
    """
    eod = tokenizer.eos_token_id
    if eod is None:
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has no end-of-document (eos) token; load it "
            "with megatron_ext.data.load_tokenizer(..., eod_token=...)"
        )
    return int(eod)


def tokenizer_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """The number of token ids a tokenizer can produce (added tokens included, holes counted)."""
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), max(vocab.values(), default=-1) + 1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def check_model_vocab_size(
    vocab_size: int, model_vocab_size: int | None, *, name: str = ""
) -> None:
    """Check that every token id of a tokenizer has a row in the model's embedding.

    Args:
        vocab_size: The tokenizer's vocabulary size (`tokenizer_vocab_size`).
        model_vocab_size: The model's (padded) vocabulary size, or None to skip the check.
        name: The tokenizer's name, for the message.

    Raises:
        DataError: The tokenizer's vocabulary is larger than the model's, naming both numbers and
            the fix.
    """
    if model_vocab_size is None or vocab_size <= model_vocab_size:
        return
    label = f"tokenizer {name!r}" if name else "the tokenizer"
    raise DataError(
        f"the vocabulary of {label} has {vocab_size} tokens (ids 0..{vocab_size - 1}) but the "
        f"model's vocabulary size (--model-vocab-size) is {model_vocab_size}: token ids >= "
        f"{model_vocab_size} would have no embedding row. Fix: set the model's vocabulary size to "
        f"at least {vocab_size} (padded to a multiple of 128: {_round_up(vocab_size, 128)}), or "
        f"use a tokenizer with at most {model_vocab_size} tokens (e.g. train one with "
        f"--train-tokenizer DIR --vocab-size {max(256, model_vocab_size // 128 * 128)})"
    )


def _iter_training_texts(
    texts_or_files: Iterable[str] | Sequence[os.PathLike[str]], text_field: str
) -> Iterator[str]:
    from megatron_ext.data.readers import iter_texts

    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            yield from iter_texts([item], text_field=text_field)
        elif isinstance(item, str):
            yield item
        else:
            raise TypeError(
                "train_bpe_tokenizer takes texts (str) or files (pathlib.Path), got "
                f"{type(item).__name__}"
            )


def train_bpe_tokenizer(
    texts_or_files: Iterable[str] | Sequence[os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 8192,
    *,
    min_frequency: int = 2,
    eos_token: str = DEFAULT_EOS_TOKEN,
    pad_token: str = DEFAULT_PAD_TOKEN,
    extra_special_tokens: Sequence[str] = (),
    fill_to_vocab_size: bool = True,
    text_field: str = "text",
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally and save it in Hugging Face format.

    The tokenizer has a ByteLevel pre-tokenizer and decoder (every byte sequence is encodable, no
    unknown token), `eos_token` (id 0, also the bos token) as end-of-document token and
    `pad_token` (id 1). `out_dir` receives tokenizer.json, tokenizer_config.json and
    special_tokens_map.json; `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it
    offline.

    Args:
        texts_or_files: Document texts (str) or local files (pathlib.Path objects: jsonl,
            parquet or text files, read with `text_field`).
        out_dir: The directory to write (created if needed).
        vocab_size: The vocabulary size, special tokens and the 256 byte symbols included.
        min_frequency: The minimum count of a pair to be merged.
        eos_token: The end-of-document token.
        pad_token: The padding token.
        extra_special_tokens: More special tokens (ids right after eos and pad).
        fill_to_vocab_size: When the corpus is too small for `vocab_size - specials - 256`
            merges, add reserved special tokens <|reserved_N|> so the size is exactly `vocab_size`.
        text_field: The text field of jsonl / parquet files.
        show_progress: Show the `tokenizers` trainer's progress bar.

    Returns:
        The trained tokenizer, as loaded back from `out_dir`.

    Raises:
        ValueError: `vocab_size` too small for the byte alphabet and the special tokens.
        DataError: Bad input files, or no text at all.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys([eos_token, pad_token, *extra_special_tokens]))
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte symbols plus "
            f"{len(specials)} special tokens = {minimum}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = 0

    def counted(texts: Iterator[str]) -> Iterator[str]:
        nonlocal seen
        for text in texts:
            seen += 1
            yield text

    tok.train_from_iterator(counted(_iter_training_texts(texts_or_files, text_field)), trainer)
    if seen == 0:
        raise DataError("cannot train a tokenizer: the corpus has no text")
    if fill_to_vocab_size and tok.get_vocab_size() < vocab_size:
        missing = vocab_size - tok.get_vocab_size()
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    return save_tokenizer(tok, out_dir, eos_token=eos_token, pad_token=pad_token)


def save_tokenizer(
    tok: Any, out_dir: str | os.PathLike[str], *, eos_token: str, pad_token: str
) -> PreTrainedTokenizerFast:
    """Save a `tokenizers.Tokenizer` in Hugging Face format and load it back.

    Writes tokenizer.json, tokenizer_config.json (tokenizer_class PreTrainedTokenizerFast, so
    transformers 4.x and 5.x both load it) and special_tokens_map.json.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos_token, bos_token=eos_token, pad_token=pad_token
    )
    hf.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token=eos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": eos_token, "eos_token": eos_token, "pad_token": pad_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    loaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    loaded.model_max_length = _VERY_LARGE_LENGTH
    return loaded


class HFTokenizerAdapter(MegatronTokenizerBase):
    """A Hugging Face tokenizer seen as a megatron-core tokenizer.

    megatron-core's `GPTDatasetConfig.tokenizer` / `GPTDataset` read `vocab_size`, `eod`, `pad`
    (pad falls back to -1, which matches no token, when the tokenizer has none) and
    `unique_identifiers` (part of the dataset cache key). `tokenize` / `detokenize` add no special
    tokens.

    Args:
        tokenizer: A loaded Hugging Face tokenizer, or anything `load_tokenizer` takes.
        eod_token: See `load_tokenizer` (only used when loading).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str],
        *,
        eod_token: str | None = None,
    ) -> None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer, eod_token=eod_token)
        super().__init__(str(tokenizer.name_or_path), {})
        self.hf_tokenizer = tokenizer
        self._eod = resolve_eod_id(tokenizer)
        self._vocab_size = tokenizer_vocab_size(tokenizer)
        self.unique_identifiers = OrderedDict(
            [
                ("class", type(self).__name__),
                ("tokenizer_path", str(tokenizer.name_or_path)),
                ("vocab_size", self._vocab_size),
                ("eod", self._eod),
                ("pad", self.pad),
            ]
        )

    @property
    def vocab_size(self) -> int:
        """The number of token ids (not padded to the model's vocabulary)."""
        return self._vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        """Token to id."""
        return self.hf_tokenizer.get_vocab()

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id to token."""
        return {v: k for k, v in self.vocab.items()}

    @property
    def eod(self) -> int:
        """The end-of-document token id (appended after every document)."""
        return self._eod

    @property
    def eos(self) -> int:
        """Same as `eod`."""
        return self._eod

    @property
    def bos(self) -> int | None:
        """The bos token id, or None."""
        return self.hf_tokenizer.bos_token_id

    @property
    def pad(self) -> int:
        """The pad token id, or -1 when the tokenizer has none."""
        pad = self.hf_tokenizer.pad_token_id
        return -1 if pad is None else int(pad)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return list(self.hf_tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        return self.hf_tokenizer.decode(list(ids))

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """Not used for pretraining data."""
        raise NotImplementedError("HFTokenizerAdapter is for pretraining data (no chat template)")
