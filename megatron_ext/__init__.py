"""megatron_ext: reward-shaped next-token prediction for megatron-core pretraining.

Importing the package drops the messages megatron-core and torch print on every rank that are
expected on this stack (megatron_ext.core.quiet lists them, each by its exact text).
"""

from megatron_ext.core.quiet import quiet_expected_messages

__version__ = "0.1.0"

quiet_expected_messages()
