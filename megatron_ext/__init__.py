"""megatron_ext: reward-shaped next-token prediction for megatron-core pretraining.

Importing the package drops the messages megatron-core and torch print on every rank that are
expected on this stack (megatron_ext.core.quiet lists them, each by its exact text), and makes
megatron-core compile its fused functions at their first call rather than when it is imported
(megatron_ext.core.jit: 3 s off every process's start).
"""

from megatron_ext.core.jit import defer_megatron_compile
from megatron_ext.core.quiet import quiet_expected_messages

__version__ = "0.1.0"

quiet_expected_messages()
defer_megatron_compile()
