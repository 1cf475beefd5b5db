"""Megatron GPTModel state dict -> Hugging Face Qwen3 / Qwen3-MoE model directory.

`convert_state_dict` is the pure mapping (tensors in, tensors out, through `key_map.KEY_MAP`);
`export_state_dict` writes a complete model directory from it: config.json (transformers' own
Qwen3Config / Qwen3MoeConfig of the models.ModelConfig, export.hf_config), generation_config.json,
sharded safetensors with model.safetensors.index.json (huggingface_hub's shard plan), tokenizer
files with their chat template.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from megatron_ext.export.arch import UnsupportedArchitectureError
from megatron_ext.export.hf_config import from_hf_config
from megatron_ext.export.hf_files import (
    atomic_output_dir,
    copy_tokenizer_files,
    generation_config_dict,
    hf_config_dict,
    install_chat_template,
    parse_size,
    write_json,
    write_safetensors,
)
from megatron_ext.export.key_map import IGNORED_SUFFIXES, PlannedKey, plan_keys
from megatron_ext.models.config import ModelConfig

__all__ = [
    "IncompleteCheckpointError",
    "convert_state_dict",
    "export_state_dict",
    "iter_hf_tensors",
    "resolve_keys",
    "state_dict_padded_vocab",
]

_SHOWN_KEYS = 20


class IncompleteCheckpointError(KeyError):
    """The megatron state dict lacks tensors that the architecture needs."""

    def __init__(self, missing: list[str], unexpected: list[str], where: str = "") -> None:
        self.missing = missing
        self.unexpected = unexpected
        message = f"checkpoint is incomplete: {_listing(missing)} missing"
        if where:
            message += f" ({where})"
        if unexpected:
            message += (
                f"; it also holds {_listing(unexpected)} that the architecture description does "
                "not expect (does it describe this checkpoint?)"
            )
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f", ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return f"{len(keys)} tensor{'s' if len(keys) != 1 else ''} ({shown}{more})"


_EMBEDDING = "embedding.word_embeddings.weight"


def state_dict_padded_vocab(state_dict: Mapping[str, Any], model: ModelConfig) -> int:
    """Rows of the state dict's embedding (megatron's padded vocabulary); without an embedding
    tensor, model.padded_vocab_size() (the missing tensor is reported by resolve_keys)."""
    embedding = state_dict.get(_EMBEDDING)
    if isinstance(embedding, torch.Tensor) and embedding.dim() == 2:
        return int(embedding.shape[0])
    return model.padded_vocab_size()


def resolve_keys(
    state_dict: Mapping[str, Any], model: ModelConfig, padded_vocab_size: int | None = None
) -> list[tuple[str, PlannedKey]]:
    """Match every row of the expanded key map to the name it has in `state_dict`.

    `padded_vocab_size` is the rows of megatron's embedding and output layer; None: the state
    dict's embedding's (state_dict_padded_vocab).

    Raises:
        IncompleteCheckpointError: a tensor the architecture needs is absent (all are named).
        UnsupportedArchitectureError: the state dict holds tensors the exporter does not know
            (e.g. shared experts, expert bias, linear biases), so the export would drop them.
        ValueError: a tensor is present under two accepted names, or tied output weights differ
            from the embedding.
    """
    resolved: list[tuple[str, PlannedKey]] = []
    used: set[str] = set()
    missing: list[str] = []
    if padded_vocab_size is None:
        padded_vocab_size = state_dict_padded_vocab(state_dict, model)
    for entry in plan_keys(model, padded_vocab_size):
        found = [name for name in entry.megatron if name in state_dict]
        if not found:
            alias = f" (or {' / '.join(entry.megatron[1:])})" if len(entry.megatron) > 1 else ""
            missing.append(entry.megatron[0] + alias)
        elif len(found) > 1:
            raise ValueError(f"the state dict holds one tensor under two names: {found}")
        else:
            resolved.append((found[0], entry))
            used.add(found[0])
    if model.tie_embeddings and "output_layer.weight" in state_dict:
        # Tied: megatron has no output_layer.weight on a single stage; a copy must be identical.
        embedding = state_dict.get(_EMBEDDING)
        if embedding is not None and not torch.equal(state_dict["output_layer.weight"], embedding):
            raise ValueError(
                "tie_embeddings=True but output_layer.weight differs from "
                "embedding.word_embeddings.weight; export with tie_embeddings=False"
            )
        used.add("output_layer.weight")
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if missing:
        raise IncompleteCheckpointError(missing, unexpected)
    if unexpected:
        raise UnsupportedArchitectureError(
            f"the exporter does not know {_listing(unexpected)}; a Qwen3 / Qwen3-MoE export "
            "would drop them (unsupported architecture, or an architecture description that "
            "does not match the checkpoint)"
        )
    return resolved


def iter_hf_tensors(
    state_dict: Mapping[str, Any],
    model: ModelConfig,
    *,
    padded_vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor) for the whole model, one megatron tensor at a time.

    Every yielded tensor is contiguous, on the CPU, owns its storage, and has `dtype` (default:
    the embedding's dtype). All keys are checked before the first tensor is yielded.
    `padded_vocab_size`: as in resolve_keys.
    """
    resolved = resolve_keys(state_dict, model, padded_vocab_size)
    if dtype is None:
        dtype = state_dict[resolved[0][0]].dtype  # the embedding comes first
    for name, entry in tqdm(resolved, desc="export", unit="tensor", disable=not progress):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(
                f"{name}: expected shape {list(entry.shape)}, got {list(tensor.shape)} "
                "(does the architecture description match the checkpoint?)"
            )
        outputs = entry.transform(tensor.detach(), model)
        for hf_name, out in zip(entry.hf, outputs, strict=True):
            out = out.to(device="cpu", dtype=dtype).contiguous()
            if out.untyped_storage().nbytes() != out.numel() * out.element_size():
                out = out.clone()  # a view into a bigger tensor: safetensors wants its own storage
            yield hf_name, out


def convert_state_dict(
    state_dict: Mapping[str, Any],
    model: ModelConfig,
    *,
    padded_vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict (on-disk names) of a megatron GPTModel state dict."""
    return dict(
        iter_hf_tensors(state_dict, model, padded_vocab_size=padded_vocab_size, dtype=dtype)
    )


def export_state_dict(
    state_dict: Mapping[str, Any],
    model: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    padded_vocab_size: int | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    chat_template: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a Hugging Face model directory for a full (unsharded) megatron GPTModel state dict.

    Args:
        state_dict: megatron names (local or TE spec) -> full tensors of a TP=1, PP=1 model.
        model: the model's description (models.ModelConfig; for a megatron-core model of
            another origin see `arch_from_megatron_config`).
        out_dir: the directory to create; it appears only once the export is complete.
        padded_vocab_size: rows of the state dict's embedding (and output layer); None: the
            embedding's own (the padding rows beyond model.vocab_size are dropped).
        tokenizer_dir: a directory with tokenizer files (tokenizer.json, tokenizer_config.json,
            chat templates, ...) to copy; special token ids not given below are read from it.
        chat_template: a Jinja chat template that becomes the tokenizer's (replacing the one
            it has, if any; needs tokenizer_dir); it must render a one-message conversation.
        dtype: dtype of the written weights; default the state dict's (its embedding's) dtype.
        max_shard_size: largest safetensors shard, bytes or a string like "5GB".
        bos_token_id: written to config.json and generation_config.json.
        eos_token_id: idem; an int or a list of ints.
        pad_token_id: idem.
        overwrite: replace an existing out_dir (only after the new one is complete).
        progress: show a progress bar.

    Returns:
        The absolute path of the written directory.

    Raises:
        IncompleteCheckpointError: tensors are missing (all are named).
        UnsupportedArchitectureError: the state dict holds tensors the exporter does not know,
            or the model has a feature Qwen3 / Qwen3-MoE lacks (a shared expert).
        FileExistsError: out_dir exists and overwrite is False.
        ValueError: a chat template without a tokenizer, or one that does not render; a
            tokenizer larger than the vocabulary.
    """
    max_shard_bytes = parse_size(max_shard_size)
    if chat_template is not None and tokenizer_dir is None:
        raise ValueError("a chat template needs the tokenizer files it belongs to (tokenizer_dir)")
    if padded_vocab_size is None:
        padded_vocab_size = state_dict_padded_vocab(state_dict, model)
    resolved = resolve_keys(state_dict, model, padded_vocab_size)  # fail before creating anything
    if dtype is None:
        dtype = state_dict[resolved[0][0]].dtype  # the embedding comes first
    hf_config_dict(model, dtype=dtype)  # an unsupported model or dtype: before creating anything
    layout = {  # HF name -> its shape and dtype (meta, storage of its own), in the order written
        name: torch.empty(out.shape, dtype=dtype, device="meta")
        for _, entry in resolved
        for name, out in zip(
            entry.hf, entry.transform(torch.empty(entry.shape, device="meta"), model), strict=True
        )
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
            if chat_template is not None:
                install_chat_template(tmp, chat_template)
            ids = _tokenizer_special_ids(tmp, model, chat_template)
            bos_token_id = ids["bos"] if bos_token_id is None else bos_token_id
            eos_token_id = ids["eos"] if eos_token_id is None else eos_token_id
            pad_token_id = ids["pad"] if pad_token_id is None else pad_token_id
        token_ids = {
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
        }
        write_json(tmp / "config.json", hf_config_dict(model, dtype=dtype, **token_ids))
        write_json(tmp / "generation_config.json", generation_config_dict(**token_ids))
        tensors = iter_hf_tensors(
            state_dict, model, padded_vocab_size=padded_vocab_size, dtype=dtype, progress=progress
        )
        write_safetensors(tmp, tensors, layout, max_shard_bytes)
        _check_config_loads(tmp, model)
    return Path(out_dir).absolute()


def _tokenizer_special_ids(
    directory: Path, model: ModelConfig, chat_template: str | None
) -> dict[str, Any]:
    """Load the copied tokenizer (it must load) and read its special token ids; an installed
    chat template must be the tokenizer's and render a one-message conversation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if len(tokenizer) > model.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.vocab_size}: token ids beyond it have no embedding"
        )
    if chat_template is not None:
        if tokenizer.chat_template != chat_template:
            raise RuntimeError("transformers does not read the installed chat template back")
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        except Exception as exc:  # noqa: BLE001 - jinja2's errors and what the template raises
            raise ValueError(
                f"the chat template does not render a one-message conversation "
                f"([{{'role': 'user', 'content': 'hi'}}]): {type(exc).__name__}: {exc}"
            ) from None
    return {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }


def _check_config_loads(directory: Path, model: ModelConfig) -> None:
    """transformers must read the written config back as the model (hf_config.from_hf_config)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(directory))
    read = from_hf_config(
        config,
        name=model.name,
        make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
        where=str(directory / "config.json"),
    )
    if read != model:
        diffs = [
            f"{f}: {getattr(read, f)!r} (expected {getattr(model, f)!r})"
            for f in model.to_dict()
            if getattr(read, f) != getattr(model, f)
        ]
        raise RuntimeError(f"transformers reads the written config.json as another model: {diffs}")
