"""Glue between megatron_ext and megatron-core: the CPU compatibility layer, process groups, and
the filter of expected messages. Names are imported on first use (megatron_ext._lazy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_ext._lazy import lazy_exports

if TYPE_CHECKING:
    from megatron_ext.core.cpu_compat import cpu_compat_active, install_cpu_compat

_EXPORTS = {
    "cpu_compat_active": "cpu_compat",
    "install_cpu_compat": "cpu_compat",
}

__all__ = [
    "cpu_compat_active",
    "install_cpu_compat",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
