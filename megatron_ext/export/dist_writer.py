"""Write a megatron-core dist checkpoint (torch_dist format) from one process, a tensor at a time.

`dist_checkpointing.save` stages every tensor of the state dict in memory before writing (its
writer is built for asynchronous saves), so saving a model it has not built means holding all of
it. This writer produces the same files from a list of tensor *chunks* whose data is made on
demand, in list order, and dropped once written: the memory needed is that of one chunk.

What megatron-core 0.19's loader reads (dist_checkpointing.serialization.load, checked there and in
strategies/torch.py): a torch.distributed.checkpoint directory (`.metadata` plus `__0_0.distcp`)
whose tensors are the sharded keys with their *global* shapes, any split into chunks (the loader
reads each rank's part out of whatever chunks overlap it, so a checkpoint written as whole layers
loads at every TP/PP/EP layout); every ShardedObject stored as bytes under its unique key
(`torch.save` of the list of its data); the common (non-sharded) state as the ShardedObject
`common_state`; and `metadata.json` naming the torch_dist backend.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    BytesIOWriteData,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.state_dict_saver import save

__all__ = ["TensorChunk", "write_dist_checkpoint"]

COMMON_STATE_KEY = "common_state"
"""The ShardedObject that holds the common state (megatron-core serialization.save)."""


@dataclasses.dataclass(frozen=True)
class TensorChunk:
    """One chunk of one global tensor of the checkpoint."""

    key: str
    """Sharded key (the tensor's name in the checkpoint)."""
    global_shape: tuple[int, ...]
    """Shape of the whole tensor."""
    offset: tuple[int, ...]
    """Where the chunk starts in the whole tensor."""
    shape: tuple[int, ...]
    """Shape of the chunk (as many axes as global_shape)."""
    dtype: torch.dtype
    """dtype stored."""

    def __post_init__(self) -> None:
        if not len(self.global_shape) == len(self.offset) == len(self.shape):
            raise ValueError(
                f"{self.key}: offset {self.offset} and shape {self.shape} need "
                f"{len(self.global_shape)} axes, as the global shape {self.global_shape}"
            )
        for start, size, total in zip(self.offset, self.shape, self.global_shape, strict=True):
            if start < 0 or size < 0 or start + size > total:
                raise ValueError(
                    f"{self.key}: chunk at {self.offset} of shape {self.shape} lies outside the "
                    f"global shape {self.global_shape}"
                )


def _sharded_object_key(key: str, shape: tuple[int, ...], offset: tuple[int, ...]) -> str:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(key, None, shape, offset).unique_key


def _object_bytes(data: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save([data], buffer)  # a list of the data of this rank's shards, as megatron stores it
    buffer.seek(0)
    return buffer


class _StreamingPlanner(SavePlanner):
    """A save plan given up front (chunks and objects); chunk data made on demand, in plan order.

    torch's FileSystemWriter (2.14, filesystem._write_files_from_queue) keeps a reference to the
    last tensor written under each key until its file is complete (for its safetensors format),
    which would keep e.g. the whole embedding alive to the end. Each chunk's memory is therefore
    released as soon as it is written: the writer asks for the next chunk only then (one thread,
    no copy-ahead), so the previous one's storage is shrunk to nothing at that moment.
    """

    def __init__(
        self,
        items: list[WriteItem],
        chunks: dict[MetadataIndex, tuple[int, TensorChunk]],
        objects: dict[str, io.BytesIO],
        load: Callable[[int, TensorChunk], torch.Tensor],
    ) -> None:
        self._items = items
        self._chunks = chunks
        self._objects = objects
        self._load = load
        self._written: torch.Tensor | None = None

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        """Nothing to set up: the plan does not come from a state dict."""

    def create_local_plan(self) -> SavePlan:
        """The chunks and objects, in the order given."""
        return SavePlan(self._items)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """The one rank's plan and the checkpoint metadata it describes."""
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        """The plan as the storage writer completed it."""
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        """Make the data of one write item (called once per item, in plan order)."""
        if write_item.type == WriteItemType.BYTE_IO:
            return self._objects[write_item.index.fqn]
        self.release()  # the previous chunk is in the file now
        position, chunk = self._chunks[dataclasses.replace(write_item.index, index=None)]
        tensor = self._load(position, chunk)
        if tuple(tensor.shape) != chunk.shape or tensor.dtype != chunk.dtype:
            raise ValueError(
                f"{chunk.key} at {chunk.offset}: made a {tensor.dtype} tensor of shape "
                f"{list(tensor.shape)}, the checkpoint needs {chunk.dtype} {list(chunk.shape)}"
            )
        storage = tensor.untyped_storage()
        if not tensor.is_contiguous() or storage.nbytes() != tensor.nbytes:
            tensor = tensor.contiguous().clone()  # a storage of its own, to release alone
        self._written = tensor
        return tensor

    def release(self) -> None:
        """Free the memory of the chunk written last (its storage resized to 0 bytes)."""
        if self._written is not None:
            storage = self._written.untyped_storage()
            if storage.resizable():
                storage.resize_(0)
            self._written = None
            _trim_heap()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def _trim_heap() -> None:
    """Hand the heap's freed memory back to the system (glibc's malloc_trim).

    glibc raises its mmap threshold to the size of each large block freed, so after the first
    few-MB tensor is freed the next ones come from the heap, and a stream of such tensors grows
    the resident set by tens of MB although every one is freed (measured: 8-layer model,
    +40 MB). Trimming after each chunk keeps the import's memory at its working set.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def write_dist_checkpoint(
    directory: str | os.PathLike[str],
    chunks: Sequence[TensorChunk],
    load: Callable[[int, TensorChunk], torch.Tensor],
    *,
    objects: Mapping[tuple[str, tuple[int, ...], tuple[int, ...]], Any] | None = None,
    common: dict[str, Any],
) -> Path:
    """Write a torch_dist checkpoint into the empty (or new) `directory`.

    Args:
        directory: where the checkpoint goes (it holds metadata.json once complete).
        chunks: every chunk of every tensor; together they must cover each tensor once.
        load: (position in `chunks`, chunk) -> its data, a CPU tensor of the chunk's shape and
            dtype; called once per chunk, in the order of `chunks`, from this thread. Its memory
            is freed once written (the storage resized to 0 bytes): return a tensor that is not
            used afterwards (a tensor sharing a larger storage is copied first).
        objects: ShardedObjects, (key, global shape, offset) -> data (pickled with torch.save).
        common: the common state; plain Python values only (the loader reads it with
            torch.load(weights_only=True)).

    Returns:
        The directory.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items: list[WriteItem] = []
    by_index: dict[MetadataIndex, tuple[int, TensorChunk]] = {}
    for position, chunk in enumerate(chunks):
        index = MetadataIndex(chunk.key, torch.Size(chunk.offset))
        if index in by_index:
            raise ValueError(f"{chunk.key}: two chunks at offset {chunk.offset}")
        by_index[index] = (position, chunk)
        items.append(
            WriteItem(
                index=index,
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(
                        offsets=torch.Size(chunk.offset), sizes=torch.Size(chunk.shape)
                    ),
                    properties=TensorProperties(dtype=chunk.dtype),
                    size=torch.Size(chunk.global_shape),
                ),
            )
        )
    _check_coverage(chunks)
    payloads = {
        _sharded_object_key(key, shape, offset): _object_bytes(data)
        for (key, shape, offset), data in (objects or {}).items()
    }
    payloads[_sharded_object_key(COMMON_STATE_KEY, (1,), (0,))] = _object_bytes(common)
    for fqn, buffer in payloads.items():
        items.append(
            WriteItem(
                index=MetadataIndex(fqn),
                type=WriteItemType.BYTE_IO,
                bytes_io_data=BytesIOWriteData(nbytes=buffer.getbuffer().nbytes),
            )
        )
    planner = _StreamingPlanner(items, by_index, payloads, load)
    # One thread and no copy-ahead: chunks are made one at a time, in order.
    writer = FileSystemWriter(
        str(directory), single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0
    )
    try:
        save({}, storage_writer=writer, planner=planner, no_dist=True)
    finally:
        planner.release()
    save_config(CheckpointingConfig("torch_dist", 1), str(directory))
    return directory


def _check_coverage(chunks: Sequence[TensorChunk]) -> None:
    """Every tensor's chunks add up to its size (one global shape and dtype per key)."""
    seen: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}
    for chunk in chunks:
        numel = 1
        for size in chunk.shape:
            numel *= size
        shape, dtype, total = seen.get(chunk.key, (chunk.global_shape, chunk.dtype, 0))
        if (shape, dtype) != (chunk.global_shape, chunk.dtype):
            raise ValueError(
                f"{chunk.key}: chunks of global shape {shape} ({dtype}) and "
                f"{chunk.global_shape} ({chunk.dtype})"
            )
        seen[chunk.key] = (shape, dtype, total + numel)
    for key, (shape, _, total) in seen.items():
        numel = 1
        for size in shape:
            numel *= size
        if total != numel:
            raise ValueError(f"{key}: the chunks hold {total} of the {numel} elements")
