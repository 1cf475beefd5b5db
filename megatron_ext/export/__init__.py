"""Export megatron_ext checkpoints to Hugging Face Qwen3 / Qwen3-MoE model directories.

The model is described by `models.ModelConfig`, the trainer's own description, translated to and
from transformers' Qwen3Config / Qwen3MoeConfig by `to_hf_config` / `from_hf_config`. Two layers:
`export_state_dict` turns a full megatron GPTModel state dict plus its ModelConfig into a model
directory (config.json, generation_config.json, sharded safetensors with an index,
tokenizer files); `load_full_model_tensors` turns a megatron-core dist checkpoint saved under any
TP/PP/EP layout into that full state dict. `export_training_checkpoint` does both for the
checkpoints of the trainer (and of the importer), reading the architecture from the run
configuration they store; the exporter does not import the trainer. The key map lives in
`megatron_ext.export.key_map`; the CLI is tools/export_hf.py.

The other direction: `import_hf_model` turns a Hugging Face Qwen3 / Qwen3-MoE directory into a
checkpoint root that the trainer starts from (CheckpointConfig.init_from) and the exporter reads,
through the same key map (`read_hf_model` checks the directory first); the CLI is
tools/import_hf.py.

The names below are imported on first use: importing this package (or its standard-library-only
modules `arch`, `hf_config` and `preflight`) does not import torch, so a command line can check
its arguments first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_ext._lazy import lazy_exports

if TYPE_CHECKING:
    from megatron_ext.export.arch import (
        UnsupportedArchitectureError,
        arch_from_gpt_model,
        arch_from_megatron_config,
        check_exportable,
        moe_layer_pattern,
    )
    from megatron_ext.export.checkpoint import export_checkpoint, load_full_model_tensors
    from megatron_ext.export.convert import (
        IncompleteCheckpointError,
        convert_state_dict,
        export_state_dict,
        iter_hf_tensors,
        resolve_keys,
    )
    from megatron_ext.export.from_training import (
        arch_from_training_checkpoint,
        export_training_checkpoint,
    )
    from megatron_ext.export.hf_config import from_hf_config, to_hf_config
    from megatron_ext.export.hf_source import HfModel, read_hf_model
    from megatron_ext.export.import_hf import import_hf_model
    from megatron_ext.export.key_map import KEY_MAP, plan_keys

_MODULES = {
    "KEY_MAP": "key_map",
    "HfModel": "hf_source",
    "IncompleteCheckpointError": "convert",
    "UnsupportedArchitectureError": "arch",
    "arch_from_gpt_model": "arch",
    "arch_from_megatron_config": "arch",
    "arch_from_training_checkpoint": "from_training",
    "check_exportable": "arch",
    "convert_state_dict": "convert",
    "export_checkpoint": "checkpoint",
    "export_state_dict": "convert",
    "export_training_checkpoint": "from_training",
    "from_hf_config": "hf_config",
    "import_hf_model": "import_hf",
    "iter_hf_tensors": "convert",
    "load_full_model_tensors": "checkpoint",
    "moe_layer_pattern": "arch",
    "plan_keys": "key_map",
    "read_hf_model": "hf_source",
    "resolve_keys": "convert",
    "to_hf_config": "hf_config",
}
"""Public name -> the submodule that defines it."""

__all__ = [
    "KEY_MAP",
    "HfModel",
    "IncompleteCheckpointError",
    "UnsupportedArchitectureError",
    "arch_from_gpt_model",
    "arch_from_megatron_config",
    "arch_from_training_checkpoint",
    "check_exportable",
    "convert_state_dict",
    "export_checkpoint",
    "export_state_dict",
    "export_training_checkpoint",
    "from_hf_config",
    "import_hf_model",
    "iter_hf_tensors",
    "load_full_model_tensors",
    "moe_layer_pattern",
    "plan_keys",
    "read_hf_model",
    "resolve_keys",
    "to_hf_config",
]
__getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())
