"""Export the checkpoints that the trainer writes (and the importer: export.import_hf).

A training run saves `<root>/iter_<step:07d>/` (a megatron-core dist checkpoint) and `<root>/latest`
(the layout of megatron_ext.core.checkpoint_layout). Its common state holds the run's
configuration under `extra.config` (the trainer's config_to_dict), whose `model` table is a
models.ModelConfig: the model exported. The exporter rebuilds the TransformerConfig the trainer
built from it (models.to_transformer_config), so `arch.check_exportable` checks exactly what was
trained, and reads the padded vocabulary from the stored embedding's shape (it depends on the TP
size the run used). Nothing here imports the trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megatron_ext.export.arch import check_exportable
from megatron_ext.export.checkpoint import load_full_model_tensors
from megatron_ext.export.convert import export_state_dict
from megatron_ext.export.preflight import check_checkpoint_path, check_output_dir
from megatron_ext.models.config import ModelConfig

__all__ = [
    "arch_from_training_checkpoint",
    "export_training_checkpoint",
    "resolve_training_checkpoint",
    "training_run_config",
]


def resolve_training_checkpoint(path: str | os.PathLike[str], step: int | None = None) -> Path:
    """The dist checkpoint folder for `path`: a run's checkpoint root (its `latest` step, or
    `step`) or a checkpoint folder itself (holding metadata.json).

    Raises:
        FileNotFoundError: `path` is not a checkpoint (see `preflight.check_checkpoint_path`), or
            the step folder it names is missing or incomplete.
        ValueError: `step` given for a single checkpoint folder, or an unreadable metadata.json.
    """
    if check_checkpoint_path(path, step) == "folder":
        return Path(path)
    from megatron_ext.core.checkpoint_layout import checkpoint_dir, latest_step

    if step is None:
        step = latest_step(path)
        if step is None:  # the file went away since the check
            raise FileNotFoundError(f"{str(path)!r} has no 'latest' file")
    folder = checkpoint_dir(path, step)
    if not (folder / "metadata.json").is_file():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} is missing or incomplete")
    check_checkpoint_path(folder)  # a torch_dist folder with its tensor index
    return folder


def training_run_config(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The run configuration stored in a training checkpoint (config_to_dict's plain values)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    try:
        return common["extra"]["config"]
    except (KeyError, TypeError):
        raise ValueError(
            f"{str(checkpoint)!r} holds no run configuration (extra.config); it was not written "
            "by megatron_ext's trainer or importer, so pass the architecture explicitly (a "
            "models.ModelConfig; tools/export_hf.py --arch FILE, a JSON of its fields)"
        ) from None


def _run_eod_id(checkpoint: Path) -> int | None:
    try:
        return training_run_config(checkpoint).get("data", {}).get("eod_id")
    except ValueError:
        return None


def arch_from_training_checkpoint(checkpoint: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of a training checkpoint folder (see the module docstring).

    Raises:
        UnsupportedArchitectureError: the trained model cannot be expressed as Qwen3 / Qwen3-MoE
            (e.g. a shared expert).
        ValueError: the checkpoint holds no run configuration, or an invalid one.
    """
    model = ModelConfig.from_dict(training_run_config(checkpoint)["model"])
    check_exportable(model)
    return model


def export_training_checkpoint(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    model: ModelConfig | None = None,
    **export_kwargs: Any,
) -> Path:
    """Export a checkpoint of the trainer or the importer (any TP/PP/EP layout) as a Hugging Face directory.

    Args:
        path: the run's checkpoint root (CheckpointConfig.save_dir) or one iter_* folder.
        out_dir: the directory to create.
        step: which step under the root (default: the latest).
        model: override the architecture read from the checkpoint.
        **export_kwargs: passed to `export_state_dict` (tokenizer_dir, chat_template, dtype,
            max_shard_size, token ids, overwrite, progress). Without a tokenizer or an explicit eos_token_id,
            the run's end-of-document id (DataConfig.eod_id) becomes the eos token id.

    Raises:
        FileNotFoundError: `path` is not a checkpoint, or a step folder is missing.
        FileExistsError: out_dir exists and overwrite is not set.
        IncompleteCheckpointError: tensors or checkpoint files are missing (all are named).
        UnsupportedArchitectureError: the model cannot be exported as Qwen3 / Qwen3-MoE.
        ValueError: out_dir holds the checkpoint, or the checkpoint holds no run configuration
            and no `model` was given.
    """
    checkpoint = resolve_training_checkpoint(path, step)
    overwrite = export_kwargs.get("overwrite", False)
    check_output_dir(out_dir, overwrite=overwrite, checkpoint=checkpoint)  # before the load
    if model is None:
        model = arch_from_training_checkpoint(checkpoint)
    if export_kwargs.get("tokenizer_dir") is None and export_kwargs.get("eos_token_id") is None:
        export_kwargs["eos_token_id"] = _run_eod_id(checkpoint)
    state = load_full_model_tensors(checkpoint, num_layers=model.num_layers)
    return export_state_dict(state, model, out_dir, **export_kwargs)
