"""Plumbing of the vocab-parallel loss: vocab ranges, the plan, what is kept for backward."""

import pytest
import torch

from megatron_ext.loss import (
    RewardShapingConfig,
    reference_shaped_cross_entropy,
    vocab_parallel_shaped_cross_entropy,
)
from megatron_ext.loss.functional import plan_shard, vocab_range


def test_vocab_range_partitions_the_vocabulary():
    assert [vocab_range(10, r, 4) for r in range(4)] == [(0, 10), (10, 20), (20, 30), (30, 40)]
    with pytest.raises(ValueError, match="rank 4 is outside"):
        vocab_range(10, 4, 4)


def test_plan_only_searches_top_k_when_needed():
    vp, v = 1000, 4000
    assert plan_shard(RewardShapingConfig.preset("precision"), vp, v, False).kk == 1
    assert plan_shard(RewardShapingConfig.preset("precision"), vp, v, True).kk == 100
    uniform = RewardShapingConfig(lambda_head=0.1, lambda_tail=0.1)  # no split: no search
    assert not plan_shard(uniform, vp, v, False).find_topk
    tail = plan_shard(RewardShapingConfig.preset("tail_suppression"), vp, v, False)
    assert (tail.kk, tail.mark_head, tail.save_topk_indices) == (100, True, True)
    whole = plan_shard(RewardShapingConfig(lambda_tail=-0.1, top_k=3000), vp, v, False)
    assert (whole.kk, whole.mark_head) == (1000, False)


def _saved_bytes(fn, logits, target):
    """Bytes of every tensor autograd keeps for backward, and how many are [N, Vp]-sized."""
    sizes = []

    def pack(t):
        sizes.append((t.numel(), t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(logits, target)
    big = [n * e for n, e in sizes if n >= logits[..., 0].numel() * logits.shape[-1]]
    return sum(n * e for n, e in sizes), big, loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["ce", "precision", "tail_suppression"])
def test_keeps_no_more_for_backward_than_megatron_core(dtype, preset, world1):
    """Memory: one [N, Vp] fp32 buffer, as megatron-core's vocab_parallel_cross_entropy keeps."""
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    s, b, v = 32, 2, 16384  # at k = 100 the top-k values and indices add 12 k / (4 V) = 1.8%
    z = (torch.randn(s, b, v) * 2).to(dtype)
    x = torch.randint(0, v, (s, b))
    cfg = RewardShapingConfig.preset(preset)
    ours_total, ours_big, _ = _saved_bytes(
        lambda t, y: vocab_parallel_shaped_cross_entropy(t, y, cfg, world1),
        z.clone().requires_grad_(),
        x,
    )
    mc_total, mc_big, _ = _saved_bytes(
        lambda t, y: vocab_parallel_cross_entropy(t, y, tp_group=world1),
        z.clone().requires_grad_(),
        x,
    )
    assert ours_big == mc_big == [s * b * v * 4]
    # Beyond that buffer: per-position scalars and the top-k values and indices (k = 100 << V).
    assert ours_total - ours_big[0] <= s * b * (100 * 12 + 64)
    assert ours_total <= 1.05 * mc_total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", list(RewardShapingConfig.PRESET_NAMES))
def test_cuda_matches_reference(preset):
    cfg = RewardShapingConfig.preset(preset)
    z = torch.randn(128, 2, 8192, device="cuda") * 3
    z[0, 0] = torch.round(z[0, 0])  # ties
    x = torch.randint(0, 8192, (128, 2), device="cuda")
    x[3, 1] = -100
    ref = z.clone().requires_grad_()
    want = reference_shaped_cross_entropy(ref, x, cfg)
    want.sum().backward()
    leaf = z.clone().requires_grad_()
    got = vocab_parallel_shaped_cross_entropy(leaf * 1, x, cfg, None)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-6)
