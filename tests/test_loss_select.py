"""The CPU top-k selection of the loss against torch.topk, and the loss through it against the
single-device reference, at row lengths where the narrowing kernel runs."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.loss import (
    RewardShapingConfig,
    reference_shaped_cross_entropy,
    vocab_parallel_shaped_cross_entropy,
)
from megatron_ext.loss.select import GROUP, _kernel, top_k_rows

pytestmark = pytest.mark.skipif(_kernel() is None, reason="numba is not installed")


def _rows(kind: str, n: int, width: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(kind) % 2**31)
    x = torch.randn(n, width, generator=g, dtype=dtype)
    if kind == "ties":  # many equal values, ties at the k-th value
        x = (x * 2).round()
    elif kind == "ascending":  # the worst order for a streaming search
        x = x.sort(-1).values
    elif kind == "constant":
        x = torch.zeros(n, width, dtype=dtype)
    elif kind == "neg_inf":  # masked logits
        x[:, ::3] = float("-inf")
    elif kind == "one_group":  # every large value in one group
        x[:, 5 * GROUP : 6 * GROUP] += 100.0
    return x


@pytest.mark.parametrize(
    "kind", ["random", "ties", "ascending", "constant", "neg_inf", "one_group"]
)
@pytest.mark.parametrize("k", [1, 17, 101])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_rows_equals_torch_topk(kind, k, dtype):
    x = _rows(kind, 24, 128 * GROUP * 4, dtype)  # 512 groups: the kernel runs for k <= 128
    values, indices = top_k_rows(x, k)
    expected = torch.topk(x, k, dim=-1).values
    assert torch.equal(values, expected)
    assert torch.equal(x.gather(1, indices), values)  # the indices point at the values
    sorted_idx = indices.sort(-1).values
    assert bool((sorted_idx[:, 1:] != sorted_idx[:, :-1]).all())  # no column twice


@pytest.mark.parametrize("kind", ["random", "ties", "ascending", "constant"])
@pytest.mark.parametrize("k", [1, 2, 3, 101])
def test_top_k_rows_orders_the_ends(kind, k):
    """fully_sorted=False: the same set of values, the largest first and the two smallest last."""
    x = _rows(kind, 24, 512 * GROUP)
    values, indices = top_k_rows(x, k, fully_sorted=False)
    expected = torch.topk(x, k, dim=-1).values
    assert torch.equal(values.sort(-1, descending=True).values, expected)
    assert torch.equal(values[:, 0], expected[:, 0])
    assert torch.equal(values[:, -1], expected[:, -1])
    if k > 1:
        assert torch.equal(values[:, -2], expected[:, -2])
    assert torch.equal(x.gather(1, indices), values)


def test_top_k_rows_flags_nan_and_keeps_inf():
    x = _rows("random", 4, 512 * GROUP)
    x[1, 300] = float("nan")
    x[2, 7] = float("inf")
    values, _ = top_k_rows(x, 101)
    assert torch.isnan(values[1, 0])  # like torch.topk, NaN comes first
    assert values[2, 0] == float("inf") and torch.equal(values[2], torch.topk(x[2], 101).values)
    assert torch.equal(values[[0, 3]], torch.topk(x[[0, 3]], 101).values)


def test_top_k_rows_falls_back_to_torch():
    x = torch.randn(8, 1000)  # not a multiple of GROUP
    assert torch.equal(top_k_rows(x, 5)[0], torch.topk(x, 5).values)
    with pytest.raises(ValueError, match="k=1001 must be in"):
        top_k_rows(x, 1001)


@pytest.mark.parametrize("preset", ["tail_suppression", "head_preservation"])
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_loss_through_the_kernel_matches_the_reference(preset, kind):
    """V = 16384: 512 groups >= 4 * (k + 1), so the loss's top-k search goes through the kernel.
    Loss within 2e-6 and gradient within 1e-6 + 1e-5 relative (fp32 sums over 16k logits)."""
    config = RewardShapingConfig.preset(preset)
    logits = _rows(kind, 16, 16384).view(4, 4, 16384)  # [s, b, V]
    target = torch.randint(0, 16384, (4, 4), generator=torch.Generator().manual_seed(1))
    target[0, 0] = -100
    ref_in = logits.clone().double().requires_grad_()
    ref = reference_shaped_cross_entropy(ref_in, target, config)
    ref.sum().backward()
    ours_in = logits.clone().requires_grad_()
    ours = vocab_parallel_shaped_cross_entropy(ours_in.clone(), target, config, None)
    ours.sum().backward()
    torch.testing.assert_close(ours.double(), ref.detach(), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(ours_in.grad.double(), ref_in.grad, atol=1e-6, rtol=1e-5)
