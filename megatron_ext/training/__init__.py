"""Pre-training with the reward-shaped loss on megatron-core: typed config, trainer, CLI."""

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
