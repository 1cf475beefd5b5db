"""Import a Hugging Face Qwen3 / Qwen3-MoE model directory as a megatron_ext checkpoint.

`import_hf_model(hf_dir, out_dir)` writes a checkpoint root the trainer starts from
(CheckpointConfig.init_from) and the exporter reads (tools/export_hf.py):

    out_dir/
      iter_0000000/    megatron-core dist checkpoint (torch_dist) of the model's weights, step 0
      latest           "0"
      config.json      the run configuration: model (models.ModelConfig), parallel, data.eod_id
      tokenizer/       the model directory's tokenizer files (when it has any)

The checkpoint holds the tensors under the sharded keys of the trainer's own model
(models.build_model at TP=1, PP=1, EP=1, built on the meta device to read them off), with their
global shapes, so megatron reshards it on load to any TP/PP/EP layout. Embedding and output layer
are padded to `ModelConfig.padded_vocab_size(tensor_parallel)` with zero rows; megatron loads them
at another TP size too (it reads the rows both paddings share and zeroes the rest).

Memory: one Hugging Face tensor is read at a time (safetensors' safe_open, the file mapped only
while it is read), merged into its megatron tensor (QKV per query group, [gate; up], padded
vocabulary), written and dropped; the peak is about twice the largest tensor, whatever the number
of shards. Everything is checked before the first tensor is read (hf_source.read_hf_model), and
`out_dir` appears only once complete (written as a hidden temporary folder beside it, renamed).

The common state records step 0, no optimizer state (`train_state.weights_only`), and the run
configuration under `extra.config`, as training checkpoints do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from megatron_ext.core.checkpoint_layout import (
    RUN_CONFIG,
    checkpoint_dir,
    fsync_dir,
    write_latest,
)
from megatron_ext.export.checkpoint import _single_process_group
from megatron_ext.export.dist_writer import TensorChunk, write_dist_checkpoint
from megatron_ext.export.hf_files import atomic_output_dir, copy_tokenizer_files
from megatron_ext.export.hf_source import HfModel, read_hf_model
from megatron_ext.export.key_map import PlannedKey, plan_keys
from megatron_ext.export.preflight import check_output_dir
from megatron_ext.models.config import ModelConfig

__all__ = ["TOKENIZER_DIR", "import_hf_model", "model_layout", "run_config"]

TOKENIZER_DIR = "tokenizer"
"""Where the model directory's tokenizer files are copied."""
STEP = 0
"""The step of the imported checkpoint."""

_DTYPES = (torch.float32, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where a chunk's data comes from: a slice of one megatron (TP=1) state-dict tensor."""

    name: str
    """GPTModel.state_dict() name (the key map's canonical megatron name)."""
    start: tuple[int, ...]
    """Start of the slice in that tensor (the chunk's offset less its stacking axes)."""
    stacking_axes: int
    """Leading axes of the sharded key that the state-dict tensor lacks (layers, experts)."""


def model_layout(
    model: ModelConfig, tensor_parallel: int = 1
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The trainer's model's sharded tensors and objects at TP=1, PP=1, EP=1, vocabulary padded
    for `tensor_parallel`: ([(state-dict name, ShardedTensor)], [(name, ShardedObject)]).

    The model is built on the meta device (no memory for weights); the sharded state dict is the
    one training.checkpoint saves (singleton_local_shards off), with its factories applied.
    """
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factories,
    )

    from megatron_ext.core.parallel import model_parallel
    from megatron_ext.models import build_model, to_transformer_config

    # build_model pads for the config's TP size (1 here): this multiple gives the padding of
    # `tensor_parallel` (ModelConfig.padded_vocab_size); the other shapes do not depend on TP.
    padded = dataclasses.replace(
        model, make_vocab_size_divisible_by=model.make_vocab_size_divisible_by * tensor_parallel
    )
    with _single_process_group(), model_parallel(1, 1, 1):
        config = to_transformer_config(padded)
        config.use_cpu_initialization = True  # allocate with torch's default device: meta
        if config.num_moe_experts:
            # The all-to-all dispatcher opens a CUDA stream when built; the dispatcher holds no
            # weights, so the sharded keys are the same with this one (and no GPU is needed).
            config.moe_token_dispatcher_type = "allgather"
        with torch.device("meta"):
            gpt = build_model(padded, config)
        metadata = {
            "singleton_local_shards": False,  # as training.checkpoint saves
            "chained_optim_avoid_prefix": True,
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
        }
        sharded = gpt.sharded_state_dict(metadata=metadata)
        apply_factories(sharded)
    tensors, objects = [], []
    for name, value in sharded.items():
        for item in nested_values({name: value}):
            if isinstance(item, ShardedTensor):
                tensors.append((name, item))
            elif isinstance(item, ShardedObject):
                objects.append((name, item))
            else:
                raise TypeError(f"{name}: unexpected {type(item).__name__} in the sharded state")
    return tensors, objects


ObjectKey = tuple[str, tuple[int, ...], tuple[int, ...]]
"""A ShardedObject's (key, global shape, offset)."""


def _chunks(
    source: HfModel, dtype: torch.dtype, tensor_parallel: int
) -> tuple[list[TensorChunk], list[_Source], dict[ObjectKey, Any]]:
    """The checkpoint's chunks (one per sharded tensor of the model), their sources, objects."""
    tensors, objects = model_layout(source.model, tensor_parallel)
    planned = {
        entry.megatron[0]: entry for entry in plan_keys(source.model, source.padded_vocab_size)
    }
    names = {name for name, _ in tensors}
    if names != set(planned):
        raise RuntimeError(
            "the key map and the trainer's model disagree: model tensors without a key-map row "
            f"{sorted(names - set(planned))}, rows without a model tensor "
            f"{sorted(set(planned) - names)}"
        )
    chunks, sources = [], []
    for name, sh in tensors:
        if sh.flattened_range is not None:
            raise RuntimeError(f"{name}: a flattened shard cannot be imported")
        axes = sh.prepend_axis_num
        start = tuple(sh.global_offset[axes:])
        if tuple(sh.global_shape[axes:]) != planned[name].shape:
            raise RuntimeError(
                f"{name}: the trainer's model has shape {list(sh.global_shape[axes:])}, the key "
                f"map {list(planned[name].shape)}"
            )
        chunks.append(
            TensorChunk(
                key=sh.key,
                global_shape=tuple(sh.global_shape),
                offset=tuple(sh.global_offset),
                shape=(1,) * axes + tuple(sh.local_shape),
                dtype=dtype,
            )
        )
        sources.append(_Source(name=name, start=start, stacking_axes=axes))
    kept = {
        (obj.key, tuple(obj.global_shape), tuple(obj.global_offset)): obj.data for _, obj in objects
    }
    return chunks, sources, kept


class _TensorReader:
    """Chunk data from the Hugging Face shards: one megatron tensor built at a time."""

    def __init__(
        self, source: HfModel, sources: list[_Source], dtype: torch.dtype, progress: bool
    ) -> None:
        self.source = source
        self.sources = sources
        self.dtype = dtype
        plan = plan_keys(source.model, source.padded_vocab_size)
        self.planned: dict[str, PlannedKey] = {e.megatron[0]: e for e in plan}
        self._cached: tuple[str, torch.Tensor] | None = None
        self._bar = tqdm(total=len(sources), desc="import", unit="tensor", disable=not progress)

    def _read(self, hf_name: str) -> torch.Tensor:
        file = self.source.directory / self.source.tensors[hf_name].file
        with safe_open(str(file), framework="pt") as f:  # mapped only while read
            return f.get_tensor(hf_name)

    def _megatron_tensor(self, name: str) -> torch.Tensor:
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # drop the previous tensor before building the next
            entry = self.planned[name]
            parts = tuple(self._read(hf_name) for hf_name in entry.hf)
            tensor = entry.merge(parts, self.source.model, entry.shape)
            del parts
            self._cached = (name, tensor.to(self.dtype))
        return self._cached[1]

    def __call__(self, position: int, chunk: TensorChunk) -> torch.Tensor:
        """The chunk's data: a copy of its slice of the megatron tensor, which the writer frees
        once written (the megatron tensor is kept while its next chunk needs it)."""
        where = self.sources[position]
        tensor = self._megatron_tensor(where.name)
        local_shape = chunk.shape[where.stacking_axes :]
        index = tuple(slice(s, s + n) for s, n in zip(where.start, local_shape, strict=True))
        piece = tensor[index].reshape(chunk.shape).clone()  # [1, ..., *local_shape]
        last = position + 1 == len(self.sources)
        if last or self.sources[position + 1].name != where.name:
            self._cached = None  # its last chunk: drop it before the writer asks for the next
        self._bar.update(1)
        if last:
            self._bar.close()
        return piece

    def close(self) -> None:
        """Close the progress bar and drop the cache (also after a failure)."""
        self._bar.close()
        self._cached = None


def run_config(
    source: HfModel, tensor_parallel: int, pipeline_parallel: int, expert_parallel: int
) -> dict[str, Any]:
    """The run configuration of the imported checkpoint (a partial TrainConfig: a file that
    the trainer's `--config` reads, and what export.from_training reads)."""
    config: dict[str, Any] = {
        "model": source.model.to_dict(),
        "parallel": {
            "tensor": tensor_parallel,
            "pipeline": pipeline_parallel,
            "expert": expert_parallel,
        },
    }
    if source.eod_id is not None:
        config["data"] = {"eod_id": int(source.eod_id)}
    return config


def _common_state(source: HfModel, config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {
        "train_state": {
            "step": STEP,
            "consumed_samples": 0,
            "layout": (1, 1, 1),  # (pp, tp, dp) of the writing process
            "distributed_optimizer": False,
            "weights_only": True,
        },
        "extra": {
            "config": config,
            "import": {
                "source": str(source.directory.absolute()),
                "model_type": source.model_type,
                "dtype": str(dtype).removeprefix("torch."),
            },
        },
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def import_hf_model(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Import a Hugging Face Qwen3 / Qwen3-MoE directory as a checkpoint root (module docstring).

    Args:
        hf_dir: the model directory (config.json, safetensors weights, tokenizer files).
        out_dir: the checkpoint root to create; it appears only once complete.
        tensor_parallel: TP size the vocabulary is padded for (the layout the run will use).
        pipeline_parallel: PP size (checked to divide the layers; recorded in config.json).
        expert_parallel: EP size (checked to divide the experts; recorded in config.json).
        dtype: dtype stored, float32 (the trainer's parameters) or bfloat16.
        overwrite: replace an existing out_dir (only once the new one is complete).
        progress: print what is imported and show a progress bar.

    Returns:
        The absolute path of the checkpoint root.

    Raises:
        FileExistsError: out_dir exists and overwrite is False.
        FileNotFoundError, UnsupportedArchitectureError, ValueError: see hf_source.read_hf_model.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _DTYPES]}, got {dtype}")
    check_output_dir(out_dir, overwrite=overwrite, checkpoint=hf_dir)
    source = read_hf_model(
        hf_dir,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        expert_parallel=expert_parallel,
    )
    chunks, sources, objects = _chunks(source, dtype, tensor_parallel)
    config = run_config(source, tensor_parallel, pipeline_parallel, expert_parallel)
    if progress:
        m = source.model
        kind = f"MoE, {m.num_experts} experts" if m.is_moe else "dense"
        print(
            f"importing {source.directory} ({source.model_type}, {kind}, {m.num_layers} layers, "
            f"vocabulary {m.vocab_size} padded to {source.padded_vocab_size} for tensor parallelism "
            f"{tensor_parallel}): {len(source.tensors)} tensors in {len(source.files)} "
            f"safetensors files, {source.total_bytes / 1e6:.1f} MB, stored as "
            f"{str(dtype).removeprefix('torch.')}",
            flush=True,
        )
    reader = _TensorReader(source, sources, dtype, progress)
    try:
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            folder = checkpoint_dir(tmp, STEP)
            write_dist_checkpoint(
                folder, chunks, reader, objects=objects, common=_common_state(source, config, dtype)
            )
            fsync_dir(folder)
            if source.tokenizer_files:
                (tmp / TOKENIZER_DIR).mkdir()
                copy_tokenizer_files(source.directory, tmp / TOKENIZER_DIR)
            _write_json(tmp / RUN_CONFIG, config)
            write_latest(tmp, STEP)  # last: a root without 'latest' is no checkpoint
    finally:
        reader.close()
    return Path(out_dir).absolute()
