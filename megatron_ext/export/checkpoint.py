"""Read the model weights of a megatron-core dist checkpoint as one full, unsharded state dict.

megatron-core's torch_dist format stores every tensor as its *global* (unsharded) value, split into
pieces by the saving ranks; the checkpoint metadata knows each global shape. So a single CPU
process can read the full tensors whatever TP/PP/EP/DP layout wrote them, without building a model:
`load_full_model_tensors` selects the model's tensors from the metadata, loads them whole, and
renames them from their *sharded* keys to the names of a TP=1, PP=1, EP=1 GPTModel.state_dict().

The sharded keys differ from state-dict names in four ways (megatron-core 0.19, checked in
transformer_block.py, moe/experts.py, mlp.py):
- Homogeneous decoders stack all layers in one tensor per parameter: `decoder.layers.<name>`
  with a leading [num_layers] axis; mixed dense/MoE decoders (or singleton_local_shards) key
  them per layer, `decoder.layers.<i>.<name>`.
- Experts are stacked the same way: `...mlp.experts.experts.<name>` with a leading
  [num_experts] axis (SequentialMLP and TEGroupedMLP agree), or per expert with
  singleton_local_shards: `...mlp.experts.experts.<j>.<name>`.
- SwiGLU linear_fc1 is stored [gate; up] (each TP rank's halves placed in the gate and up
  halves of the global tensor), or with singleton_local_shards as `<key>_w` (gate) and
  `<key>_v` (up).
- Pre-norms use the TE names (`self_attention.linear_qkv.layer_norm_weight`,
  `mlp.linear_fc1.layer_norm_weight`); they are renamed to the local spec's `input_layernorm.weight`
  and `pre_mlp_layernorm.weight`, so the result loads into a local-spec TP=1 GPTModel as is.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_ext.export.convert import IncompleteCheckpointError, export_state_dict
from megatron_ext.export.preflight import check_output_dir
from megatron_ext.models.config import ModelConfig

__all__ = [
    "MODEL_KEY_PREFIXES",
    "checkpoint_model_keys",
    "export_checkpoint",
    "load_full_model_tensors",
    "model_key_prefix",
    "unshard_model_keys",
]

MODEL_KEY_PREFIXES: tuple[str, ...] = ("embedding.", "decoder.", "output_layer.", "mtp.")
"""First components of a GPTModel's sharded keys (optimizer and RNG entries have others)."""

_LAYERS = "decoder.layers."
_EXPERTS = "mlp.experts.experts."
_PRE_NORMS = (  # sharded (TE-spec) name -> local-spec name, as in sharded_state_dict_keys_map
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
)


_ANCHORS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight")
"""Tensors every GPT checkpoint holds; their keys reveal the prefix of the model's keys."""


def model_key_prefix(keys: Iterable[str]) -> str:
    """The prefix in front of a GPT model's sharded keys among a checkpoint's keys.

    Usually "" or "module." (sharded_state_dict of a model wrapped in DDP / Float16Module).
    Optimizer entries ("optimizer.state.exp_avg.<model key>") are not model keys.

    Raises:
        ValueError: no model found, or models under several prefixes.
    """
    prefixes = {
        key[: -len(anchor)]
        for key in keys
        if not key.startswith("optimizer.")
        for anchor in _ANCHORS
        if key.endswith(anchor) and (key == anchor or key[: -len(anchor)].endswith("."))
    }
    if len(prefixes) != 1:
        found = "none" if not prefixes else ", ".join(repr(p) for p in sorted(prefixes))
        raise ValueError(
            f"cannot tell which sharded keys are the model's: prefixes in front of {_ANCHORS}: "
            f"{found}; pass prefix= explicitly"
        )
    return prefixes.pop()


def checkpoint_model_keys(
    checkpoint_dir: str | os.PathLike[str], prefix: str | None = None
) -> list[str]:
    """Sharded keys of the model tensors in a dist checkpoint (read from its metadata only)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
    if prefix is None:
        prefix = model_key_prefix(metadata)
    return sorted(k for k in metadata if _is_model_key(k, prefix))


def _is_model_key(key: str, prefix: str) -> bool:
    return key.startswith(prefix) and key[len(prefix) :].startswith(MODEL_KEY_PREFIXES)


def load_full_model_tensors(
    checkpoint_dir: str | os.PathLike[str],
    *,
    num_layers: int,
    prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """The full GPTModel state dict (TP=1/PP=1/EP=1 names) stored in a torch_dist checkpoint.

    Args:
        checkpoint_dir: the dist checkpoint directory (the one holding metadata.json).
        num_layers: decoder layers of the model (to check stacked layer tensors).
        prefix: the prefix in front of the model's sharded keys; None finds it
            (`model_key_prefix`).

    Returns:
        Local-spec GPTModel state-dict names -> full CPU tensors, for `export_state_dict`.
    """
    from megatron.core import dist_checkpointing

    path = str(Path(checkpoint_dir))
    metadata = dist_checkpointing.load_tensors_metadata(path)
    if prefix is None:
        prefix = model_key_prefix(metadata)
    wanted = {k: v for k, v in metadata.items() if _is_model_key(k, prefix)}
    if not wanted:
        raise FileNotFoundError(
            f"no model tensors in the dist checkpoint {path!r} (looked for sharded keys starting "
            f"with {prefix!r} + one of {MODEL_KEY_PREFIXES}; found {len(metadata)} other keys)"
        )
    _check_storage_files(Path(path), set(wanted))
    with _single_process_group():
        # Every rank reads whole tensors: no access-integrity check (as load_plain_tensors).
        loaded = dist_checkpointing.load(wanted, path, validate_access_integrity=False)
    # load() also merges in the common (non-tensor) state: keep only the tensors asked for.
    tensors = {k[len(prefix) :]: loaded[k] for k in wanted}
    return unshard_model_keys(tensors, num_layers=num_layers)


def _check_storage_files(path: Path, keys: set[str]) -> None:
    """Every file that holds a piece of `keys` must be there, and long enough.

    Raises:
        IncompleteCheckpointError: naming the tensors with missing pieces and the files.
    """
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(path)).read_metadata().storage_data
    missing: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        if index.fqn not in keys:
            continue
        name = info.relative_path
        if name not in sizes:
            file = path / name
            sizes[name] = file.stat().st_size if file.is_file() else -1
        if sizes[name] < info.offset + info.length:
            missing.setdefault(index.fqn, set()).add(name)
    if missing:
        files = sorted({name for names in missing.values() for name in names})
        raise IncompleteCheckpointError(
            [f"{key} (in {', '.join(sorted(names))})" for key, names in sorted(missing.items())],
            [],
            where=f"{str(path)!r}: missing or truncated files {files}",
        )


@contextlib.contextmanager
def _single_process_group() -> Iterator[None]:
    """A one-rank gloo group for the duration of a load, unless one is already initialized."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def unshard_model_keys(
    tensors: dict[str, torch.Tensor], *, num_layers: int
) -> dict[str, torch.Tensor]:
    """Rename sharded keys (see the module docstring) to GPTModel.state_dict() names."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for name, value in _unstack_layers(key, tensor, num_layers):
            for name2, value2 in _unstack_experts(name, value):
                name2 = _local_norm_name(name2)
                if name2 in out:
                    raise ValueError(f"two checkpoint tensors map to {name2!r}")
                out[name2] = value2
    return _merge_swiglu_halves(out)


def _local_norm_name(key: str) -> str:
    for sharded, local in _PRE_NORMS:
        if key.endswith(sharded):
            return key[: -len(sharded)] + local
    return key


def _unstack_layers(
    key: str, tensor: torch.Tensor, num_layers: int
) -> Iterable[tuple[str, torch.Tensor]]:
    if not key.startswith(_LAYERS) or re.match(r"\d+\.", key[len(_LAYERS) :]):
        yield key, tensor
        return
    if tensor.dim() == 0 or tensor.shape[0] != num_layers:
        raise ValueError(
            f"{key}: a stacked layer tensor should have a leading axis of num_layers={num_layers}, "
            f"got shape {list(tensor.shape)}"
        )
    rest = key[len(_LAYERS) :]
    for i in range(num_layers):
        yield f"{_LAYERS}{i}.{rest}", tensor[i]  # [*param_shape]


def _unstack_experts(key: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
    head, sep, rest = key.partition(_EXPERTS)
    if not sep:
        yield key, tensor
        return
    single = re.match(r"(\d+)\.(.*)", rest)
    if single:  # singleton_local_shards: one key per expert
        yield f"{head}mlp.experts.local_experts.{single.group(1)}.{single.group(2)}", tensor
        return
    for j in range(tensor.shape[0]):  # [num_experts, *param_shape]
        yield f"{head}mlp.experts.local_experts.{j}.{rest}", tensor[j]


def _merge_swiglu_halves(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Join singleton_local_shards' `<key>_w` (gate) and `<key>_v` (up) into `<key>`."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("linear_fc1.weight_v"):
            continue
        if key.endswith("linear_fc1.weight_w"):
            base = key[: -len("_w")]
            up = state.get(base + "_v")
            if up is None:
                raise ValueError(f"{key} has no matching {base}_v in the checkpoint")
            out[base] = torch.cat([tensor, up], dim=0)  # [2*ffn, h] = [gate; up]
        else:
            out[key] = tensor
    return out


def export_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    model: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    prefix: str | None = None,
    **export_kwargs: Any,
) -> Path:
    """Export a megatron-core dist checkpoint (any TP/PP/EP layout) as a Hugging Face directory.

    Args:
        checkpoint_dir: the dist checkpoint directory (the one holding metadata.json).
        model: the model's description (the padded vocabulary is the stored embedding's).
        out_dir: the directory to create.
        prefix: the prefix in front of the model's sharded keys; None finds it.
        **export_kwargs: passed to `export_state_dict` (tokenizer_dir, chat_template, dtype,
            max_shard_size, ...).
    """
    overwrite = export_kwargs.get("overwrite", False)
    check_output_dir(out_dir, overwrite=overwrite, checkpoint=checkpoint_dir)  # before the load
    state = load_full_model_tensors(checkpoint_dir, num_layers=model.num_layers, prefix=prefix)
    return export_state_dict(state, model, out_dir, **export_kwargs)
