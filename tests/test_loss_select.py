"""The CPU top-k selection of the loss against torch.topk, and the loss through it against the
single-device reference."""

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
    if kind == "ties":  # many equal values, ties at the k-th value, -0.0 beside +0.0
        x = (x * 2).round()
    elif kind == "ascending":  # the worst order for a streaming search
        x = x.sort(-1).values
    elif kind == "constant":
        x = torch.zeros(n, width, dtype=dtype)
    elif kind == "neg_inf":  # masked logits
        x[:, ::3] = float("-inf")
    elif kind == "one_group":  # every large value in one group
        x[:, 5 * GROUP : 6 * GROUP] += 100.0
    elif kind == "wide_range":  # values spread over many binades, both signs
        x = x * torch.exp2(torch.randint(-30, 30, (n, width), generator=g)).to(dtype)
    return x


def _check(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    expected = torch.topk(x, k, dim=-1).values
    assert torch.equal(values.sort(-1, descending=True).values, expected)
    assert torch.equal(x.gather(1, indices), values)  # the indices point at the values
    sorted_idx = indices.sort(-1).values
    assert bool((sorted_idx[:, 1:] != sorted_idx[:, :-1]).all())  # no column twice


KINDS = ["random", "ties", "ascending", "constant", "neg_inf", "one_group", "wide_range"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 17, 101])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_rows_equals_torch_topk(kind, k, dtype):
    x = _rows(kind, 24, 128 * GROUP * 4, dtype)
    values, indices = top_k_rows(x, k)
    assert torch.equal(values, torch.topk(x, k, dim=-1).values)  # fully sorted
    _check(x, k, values, indices)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "width, k",
    [
        (256, 101),  # fewer groups than k: every logit is a candidate
        (1000, 5),  # a short last group
        (1000, 32),  # k == number of groups
        (GROUP + 3, GROUP + 3),  # k == the row length
        (7, 2),  # a single, short group
        (3 * GROUP, 1),
    ],
)
def test_top_k_rows_any_row_length(kind, width, k):
    x = _rows(kind, 9, width)
    _check(x, k, *top_k_rows(x, k, fully_sorted=False))
    values, indices = top_k_rows(x, k)
    assert torch.equal(values, torch.topk(x, k, dim=-1).values)
    _check(x, k, values, indices)


@pytest.mark.parametrize("kind", ["random", "ties", "ascending", "constant", "wide_range"])
@pytest.mark.parametrize("k", [1, 2, 3, 101])
def test_top_k_rows_orders_the_ends(kind, k):
    """fully_sorted=False: the same set of values, the largest first and the two smallest last."""
    x = _rows(kind, 24, 512 * GROUP)
    values, indices = top_k_rows(x, k, fully_sorted=False)
    expected = torch.topk(x, k, dim=-1).values
    _check(x, k, values, indices)
    assert torch.equal(values[:, 0], expected[:, 0])
    assert torch.equal(values[:, -1], expected[:, -1])
    if k > 1:
        assert torch.equal(values[:, -2], expected[:, -2])


def test_top_k_rows_flags_nan_and_keeps_inf():
    x = _rows("random", 6, 512 * GROUP)
    x[1, 300] = float("nan")
    x[4, 9] = -float("nan")  # the sign bit set (x86's default NaN)
    x[2, 7] = float("inf")
    x[5, 11] = -float("inf")
    values, _ = top_k_rows(x, 101)
    assert torch.isnan(values[1, 0]) and torch.isnan(values[4, 0])  # like torch.topk, NaN first
    assert values[2, 0] == float("inf")
    for r in (0, 2, 3, 5):
        assert torch.equal(values[r], torch.topk(x[r], 101).values)


def test_top_k_rows_without_the_kernel_and_bad_k():
    x = torch.randn(8, 1000)
    for other in (x.double(), x.bfloat16(), x.t().contiguous().t()):  # torch.topk, or a copy
        assert torch.equal(top_k_rows(other, 5)[0], torch.topk(other, 5).values)
    with pytest.raises(ValueError, match="k=1001 must be in"):
        top_k_rows(x, 1001)
    with pytest.raises(ValueError, match="k=0 must be in"):
        top_k_rows(x, 0)


@pytest.mark.parametrize("preset", ["tail_suppression", "head_preservation"])
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_loss_through_the_kernel_matches_the_reference(preset, kind):
    """V = 16384 fp32 on CPU: the loss's top-k search goes through the kernel.
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
