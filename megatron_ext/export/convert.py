"""Megatron GPTModel state dict -> Hugging Face Qwen3 / Qwen3-MoE model directory.

`convert_state_dict` is the pure mapping (tensors in, tensors out, through `key_map.KEY_MAP`);
`export_state_dict` writes a complete model directory from it: config.json,
generation_config.json, sharded safetensors with model.safetensors.index.json, tokenizer files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from megatron_ext.export.arch import ExportArch, UnsupportedArchitectureError
from megatron_ext.export.hf_files import (
    ShardWriter,
    atomic_output_dir,
    copy_tokenizer_files,
    generation_config_dict,
    hf_config_dict,
    parse_size,
    write_json,
)
from megatron_ext.export.key_map import IGNORED_SUFFIXES, PlannedKey, plan_keys

__all__ = [
    "IncompleteCheckpointError",
    "convert_state_dict",
    "export_state_dict",
    "iter_hf_tensors",
    "resolve_keys",
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


def resolve_keys(state_dict: Mapping[str, Any], arch: ExportArch) -> list[tuple[str, PlannedKey]]:
    """Match every row of the expanded key map to the name it has in `state_dict`.

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
    for entry in plan_keys(arch):
        found = [name for name in entry.megatron if name in state_dict]
        if not found:
            alias = f" (or {' / '.join(entry.megatron[1:])})" if len(entry.megatron) > 1 else ""
            missing.append(entry.megatron[0] + alias)
        elif len(found) > 1:
            raise ValueError(f"the state dict holds one tensor under two names: {found}")
        else:
            resolved.append((found[0], entry))
            used.add(found[0])
    if arch.tie_word_embeddings and "output_layer.weight" in state_dict:
        # Tied: megatron has no output_layer.weight on a single stage; a copy must be identical.
        embedding = state_dict.get("embedding.word_embeddings.weight")
        if embedding is not None and not torch.equal(state_dict["output_layer.weight"], embedding):
            raise ValueError(
                "tie_word_embeddings=True but output_layer.weight differs from "
                "embedding.word_embeddings.weight; export with tie_word_embeddings=False"
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
    arch: ExportArch,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor) for the whole model, one megatron tensor at a time.

    Every yielded tensor is contiguous, on the CPU, owns its storage, and has `dtype` (default:
    the embedding's dtype). All keys are checked before the first tensor is yielded.
    """
    resolved = resolve_keys(state_dict, arch)
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
        outputs = entry.transform(tensor.detach(), arch)
        for hf_name, out in zip(entry.hf, outputs, strict=True):
            out = out.to(device="cpu", dtype=dtype).contiguous()
            if out.untyped_storage().nbytes() != out.numel() * out.element_size():
                out = out.clone()  # a view into a bigger tensor: safetensors wants its own storage
            yield hf_name, out


def convert_state_dict(
    state_dict: Mapping[str, Any], arch: ExportArch, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict (on-disk names) of a megatron GPTModel state dict."""
    return dict(iter_hf_tensors(state_dict, arch, dtype=dtype))


def export_state_dict(
    state_dict: Mapping[str, Any],
    arch: ExportArch,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
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
        arch: the model's description (see `arch_from_megatron_config`).
        out_dir: the directory to create; it appears only once the export is complete.
        tokenizer_dir: a directory with tokenizer files (tokenizer.json, tokenizer_config.json,
            ...) to copy; special token ids not given below are read from it.
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
        UnsupportedArchitectureError: the state dict holds tensors the exporter does not know.
        FileExistsError: out_dir exists and overwrite is False.
    """
    max_shard_bytes = parse_size(max_shard_size)
    resolve_keys(state_dict, arch)  # fail before creating anything
    if dtype is None:
        dtype = state_dict[plan_keys(arch)[0].megatron[0]].dtype
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
            ids = _tokenizer_special_ids(tmp, arch)
            bos_token_id = ids["bos"] if bos_token_id is None else bos_token_id
            eos_token_id = ids["eos"] if eos_token_id is None else eos_token_id
            pad_token_id = ids["pad"] if pad_token_id is None else pad_token_id
        token_ids = {
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
        }
        write_json(tmp / "config.json", hf_config_dict(arch, dtype=dtype, **token_ids))
        write_json(tmp / "generation_config.json", generation_config_dict(**token_ids))
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in iter_hf_tensors(state_dict, arch, dtype=dtype, progress=progress):
            writer.add(name, tensor)
        writer.finish()
        _check_config_loads(tmp, arch)
    return Path(out_dir).absolute()


def _tokenizer_special_ids(directory: Path, arch: ExportArch) -> dict[str, Any]:
    """Load the copied tokenizer (it must load) and read its special token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{arch.vocab_size}: token ids beyond it have no embedding"
        )
    return {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }


def _check_config_loads(directory: Path, arch: ExportArch) -> None:
    """transformers must read the written config back with the intended fields."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(directory))
    expected = "qwen3_moe" if arch.is_moe else "qwen3"
    read = (config.model_type, config.vocab_size, config.head_dim, config.num_key_value_heads)
    wanted = (expected, arch.vocab_size, arch.head_dim, arch.num_query_groups)
    if read != wanted:
        raise RuntimeError(
            f"transformers reads the written config.json as (model_type, vocab_size, head_dim, "
            f"num_key_value_heads)={read}, expected {wanted}"
        )
