"""Lazily imported package names: `import megatron_ext.x` stays cheap (no torch, no megatron).

A package lists which submodule defines each public name; the name is imported on first access.
Command lines can then check their arguments before the slow imports (torch takes 2-5 s,
megatron-core 5-15 s).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of a package whose names load on first use.

    Args:
        package: the package's `__name__`.
        exports: public name -> the submodule (relative to the package) that defines it.
        namespace: the package's `globals()`; a loaded name is cached there.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
