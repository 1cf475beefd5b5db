"""The CPU compatibility layer for megatron-core (megatron_ext.core.cpu_compat).

The layer patches torch process-wide, so each check runs in one spawned helper process (shared by
this module's tests) instead of the pytest process.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from tests import _workers_cpu_compat as w

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU compatibility layer is inactive on a GPU machine"
)


@pytest.fixture(scope="module")
def child():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        yield ex


def run(ex, fn):
    return ex.submit(fn).result(timeout=180)


def test_device_arguments_map_to_cpu(child):
    run(child, w.check_devices)


def test_tensor_type_reports_cuda_names(child):
    run(child, w.check_tensor_type)


def test_bridges_work_inside_autograd_backward(child):
    run(child, w.check_backward_without_mode)


def test_recomputation_in_backward_maps_devices(child):
    run(child, w.check_recompute_in_backward)


def test_forced_install_hides_the_gpus(child):
    run(child, w.check_force_hides_gpus)


def test_cuda_rng_is_the_cpu_generator(child):
    run(child, w.check_rng)


def test_megatron_rng_tracker_forks_named_states(child):
    messages = run(child, w.check_megatron_rng_tracker)
    assert not [m for m in messages if "CPU RNG state changed" in m], messages


def test_megatron_clip_grads_runs(child):
    run(child, w.check_clip_grads)


def test_install_is_a_no_op_with_a_gpu(monkeypatch):
    from megatron_ext.core import cpu_compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_MODE", None)
    assert cpu_compat.install_cpu_compat() is False
    assert not cpu_compat.cpu_compat_active()
