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
from megatron_ext.loss.select import GROUP, cpu_kernels, top_k_rows

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="numba is not installed")


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
    elif kind == "bimodal":  # two far-apart clusters: a poor guess for a search by value
        x = x + 1e6 * (torch.rand(n, width, generator=g) < 0.3).to(dtype)
    elif kind == "extremes":  # +-inf, +-max, subnormals and +-0 among ordinary values
        info = torch.finfo(dtype)
        pool = torch.tensor(
            [
                float("inf"),
                -float("inf"),
                info.max,
                -info.max,
                info.tiny / 4,
                -info.tiny / 4,
                0.0,
                -0.0,
            ],
            dtype=dtype,
        )
        pick = torch.randint(0, len(pool), (n, width), generator=g)
        x = torch.where(torch.rand(n, width, generator=g) < 0.5, pool[pick], x)
    return x


def _check(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    expected = torch.topk(x, k, dim=-1).values
    assert torch.equal(values.sort(-1, descending=True).values, expected)
    assert torch.equal(x.gather(1, indices), values)  # the indices point at the values
    sorted_idx = indices.sort(-1).values
    assert bool((sorted_idx[:, 1:] != sorted_idx[:, :-1]).all())  # no column twice


KINDS = [
    "random",
    "ties",
    "ascending",
    "constant",
    "neg_inf",
    "one_group",
    "wide_range",
    "bimodal",
    "extremes",
]


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


@pytest.mark.parametrize(
    "kind", ["random", "ties", "ascending", "constant", "wide_range", "bimodal", "extremes"]
)
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


# ---------------------------------------------------------------------------------------------
# The fused CPU forward (one kernel per call) against the torch ops it replaces


def _statistics(logits, target, config, vp_total, in_place, fused, monkeypatch):
    from megatron_ext.loss import functional

    monkeypatch.setattr(functional, "cpu_kernels", cpu_kernels if fused else lambda: None)
    if not fused:  # the top-k search too: torch.topk
        monkeypatch.setattr("megatron_ext.loss.select.cpu_kernels", lambda: None)
    n, vp = logits.shape
    plan = functional.plan_shard(config, vp, vp_total, return_stats=True)
    z = logits.clone()
    out = z if in_place else torch.empty_like(z)
    valid = target >= 0
    block, idx, marked = functional.shard_statistics(z, target, valid, 0, plan, out)
    monkeypatch.undo()
    return plan, block, idx, marked, out


@pytest.mark.parametrize("kind", ["random", "ties", "neg_inf", "constant", "wide_range", "bimodal"])
@pytest.mark.parametrize(
    "config",
    [
        RewardShapingConfig.preset("ce"),
        RewardShapingConfig.preset("tail_suppression"),
        RewardShapingConfig(lambda_head=-0.2, lambda_tail=0.1, top_k=7),
        RewardShapingConfig(lambda_tail=-0.1, top_k=300),  # k > the slice: the whole slice
    ],
    ids=["ce", "tail", "head_k7", "k_300"],
)
@pytest.mark.parametrize("in_place", [True, False])
def test_fused_forward_matches_the_torch_ops(kind, config, in_place, monkeypatch):
    x = _rows(kind, 40, 256 + 5)  # a short last group
    if kind == "wide_range":
        x = x.clamp(-1e4, 1e4)
    x[3, 17] = float("nan")
    x[5, 2] = float("inf")
    target = torch.randint(-1, 261, (40,), generator=torch.Generator().manual_seed(3))
    vp_total = 261 * 2  # as if TP = 2: kk = min(k, 261)
    plan, b_ref, i_ref, m_ref, out_ref = _statistics(
        x, target, config, vp_total, in_place, False, monkeypatch
    )
    _, b_new, i_new, m_new, out_new = _statistics(
        x, target, config, vp_total, in_place, True, monkeypatch
    )
    kk = plan.kk
    # Rows 3 (NaN) and 5 (+inf): both paths make them non-finite (m, S or T), which the loss
    # reports; their numbers differ (torch's exp(inf - inf) is NaN, the kernel's is 0).
    for b in (b_ref, b_new):
        stats = b[[3, 5]][:, [0, kk + 0, kk + 1]]
        assert not bool(torch.isfinite(stats).all(-1).any())
    rows = [r for r in range(40) if r not in (3, 5)]
    b_ref, b_new, out_ref, out_new, x = (
        b_ref[rows],
        b_new[rows],
        out_ref[rows],
        out_new[rows],
        x[rows],
    )
    # the top values as a set, the maximum first and the kk-th at kk - 1, their columns
    torch.testing.assert_close(b_new[:, :kk].sort(-1).values, b_ref[:, :kk].sort(-1).values)
    torch.testing.assert_close(b_new[:, [0, kk - 1]], b_ref[:, [0, kk - 1]])
    if i_ref is not None:
        assert torch.equal(x.gather(1, i_new[rows]), b_new[:, :kk])
    # the columns after the values: sums (fp64 in the kernel, fp32 in torch), target, counts
    torch.testing.assert_close(b_new[:, kk:], b_ref[:, kk:], rtol=2e-6, atol=1e-6, equal_nan=True)
    # exp(z - m) with the same sign marks, within the fp32 exp's few ulp
    torch.testing.assert_close(out_new, out_ref, rtol=1e-6, atol=1e-30)
    if m_ref is None:
        assert m_new is None
    else:
        assert m_new.dtype == torch.bool and m_new.shape == (40,)
        assert torch.equal(m_new[rows], m_ref[rows])  # the same rows marked
    if kind == "ties" and plan.mark_head:
        assert bool(m_new.any())  # the tie path ran


@pytest.mark.parametrize("preset", ["ce", "diversity", "tail_suppression", "head_preservation"])
def test_loss_with_and_without_the_kernels(preset, monkeypatch):
    """The loss, its stats and its gradient through the kernels and through torch ops alone."""
    config = RewardShapingConfig.preset(preset)
    logits = (_rows("random", 64, 2048) * 3).view(8, 8, 2048)
    target = torch.randint(0, 2048, (8, 8), generator=torch.Generator().manual_seed(2))
    target[1, 1] = -100
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr("megatron_ext.loss.functional.cpu_kernels", lambda: None)
            monkeypatch.setattr("megatron_ext.loss.select.cpu_kernels", lambda: None)
        z = logits.clone().requires_grad_()
        loss, stats = vocab_parallel_shaped_cross_entropy(
            z.clone(), target, config, None, return_stats=True
        )
        loss.sum().backward()
        results.append((loss.detach(), stats, z.grad))
    (loss_a, stats_a, grad_a), (loss_b, stats_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=2e-6, atol=2e-6)
    for name in ("entropy", "target_prob", "topk_mass"):
        torch.testing.assert_close(
            getattr(stats_a, name), getattr(stats_b, name), rtol=2e-6, atol=2e-6
        )
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-7)
