"""megatron-core's compiled functions are compiled at their first call, not when it is imported.

While `megatron.core` is imported, some thirty functions are decorated with `torch.compile`: those
of `megatron.core.jit.jit_fuser` (which is `torch.compile`: the bias-GeLU/SwiGLU fusions, the fused
cross-entropy helpers, the RMSNorm and router helpers) and the inference router's top-k. Decorating
with torch.compile imports TorchDynamo and Inductor: 3 s of CPU at the start of every process on
this stack, paid by every rank, launcher and tool, and by most of them for functions they never
call (a CPU run, or one with `bias_activation_fusion` off, calls none of them).

`defer_megatron_compile()` (run when megatron_ext is imported) makes each such bare decoration,
`torch.compile(fn)`, return a function that calls that same `torch.compile(fn)` at its first call,
once. What runs is unchanged: the same function compiled the same way, only later. Inside a region
torch is already compiling, the function is called as it is, for TorchDynamo to trace as it traces
a compiled function there. Calls of torch.compile with arguments, and every call outside megatron's
import, are torch's own; `megatron.core.jit.jit_fuser` keeps deferring for later decorations.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import inspect
import sys
import threading
from typing import Any, Callable, Iterator

_PACKAGE = "megatron.core"
_JIT = "megatron.core.jit"


def compile_on_first_call(fn: Callable) -> Callable:
    """`torch.compile(fn)`, made when the function is first called rather than now."""
    compiled: Callable | None = None
    lock = threading.Lock()

    @functools.wraps(fn)
    def first_call_compiles(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        import torch

        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            with lock:
                if compiled is None:
                    compiled = _torch_compile()(fn)
        return compiled(*args, **kwargs)

    return first_call_compiles


def _torch_compile() -> Callable:
    import torch

    return getattr(torch.compile, "__wrapped_compile__", torch.compile)


@contextlib.contextmanager
def _bare_compiles_deferred() -> Iterator[None]:
    """While it is open, `torch.compile(fn)` (a function, no arguments) compiles at first call."""
    import torch

    real = torch.compile

    def compile(model=None, **kwargs):
        if inspect.isfunction(model) and not kwargs:
            return compile_on_first_call(model)
        return real(model, **kwargs)

    compile.__wrapped_compile__ = real
    torch.compile = compile
    try:
        yield
    finally:
        torch.compile = real
        jit = sys.modules.get(_JIT)
        if jit is not None and getattr(jit, "jit_fuser", None) is compile:
            jit.jit_fuser = compile_on_first_call  # not the window's wrapper, which outlives it


class _Loader(importlib.abc.Loader):
    """megatron.core's own loader, run with bare torch.compile decorations deferred."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _bare_compiles_deferred():
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _PACKAGE:
            return None
        sys.meta_path.remove(self)  # one package, once
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def defer_megatron_compile() -> None:
    """Defer the compilations of megatron-core's import (idempotent). If megatron-core is imported
    already, only what `megatron.core.jit.jit_fuser` decorates from now on is deferred."""
    jit = sys.modules.get(_JIT)
    if _PACKAGE in sys.modules:
        import torch

        if jit is not None and getattr(jit, "jit_fuser", None) is torch.compile:
            jit.jit_fuser = compile_on_first_call
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
