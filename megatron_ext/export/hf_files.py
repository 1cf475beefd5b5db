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
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import StateDictSplit, split_torch_state_dict_into_shards
from safetensors.torch import save_file

from megatron_ext.export.hf_config import hf_config_json, to_hf_config
from megatron_ext.export.preflight import (
    CHAT_TEMPLATE_FILE,
    TOKENIZER_FILES,
    check_output_dir,
    parse_size,
    tokenizer_chat_template,
    tokenizer_files,
)
from megatron_ext.models.config import ModelConfig

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "TOKENIZER_FILES",
    "atomic_output_dir",
    "copy_tokenizer_files",
    "default_mode",
    "generation_config_dict",
    "hf_config_dict",
    "install_chat_template",
    "parse_size",
    "write_safetensors",
]

SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def hf_config_dict(
    model: ModelConfig,
    *,
    dtype: torch.dtype,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """config.json for Qwen3ForCausalLM or Qwen3MoeForCausalLM: transformers' own config object
    of the model (hf_config.to_hf_config) as config.json holds it (hf_config.hf_config_json,
    with the flat fields transformers 4.x and vLLM read)."""
    config = to_hf_config(
        model,
        dtype=dtype,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return hf_config_json(config)


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


def write_safetensors(
    directory: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    layout: Mapping[str, torch.Tensor],
    max_shard_size: int | str,
) -> StateDictSplit:
    """Write the model's tensors as safetensors shards with their index, as save_pretrained does.

    The shard plan (which tensor goes in which model-0000i-of-0000n.safetensors, or the one
    model.safetensors, and the index's metadata) is huggingface_hub's
    `split_torch_state_dict_into_shards`, made from `layout` (the tensors' shapes and dtypes, on
    the meta device) before any data exists; each shard is written with safetensors' `save_file`
    as soon as its last tensor has arrived from `tensors` (an iterator that makes them one at a
    time), so memory holds about one shard, not the model (the plan can put a tensor larger than
    `max_shard_size` into a shard of its own while another is still being filled: that shard
    waits).

    Args:
        directory: where the files go.
        tensors: (name, CPU tensor owning its storage), in any order, each name of `layout` once.
        layout: name -> a tensor of the same shape and dtype (e.g. on the meta device), in the
            order that decides the shards.
        max_shard_size: the largest shard, bytes or a string like "5GB".

    Returns:
        The plan (filename_to_tensors, tensor_to_filename, metadata, is_sharded).

    Raises:
        ValueError: a tensor not in `layout`, written twice, or of another shape or dtype; or
            tensors of `layout` that never came.
    """
    split = split_torch_state_dict_into_shards(dict(layout), max_shard_size=max_shard_size)
    waiting = {file: set(names) for file, names in split.filename_to_tensors.items()}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        file = split.tensor_to_filename.get(name)
        if file is None or name not in waiting.get(file, ()):
            raise ValueError(f"tensor {name!r} is not in the layout, or written twice")
        planned = layout[name]
        if tuple(tensor.shape) != tuple(planned.shape) or tensor.dtype != planned.dtype:
            raise ValueError(
                f"tensor {name!r}: {tensor.dtype} {list(tensor.shape)}, the layout says "
                f"{planned.dtype} {list(planned.shape)}"
            )
        pending.setdefault(file, {})[name] = tensor
        waiting[file].discard(name)
        if not waiting[file]:
            del waiting[file]
            save_file(pending.pop(file), str(directory / file), metadata={"format": "pt"})
    if waiting:
        missing = sorted(name for names in waiting.values() for name in names)
        raise ValueError(f"{len(missing)} tensors of the layout were not written: {missing[:5]}")
    if split.is_sharded:
        index = {
            "metadata": split.metadata,
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        write_json(directory / SAFE_WEIGHTS_INDEX_NAME, index)
    return split


def write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON with sorted keys and a final newline, as transformers writes its configs."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(tokenizer_dir: str | os.PathLike[str], out_dir: Path) -> list[str]:
    """Copy the tokenizer files of `tokenizer_dir` (preflight.tokenizer_file_names: TOKENIZER_FILES
    and the named chat templates) into `out_dir`; returns their relative paths."""
    copied = tokenizer_files(tokenizer_dir)
    for name in copied:
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    return copied


def install_chat_template(directory: Path, template: str) -> str | None:
    """Make `template` the (default) chat template of the tokenizer files in `directory`.

    It is written to chat_template.jinja, where transformers' save_pretrained puts the template
    (checked with 5.24) and which its from_pretrained reads before tokenizer_config.json's
    `chat_template`; a default template in tokenizer_config.json is removed so that no reader
    finds the replaced one (named templates stay). Returns the template replaced, None when the
    tokenizer had none.
    """
    previous = tokenizer_chat_template(directory)
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        old = config.get("chat_template")
        if isinstance(old, str):
            del config["chat_template"]
        elif isinstance(old, list):
            named = [t for t in old if not (isinstance(t, dict) and t.get("name") == "default")]
            if named:
                config["chat_template"] = named
            else:
                del config["chat_template"]
        if old is not None:
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (directory / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    return previous


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
