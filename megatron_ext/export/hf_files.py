"""The files of a Hugging Face model directory: config, generation config, shards, tokenizer.

Everything here writes into a directory that `atomic_output_dir` creates next to the target and
renames onto it only when the export has finished, so a failed or interrupted export never leaves a
directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megatron_ext.export.arch import ExportArch
from megatron_ext.export.preflight import (
    TOKENIZER_FILES,
    check_output_dir,
    parse_size,
    tokenizer_files,
)

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "TOKENIZER_FILES",
    "ShardWriter",
    "atomic_output_dir",
    "copy_tokenizer_files",
    "default_mode",
    "generation_config_dict",
    "hf_config_dict",
    "parse_size",
]

SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config_dict(
    arch: ExportArch,
    *,
    dtype: torch.dtype,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """config.json for Qwen3ForCausalLM or Qwen3MoeForCausalLM, in the layout Qwen publishes.

    The flat `rope_theta` / `rope_scaling` / `torch_dtype` fields are what transformers 4.x and vLLM
    read; transformers 5 converts them on load (to `rope_parameters` and `dtype`) without warnings.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported export dtype {dtype}; choose one of {list(_DTYPE_NAMES)}")
    config: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM" if arch.is_moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if arch.is_moe else "qwen3",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": arch.num_layers,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if arch.is_moe:
        # HF: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
        # megatron's moe_layer_freq counts from layer 0 instead: name the dense layers explicitly.
        config |= {
            "num_experts": arch.num_experts,
            "num_experts_per_tok": arch.moe_router_topk,
            "moe_intermediate_size": arch.moe_ffn_hidden_size,
            "norm_topk_prob": arch.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(arch.num_layers) if not arch.is_moe_layer(i)],
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
        }
    return config


def generation_config_dict(
    *,
    bos_token_id: int | None,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None,
) -> dict[str, Any]:
    """generation_config.json with the special token ids that are known."""
    out: dict[str, Any] = {"_from_model_config": False}
    for name, value in (
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
        ("pad_token_id", pad_token_id),
    ):
        if value is not None:
            out[name] = value
    return out


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` (a bigger tensor gets a
    shard of its own), then names them model-0000i-of-0000n.safetensors and writes the index."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; it must be contiguous and own its storage."""
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        # safetensors creates its files with mode 0o600 (as private temporary files): give the
        # shard the mode an ordinary new file gets, so other users can read the model.
        os.chmod(path, default_mode(is_dir=False))
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> dict[str, Any]:
        """Write the last shard, rename all to their final names, write and return the index."""
        if self._pending:
            self._flush()
        if not self._shards:
            raise ValueError("no tensors to write")
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / final)
            weight_map |= dict.fromkeys(names, final)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        write_json(self.directory / SAFE_WEIGHTS_INDEX_NAME, index)
        return index


def write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON with sorted keys and a final newline, as transformers writes its configs."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(tokenizer_dir: str | os.PathLike[str], out_dir: Path) -> list[str]:
    """Copy the tokenizer files of `tokenizer_dir` (see TOKENIZER_FILES) into `out_dir`."""
    copied = tokenizer_files(tokenizer_dir)
    for name in copied:
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    return copied


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set it and put it back at once
    os.umask(mask)
    return mask


def default_mode(*, is_dir: bool) -> int:
    """The permission bits that the umask gives a newly created file or directory (e.g. 0o644
    and 0o755 under umask 022)."""
    return (0o777 if is_dir else 0o666) & ~_umask()


def _apply_default_modes(directory: Path) -> None:
    """Give `directory` and every folder and file below it the mode of a newly created one.

    mkdtemp creates the directory 0o700 and some writers (safetensors) create 0o600 files; an
    exported model must be readable by whoever the umask lets read ordinary files.
    """
    dir_mode, file_mode = default_mode(is_dir=True), default_mode(is_dir=False)
    os.chmod(directory, dir_mode)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), file_mode)


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Iterator[Path]:
    """Yield an empty temporary directory next to `out_dir`; on success it becomes `out_dir`.

    On an exception the temporary directory is removed and `out_dir` is left as it was. With
    overwrite=True an existing `out_dir` is replaced (moved aside, then removed after the rename).
    Before the rename, the directory and everything in it get the modes the process umask gives
    newly created ones (e.g. 0o755 folders and 0o644 files under umask 022).

    Raises:
        FileExistsError: `out_dir` exists and overwrite is False.
    """
    target = check_output_dir(out_dir, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _apply_default_modes(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
