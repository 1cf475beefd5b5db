"""Checks of an export's inputs and output that need only the standard library.

The exporter itself runs them (so library calls fail with the same messages), and
tools/export_hf.py runs them before it imports torch and megatron-core, so a wrong path or value
is reported within a fraction of a second instead of after 10-20 s of imports. Every check raises
the exception a library user would expect: FileNotFoundError for a path that is not there or is
not what it should be, FileExistsError for an output that exists, ValueError for a bad value.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

from megatron_ext.core.checkpoint_layout import (
    LATEST,
    checkpoint_dir,
    missing_root_message,
    step_folders,
)
from megatron_ext.models.config import ModelConfig

__all__ = [
    "TOKENIZER_FILES",
    "check_checkpoint_path",
    "check_output_dir",
    "parse_size",
    "read_arch_file",
    "read_chat_template",
    "tokenizer_chat_template",
    "tokenizer_file_names",
    "tokenizer_files",
]

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied from a tokenizer directory when present (never a config.json or weights)."""

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""The tokenizer's (default) chat template, as transformers writes and reads it first."""
CHAT_TEMPLATES_DIR = "additional_chat_templates"
"""transformers' folder of named chat templates (<name>.jinja), also copied."""

_METADATA = "metadata.json"  # megatron-core's dist checkpoint marker (CheckpointingConfig)
_BACKEND = "torch_dist"  # the only dist checkpoint format load_full_model_tensors reads
_TENSOR_INDEX = ".metadata"  # torch.distributed.checkpoint's metadata, which the loader reads


def check_checkpoint_path(
    path: str | os.PathLike[str], step: int | None = None
) -> Literal["folder", "root"]:
    """Whether `path` is a dist checkpoint folder or a training run's checkpoint root.

    A folder holds megatron-core's metadata.json (torch_dist format) and torch's .metadata index;
    a root holds the `latest` file of a training run (with `step`, iter_* folders without
    it are enough). Which step folder a root resolves to, and whether its files are complete, is
    left to the exporter.

    Raises:
        FileNotFoundError: `path` does not exist, is not a folder, holds neither, or is a
            checkpoint folder without its .metadata index.
        ValueError: metadata.json is not a readable torch_dist checkpoint description, or `step`
            is given for a single checkpoint folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(missing_root_message("checkpoint", path))
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is a file, not a checkpoint folder")
    if (path / _METADATA).is_file():
        _check_metadata(path / _METADATA)
        if not (path / _TENSOR_INDEX).is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is an incomplete dist checkpoint: it has no {_TENSOR_INDEX} file "
                "(the torch_dist index of its tensors)"
            )
        if step is not None:
            raise ValueError(f"{str(path)!r} is one checkpoint; step={step} needs the run's root")
        return "folder"
    steps = step_folders(path)
    if step is not None and not checkpoint_dir(path, step).is_dir():
        raise FileNotFoundError(
            f"step {step}: {checkpoint_dir(path, step)} does not exist (checkpoints under "
            f"{path}: {', '.join(steps) or 'none'})"
        )
    if (path / LATEST).is_file() or (steps and step is not None):
        return "root"
    if steps:
        hint = f"; it has {', '.join(steps)} but no 'latest' file: name a step or one of them"
    elif not any(path.iterdir()):
        hint = " (it is empty)"
    else:
        hint = ""
    raise FileNotFoundError(
        f"{str(path)!r} is not a checkpoint: neither a dist checkpoint folder (no {_METADATA}) "
        f"nor a training run's checkpoint root (no '{LATEST}' file){hint}"
    )


def _check_metadata(file: Path) -> None:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(file)!r} is not a dist checkpoint description: {exc}") from None
    backend = data.get("sharded_backend") if isinstance(data, dict) else None
    if backend != _BACKEND:
        raise ValueError(
            f"{str(file)!r} describes a dist checkpoint in format {backend!r}; the exporter "
            f"reads {_BACKEND!r} checkpoints"
        )


def check_output_dir(
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    overwrite_hint: str = "overwrite=True",
    checkpoint: str | os.PathLike[str] | None = None,
) -> Path:
    """The absolute output path, after checking that an export may write it.

    Args:
        out_dir: the directory to create.
        overwrite: whether an existing `out_dir` may be replaced.
        overwrite_hint: how the caller asks for overwrite, named in the error (e.g. a flag).
        checkpoint: the checkpoint being exported; it must not lie inside `out_dir`, which an
            overwrite would delete.

    Raises:
        FileExistsError: `out_dir` exists and `overwrite` is False.
        ValueError: `out_dir` is or contains `checkpoint`.
    """
    target = Path(out_dir).absolute()
    if checkpoint is not None:
        source = Path(checkpoint).resolve()
        if source == target.resolve() or target.resolve() in source.parents:
            raise ValueError(
                f"the output directory {str(target)!r} holds the checkpoint {str(source)!r}; "
                "replacing it would delete the checkpoint: choose another output directory"
            )
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} exists; pass {overwrite_hint} to replace it")
    return target


def tokenizer_file_names(tokenizer_dir: str | os.PathLike[str]) -> list[str]:
    """The TOKENIZER_FILES present in `tokenizer_dir`, then its named chat templates
    (additional_chat_templates/<name>.jinja), as paths relative to it; maybe none."""
    src = Path(tokenizer_dir)
    found = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    templates = src / CHAT_TEMPLATES_DIR
    if templates.is_dir():
        found += sorted(f"{CHAT_TEMPLATES_DIR}/{p.name}" for p in templates.glob("*.jinja"))
    return found


def tokenizer_files(tokenizer_dir: str | os.PathLike[str]) -> list[str]:
    """The tokenizer files of `tokenizer_dir` (tokenizer_file_names).

    Raises:
        FileNotFoundError: the directory does not exist or holds none of them.
    """
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(src)!r} does not exist")
    found = tokenizer_file_names(src)
    if not found:
        raise FileNotFoundError(
            f"no tokenizer files in {str(src)!r}; expected some of {', '.join(TOKENIZER_FILES)}"
        )
    return found


def tokenizer_chat_template(tokenizer_dir: str | os.PathLike[str]) -> str | None:
    """The default chat template of the tokenizer files in `tokenizer_dir`, as transformers
    finds it: chat_template.jinja, else tokenizer_config.json's `chat_template` (a string, or
    the entry named "default" of a list of named templates); None if it has none."""
    src = Path(tokenizer_dir)
    if (src / CHAT_TEMPLATE_FILE).is_file():
        return (src / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    try:
        config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def read_chat_template(path: str | os.PathLike[str]) -> str:
    """The text of a chat template file (Jinja, as tokenizer.apply_chat_template renders it).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is empty (only whitespace) or not UTF-8 text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat template {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"chat template {str(path)!r} is not UTF-8 text: {exc}") from None
    if not text.strip():
        raise ValueError(f"chat template {str(path)!r} is empty; give a Jinja chat template")
    return text


def read_arch_file(path: str | os.PathLike[str]) -> ModelConfig:
    """The model described by a JSON file of models.ModelConfig fields (ModelConfig.to_dict).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not JSON, not an object, or not a valid ModelConfig (naming the field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"architecture file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"architecture file {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - a bad file content, reported like the other values
            f"architecture file {str(path)!r} holds a {type(data).__name__}, not an object of "
            "ModelConfig fields"
        )
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"architecture file {str(path)!r}: {exc}") from None


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like "5GB", "500MB", "2GiB" (decimal units as HF)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"size must be >= 1 byte, got {size!r}")
        return size
    match = _SIZE_RE.match(str(size))
    if not match:
        raise ValueError(f"cannot read a size from {size!r}; use e.g. 5GB, 500MB or 2GiB")
    value = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()]
    if value < 1:
        raise ValueError(f"size must be >= 1 byte, got {size!r}")
    return int(value)
