"""megatron_ext: reward-shaped next-token prediction for megatron-core pretraining."""

__version__ = "0.1.0"
