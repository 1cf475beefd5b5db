"""Pre-training with the reward-shaped loss on megatron-core: typed config, trainer, CLI.

Names are imported on first use (megatron_ext._lazy): the configuration classes load without
torch or megatron-core, so the command line checks its arguments before the slow imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_ext._lazy import lazy_exports

if TYPE_CHECKING:
    from megatron_ext.training.config import (
        CheckpointConfig,
        ConfigError,
        DataConfig,
        LoggingConfig,
        OptimizerConfig,
        ParallelConfig,
        TrainConfig,
        config_from_dict,
        config_to_dict,
        load_config,
    )
    from megatron_ext.training.trainer import Trainer, TrainResult, pretrain, trainer_session

_EXPORTS = {
    "CheckpointConfig": "config",
    "ConfigError": "config",
    "DataConfig": "config",
    "LoggingConfig": "config",
    "OptimizerConfig": "config",
    "ParallelConfig": "config",
    "TrainConfig": "config",
    "TrainResult": "trainer",
    "Trainer": "trainer",
    "config_from_dict": "config",
    "config_to_dict": "config",
    "load_config": "config",
    "pretrain": "trainer",
    "trainer_session": "trainer",
}

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "pretrain",
    "trainer_session",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
