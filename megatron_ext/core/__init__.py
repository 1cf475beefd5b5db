"""Glue between megatron_ext and megatron-core: the CPU compatibility layer."""

from megatron_ext.core.cpu_compat import cpu_compat_active, install_cpu_compat

__all__ = ["cpu_compat_active", "install_cpu_compat"]
