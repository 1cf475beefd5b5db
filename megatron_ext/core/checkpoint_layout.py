"""The on-disk layout of a run's checkpoints, readable without torch or megatron-core.

A checkpoint root (CheckpointConfig.save_dir) holds one megatron-core dist checkpoint per saved
step, `iter_0000042/`, and a `latest` text file with the step of the newest complete one. Saves
stage into `iter_0000042.tmp/` and move a re-saved step aside as `iter_0000042.old/` while its
replacement is published (megatron_ext.training.checkpoint). The run's configuration lies beside
them in `config.json` (written by training.start, and by export.import_hf for an imported model).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

__all__ = [
    "LATEST",
    "OLD_SUFFIX",
    "RUN_CONFIG",
    "TMP_SUFFIX",
    "CheckpointError",
    "checkpoint_dir",
    "checkpoint_steps",
    "fsync_dir",
    "latest_step",
    "missing_root_message",
    "nearest_checkpoint_roots",
    "step_folders",
    "write_latest",
]

LATEST = "latest"
"""The tracker file: the step of the newest complete checkpoint."""
TMP_SUFFIX = ".tmp"
"""Suffix of a checkpoint folder being written."""
OLD_SUFFIX = ".old"
"""Suffix of a checkpoint folder moved aside while the same step is saved again."""
RUN_CONFIG = "config.json"
"""The run's configuration (training.config.config_to_dict's plain values, or a part of them)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to another model or run."""


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint of `step` under `root`."""
    return Path(root) / f"iter_{step:07d}"


def step_folders(root: str | os.PathLike) -> list[str]:
    """Names of the `iter_*` folders under root (complete or not), sorted."""
    return sorted(p.name for p in Path(root).glob("iter_*") if p.is_dir())


def checkpoint_steps(root: str | os.PathLike) -> list[int]:
    """Steps of the complete-looking checkpoint folders under root (`iter_NNNNNNN`), sorted."""
    names = (name.removeprefix("iter_") for name in step_folders(root))
    return sorted(int(n) for n in names if n.isdigit())


def latest_step(root: str | os.PathLike) -> int | None:
    """The step recorded in `<root>/latest`, or None when there is no checkpoint."""
    path = Path(root) / LATEST
    if not path.exists():
        return None
    text = path.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(
            f"{path} holds {text!r}, not a step number; write the step of the checkpoint to "
            f"resume from into it (folders here: {step_folders(root) or 'none'})"
        ) from None


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_latest(root: str | os.PathLike, step: int) -> None:
    """Point `latest` at `step`: write a temporary file, fsync it, rename it over `latest`."""
    root = Path(root)
    tmp = root / f".{LATEST}{TMP_SUFFIX}"
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(root / LATEST)
    fsync_dir(root)


def missing_root_message(name: str, path: str | os.PathLike) -> str:
    """'<name>=<path> does not exist; nearest checkpoint folders: ...' for an error."""
    near = nearest_checkpoint_roots(path)
    hint = (
        f"nearest checkpoint folders: {', '.join(near)}"
        if near
        else "no checkpoint folder (one with a 'latest' file) was found near it"
    )
    return f"{name}={path} does not exist; {hint}"


def nearest_checkpoint_roots(path: str | os.PathLike, limit: int = 3) -> list[str]:
    """Checkpoint roots (folders with a `latest` file) near `path`, the most similar first.

    Searched: below the deepest existing ancestor of `path`, at most three levels down, and that
    ancestor's parent's children (a sibling run). For error messages about a mistyped path.
    """
    path = Path(path).expanduser()
    base = path if path.is_absolute() else Path.cwd() / path
    anchor = base
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    found: set[Path] = set()
    for top, depth in ((anchor, 3), (anchor.parent, 1)):
        for sub in _dirs_below(top, depth):
            if (sub / LATEST).is_file() and sub != base:
                found.add(sub)
    cwd = Path.cwd()
    shown = [str(p.relative_to(cwd)) if p.is_relative_to(cwd) else str(p) for p in found]
    ranked = sorted(shown, key=lambda s: -difflib.SequenceMatcher(None, str(path), s).ratio())
    return ranked[:limit]


def _dirs_below(top: Path, depth: int, budget: int = 2000) -> list[Path]:
    """Folders below top, breadth first, at most `depth` levels and `budget` folders (checkpoint
    folders themselves and hidden ones are not entered)."""
    out, level = [top], [top]
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                nxt += [
                    p
                    for p in folder.iterdir()
                    if p.is_dir() and not p.name.startswith((".", "iter_"))
                ]
            except OSError:
                continue
            if len(out) + len(nxt) > budget:
                return out + nxt[: budget - len(out)]
        out += nxt
        level = nxt
    return out
