"""Run megatron-core's building blocks on a machine without a GPU (CPU tensors, gloo collectives).

megatron-core 0.19 assumes CUDA in a few dozen places that are otherwise device-agnostic: it asks
`torch.cuda.current_device()` for a device, allocates with a literal `device="cuda"`, moves tensors
with `.cuda()`, seeds and forks the CUDA RNG, synchronises and waits on streams, and asserts that
gradients are `torch.cuda.FloatTensor`. `install_cpu_compat()` bridges exactly these, and only when
`torch.cuda.is_available()` is False; on a GPU machine it does nothing and returns False, unless
asked to run on the CPU anyway (`force=True`, TrainConfig.device='cpu'), which hides the GPUs.

What is bridged (each checked against the installed megatron-core 0.19.2 source):

- `torch.cuda.current_device()` returns `torch.device("cpu")`. megatron uses it as a device
  argument (`device=torch.cuda.current_device()`, `.to(torch.cuda.current_device())`) in forward
  AND backward code (e.g. the tensor-parallel and MoE all-to-all autograd functions). An index 0
  would mean "cuda:0", and a TorchFunctionMode cannot rewrite it in backward: torch function modes
  are not active inside autograd backward. The only integer uses are in CUDA-only features (NCCL
  allocator, NVML energy monitor, SHARP barrier) and in the RNG helpers replaced below.
- Literal CUDA device arguments (`device="cuda"`, `"cuda:N"`, `torch.device("cuda")`, an int
  index) of any torch call are mapped to the CPU by a `TorchFunctionMode` (as the `torch.device`
  context manager does); `Tensor.to(<cuda device>)` too, and `pin_memory=True` is dropped. The
  literal uses are outside autograd (optimizer, clip_grads, schedules, local multi-tensor l2 norm,
  rerun state machine), where the mode is active.
- Activation recomputation runs forward code inside the backward pass, where the mode is not
  active: the recomputing backward of `tensor_parallel.CheckpointFunction` (full recomputation,
  and the selective recomputation of the core attention, whose local attention builds its causal
  mask with `device="cuda"`) and `CheckpointWithoutOutput._recompute` run under the mode again.
- `Tensor.cuda()` returns the (CPU) tensor itself, like `Tensor.cpu()` on a CPU tensor.
- `Tensor.type()` (no argument) reports `torch.cuda.<T>` for a CPU tensor: clip_grads asserts
  `param.grad.type() == 'torch.cuda.FloatTensor'`, and the mixed-precision and distributed
  optimizers dispatch on `param.type()` in ('torch.cuda.FloatTensor', 'torch.cuda.HalfTensor',
  'torch.cuda.BFloat16Tensor') and raise for anything else.
- `torch.cuda.synchronize()` is a no-op; `torch.cuda.current_stream()`, `default_stream()`,
  `Stream`, `Event` and `stream()` are stand-ins whose waits and records do nothing (CPU work is
  synchronous). DDP's grad sync waits on `torch.cuda.current_stream()` unconditionally.
- The "CUDA" RNG is the CPU default generator: `torch.cuda.manual_seed`, `manual_seed_all`,
  `get_rng_state`, `set_rng_state` (also under `torch.cuda.random`) and the private
  `_get_cuda_rng_state` / `_set_cuda_rng_state` of `megatron.core.tensor_parallel.random` (used by
  `CudaRNGStatesTracker.add/fork` and activation recomputation). Without this, the CUDA seeding of
  `model_parallel_cuda_manual_seed` is silently queued by torch's lazy CUDA init and never runs,
  and every tracker state would be the same. Because the CPU generator is the "CUDA" generator,
  the tracker's warning "CPU RNG state changed within GPU RNG context" is expected and filtered.
- The MoE all-to-all token dispatcher moves its split sizes to host numpy arrays only when they are
  CUDA tensors (`maybe_move_tensor_to_cpu`); on CPU they stayed tensors, which the process-group
  binding of `all_to_all_single` rejects. The dispatcher's helper now converts CPU tensors too,
  exactly as it does for CUDA ones.

Not bridged (CUDA-only features that must stay off on CPU): CUDA graphs, NCCL user buffers,
`torch.autocast("cuda")` (fp16/bf16 autocast), fused kernels (Transformer Engine, Apex), FSDP.
The TorchFunctionMode is thread-local: install the layer in the thread that builds and runs the
model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["cpu_compat_active", "install_cpu_compat"]

_LOCK = threading.Lock()
_MODE: _CudaToCpuMode | None = None
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"
_CPU = torch.device("cpu")
_TENSOR_TO = torch.Tensor.to
_TENSOR_PIN_MEMORY = torch.Tensor.pin_memory
_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _is_cuda_device(device: Any) -> bool:
    """Whether a device argument names a CUDA device (an int index means CUDA in torch)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments of torch calls to the CPU (like `torch.device`'s own mode)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = dict(kwargs, device=_CPU)
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)
        else:
            kwargs = {}
        if func is _TENSOR_TO and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        elif func is _TENSOR_PIN_MEMORY:
            return args[0]
        return func(*args, **kwargs)


def _tensor_cuda(
    self: torch.Tensor,
    device: Any = None,
    non_blocking: bool = False,
    memory_format: torch.memory_format = torch.preserve_format,
) -> torch.Tensor:
    """`Tensor.cuda()` without a GPU: the CPU tensor itself (as `Tensor.cpu()` of a CPU tensor)."""
    if memory_format is torch.preserve_format:
        return self
    return self.contiguous(memory_format=memory_format)


def _tensor_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
    """`Tensor.type()` that names a CPU tensor by its CUDA type; casts (`dtype` given) unchanged."""
    if dtype is None and not kwargs:
        name = _ORIGINAL_TENSOR_TYPE(self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            return "torch.cuda." + name.removeprefix("torch.")
        return name
    return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


class _CpuEvent:
    """A CUDA event stand-in: CPU work is synchronous, so every event has already happened."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    record = wait = synchronize = _no_op

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


class _CpuStream:
    """A CUDA stream stand-in: CPU work is synchronous, so waiting is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    wait_event = wait_stream = synchronize = _no_op

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _CpuEvent()

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _current_stream(device: Any = None) -> _CpuStream:
    return _CPU_STREAM


def _stream_context(stream: Any = None) -> contextlib.nullcontext:
    return contextlib.nullcontext()


def _current_device() -> torch.device:
    return _CPU


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _under_cpu_mode(fn: Any) -> Any:
    """`fn` with CUDA device arguments mapped to the CPU while it runs (for forward code run in
    a backward pass, where the thread's torch-function mode is not active)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    return wrapper


def _megatron_get_cuda_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    # torch.get_rng_state() already returns a copy, so `clone` needs no extra work.
    return torch.get_rng_state()


def _megatron_set_cuda_rng_state(
    new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False
) -> None:
    torch.set_rng_state(new_state)


def _maybe_move_tensor_to_cpu(
    tensor: Any, as_numpy: bool = False, record_stream: bool = False
) -> Any:
    """megatron's helper, but a CPU tensor becomes a numpy array too when `as_numpy` is asked."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


class _DropExpectedRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


def _patch_torch() -> None:
    cuda = torch.cuda
    cuda.current_device = _current_device
    cuda.synchronize = _no_op
    cuda.current_stream = _current_stream
    cuda.default_stream = _current_stream
    cuda.stream = _stream_context
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    for module in (cuda, cuda.random):
        module.manual_seed = _manual_seed
        module.manual_seed_all = _manual_seed
        module.get_rng_state = _get_rng_state
        module.set_rng_state = _set_rng_state
    torch.Tensor.cuda = _tensor_cuda
    torch.Tensor.type = _tensor_type


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import token_dispatcher

    mcore_random._get_cuda_rng_state = _megatron_get_cuda_rng_state
    mcore_random._set_cuda_rng_state = _megatron_set_cuda_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_DropExpectedRngWarning())
    token_dispatcher.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu
    checkpoint = mcore_random.CheckpointFunction
    checkpoint.backward = staticmethod(_under_cpu_mode(checkpoint.backward))
    without_output = mcore_random.CheckpointWithoutOutput
    without_output._recompute = _under_cpu_mode(without_output._recompute)


def cpu_compat_active() -> bool:
    """Whether the CPU compatibility layer is installed in this process."""
    return _MODE is not None


def _hide_gpus() -> None:
    """Make this process see no GPU (`torch.cuda.is_available()` False, no devices): megatron and
    the trainer choose the CPU wherever they ask."""
    torch.cuda.is_available = lambda: False
    torch.cuda.device_count = lambda: 0


def install_cpu_compat(*, force: bool = False) -> bool:
    """Bridge megatron-core's CUDA-only calls to the CPU when no GPU is present.

    Safe to call any number of times (later calls do nothing). Call it before building megatron
    models, optimizers or RNG trackers, in the thread that will run them, and before anything
    touched a GPU.

    Args:
        force: run on the CPU even where a GPU is visible (TrainConfig.device='cpu'): the GPUs
            are hidden from this process as well (`torch.cuda.is_available()` becomes False).

    Returns:
        True when the layer is active (installed now or earlier), False on a machine with a GPU
        without `force`, where nothing is changed.
    """
    global _MODE
    if force and torch.cuda.is_available():
        _hide_gpus()
    if _MODE is not None:
        return True
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _MODE is not None:
            return True
        _patch_torch()
        _patch_megatron()
        mode = _CudaToCpuMode()
        mode.__enter__()  # stays on this thread's torch-function mode stack for the process
        _MODE = mode
    return True
