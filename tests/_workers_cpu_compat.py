"""Checks of megatron_ext.core.cpu_compat, run in a separate process (the layer patches torch
process-wide, so the pytest process itself is left untouched)."""

from __future__ import annotations

import logging

import torch


def _install() -> None:
    from megatron_ext.core import cpu_compat, install_cpu_compat

    assert install_cpu_compat() is True
    assert install_cpu_compat() is True  # idempotent
    modes = [
        m
        for m in torch.overrides._get_current_function_mode_stack()
        if isinstance(m, cpu_compat._CudaToCpuMode)
    ]
    assert len(modes) == 1, f"expected one CUDA-to-CPU mode on the stack, found {len(modes)}"
    assert cpu_compat.cpu_compat_active()


def check_devices() -> None:
    _install()
    cpu = torch.device("cpu")
    assert torch.cuda.current_device() == cpu
    for device in ("cuda", "cuda:0", torch.device("cuda"), torch.device("cuda", 0), 0):
        assert torch.zeros(2, device=device).device == cpu, device
        assert torch.tensor([1.0], device=device).device == cpu, device
        assert torch.ones(2).new_zeros(3, device=device).device == cpu, device
        assert torch.ones(2).to(device).device == cpu, device
    assert torch.empty(2, device=torch.cuda.current_device()).device == cpu
    assert torch.empty(2, pin_memory=True).device == cpu
    t = torch.ones(3)
    assert t.cuda() is t
    assert t.cuda(non_blocking=True) is t
    assert t.to(dtype=torch.float64).dtype == torch.float64  # ordinary casts unchanged
    assert t.to(torch.float16).dtype == torch.float16
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    stream.wait_event(torch.cuda.Event())
    stream.wait_stream(torch.cuda.Stream())
    assert stream.record_event().query()
    with torch.cuda.stream(stream):
        pass


def check_tensor_type() -> None:
    _install()
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    cast = torch.ones(2).type(torch.float64)  # a cast still casts
    assert cast.dtype == torch.float64 and cast.device.type == "cpu"
    assert torch.ones(2).type("torch.DoubleTensor").dtype == torch.float64


def check_backward_without_mode() -> None:
    """torch function modes are off inside autograd backward; the bridges must not need them."""
    _install()

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            assert not torch._C._is_torch_function_mode_enabled()
            out = torch.empty(g.shape, dtype=g.dtype, device=torch.cuda.current_device())
            out.copy_(g.cuda() * 2)
            return out

    x = torch.ones(3, requires_grad=True)
    Gather.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def check_recompute_in_backward() -> None:
    """megatron's activation recomputation runs forward code (here its local attention's causal
    mask, made with device="cuda") in the backward pass, where the mode is off."""
    _install()
    from megatron.core import tensor_parallel
    from megatron.core.transformer.utils import get_default_causal_mask

    def masked(x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(get_default_causal_mask(x.shape[-1]), 0.0)

    x = torch.ones(3, 3, requires_grad=True)
    tensor_parallel.checkpoint(masked, False, x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 3).tril())


def check_force_hides_gpus() -> None:
    """device='cpu' on a machine whose torch sees a GPU: the layer goes on and hides the GPUs."""
    from megatron_ext.core import cpu_compat

    torch.cuda.is_available = lambda: True  # as on a GPU machine
    assert cpu_compat.install_cpu_compat(force=True) is True
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert cpu_compat.cpu_compat_active()
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def check_rng() -> None:
    _install()
    torch.cuda.manual_seed(5)
    a = torch.rand(4)
    torch.cuda.manual_seed(5)
    assert torch.equal(a, torch.rand(4))
    state = torch.cuda.get_rng_state()
    b = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(b, torch.rand(4))


def check_megatron_rng_tracker() -> list[str]:
    """The tracker's named states differ, fork() uses and advances them, and restores the default."""
    _install()
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("megatron.core.tensor_parallel.random")
    handler = Collect(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        torch.manual_seed(0)
        tracker = CudaRNGStatesTracker()
        tracker.add("a", 1)
        tracker.add("b", 2)
        before = torch.get_rng_state()
        with tracker.fork("a"):
            a1 = torch.rand(3)
        with tracker.fork("b"):
            b1 = torch.rand(3)
        with tracker.fork("a"):
            a2 = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before), "fork must restore the default state"
        assert not torch.equal(a1, b1), "different seeds must give different streams"
        assert not torch.equal(a1, a2), "a fork must advance its own state"
        torch.manual_seed(1)
        expected_a1 = torch.rand(3)
        assert torch.equal(a1, expected_a1), "state 'a' must be the stream of seed 1"
    finally:
        logger.removeHandler(handler)
    return messages


def check_clip_grads() -> None:
    """megatron's clip_grads asserts grads are torch.cuda.FloatTensor and allocates on 'cuda'."""
    _install()
    import torch.distributed as dist
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    made_group = not dist.is_initialized()
    if made_group:
        _init_single_rank_group()
    try:
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.full((4,), 3.0)
        norm = get_grad_norm_fp32([p.grad], grad_stats_parallel_group=dist.group.WORLD)
        assert abs(norm - 6.0) < 1e-6, norm
        clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=norm)
        assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-5)
    finally:
        if made_group:  # destroyed here, as PyTorch asks, not left to the worker's exit
            dist.destroy_process_group()


def _init_single_rank_group() -> None:
    import torch.distributed as dist

    from tests.distributed import free_port

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
