"""The output layer and the reward-shaped loss in one step, without the [N, V/tp] logits.

`fused_output_shaped_cross_entropy(hidden, weight, target, ...)` returns what
`vocab_parallel_shaped_cross_entropy(hidden @ weight.T, target, ...)` returns, loss and
statistics, but computes the logits a chunk of positions at a time and never holds more than one
chunk of them (plus, for bf16 inputs, the chunk's fp32 copy).

Gradient strategy: recompute, as Apple's Cut Cross-Entropy does. The forward keeps, per position,
the five merged scalars the gradient needs (shift = max + log S, tau, log p(x), w_pos, W: see
functional.shard_gradient_) and the inputs; the backward computes each chunk's logits again,
turns them into dloss/dz with the upstream gradient, and multiplies out the chunk's share of
dhidden and dweight. The alternative, Liger-Kernel's, computes the gradients in the forward and
only scales them in the backward: one matmul fewer (3 instead of 4), but it is exact only when
the upstream gradient of every position is the same scalar (Liger's loss is a scalar; ours is per
position, and megatron's loss functions weight it by loss_mask), and it holds an fp32 [V/tp, h]
weight gradient from each micro-batch's forward to its backward. Recompute is exact for any
upstream gradient, keeps nothing of vocabulary size between forward and backward, and needs no
collective in the backward; its cost is the one extra matmul (measured in
tools/bench_output_loss.py).

Each chunk reuses the loss's three steps (functional.py): shard_statistics on the chunk's logits
(numba on CPU, Triton on CUDA, the torch ops elsewhere), ONE all-gather of the statistics of all
positions after the last chunk, merge_statistics, and in the backward shard_statistics again (the
same kernels give the same exp(z - m_r), top values and tie marks) and shard_gradient_.

Tensor parallelism: `weight` is this rank's vocabulary slice [V/tp, h] and `hidden` the full
[N, h] on every rank of tp_group; the caller adds megatron's input mappings (the all-gather of
sequence parallelism, or the copy whose backward all-reduces), as the output layer does
(models/output.py).

The weight gradient is accumulated over chunks in fp32. When the weight carries megatron DDP's
`main_grad` (the fp32 gradient buffer), the backward adds it there directly, as megatron's
gradient-accumulation fusion does, and hands autograd a placeholder (zeros for a weight shared
with the embedding, megatron's `zero_out_wgrad`, so that the embedding's own gradient still
reaches the buffer).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megatron_ext.loss.config import RewardShapingConfig
from megatron_ext.loss.functional import (
    STAT_COLUMNS,
    plan_shard,
    shard_gradient_,
    shard_statistics,
    vocab_range,
)
from megatron_ext.loss.reference import ShapedLossStats
from megatron_ext.loss.vocab_parallel import check_input_flags, gather_and_merge

__all__ = ["chunk_rows_for", "fused_output_shaped_cross_entropy"]

# Logits per chunk: 2**24 elements on CPU (64 MiB in fp32), 2**26 on a GPU (256 MiB), whole rows.
# At Qwen3's 151,936-token vocabulary that is 110 and 441 positions per chunk; the memory the
# chunk needs then stays a few percent of the full logits' at 2,048 positions and more, and each
# matmul is still wide enough to run at full speed.
CHUNK_ELEMENTS_CPU = 1 << 24
CHUNK_ELEMENTS_GPU = 1 << 26


def chunk_rows_for(num_rows: int, partition_vocab_size: int, device: torch.device) -> int:
    """Positions per chunk: as many whole rows of logits as fit the device's element budget
    (CHUNK_ELEMENTS_CPU / CHUNK_ELEMENTS_GPU), at least one, at most num_rows."""
    budget = CHUNK_ELEMENTS_GPU if device.type == "cuda" else CHUNK_ELEMENTS_CPU
    return max(1, min(num_rows, budget // max(1, partition_vocab_size)))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, fp32_out: torch.Tensor) -> torch.Tensor:
    """[c, Vp] logits of a chunk: written into fp32_out when the inputs are fp32, else a new
    tensor in the inputs' dtype (as the output layer's matmul gives them)."""
    if h.dtype == torch.float32:
        return torch.matmul(h, weight.t(), out=fp32_out)
    return torch.matmul(h, weight.t())


def _add_weight_grad(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """acc [Vp, h] fp32 += dz^T h, accumulated in fp32: on CUDA a bf16 matmul with fp32 output,
    elsewhere (no such matmul) in fp32."""
    if dz.dtype == torch.float32:
        acc.addmm_(dz.t(), h)
    elif dz.is_cuda:
        acc.add_(torch.mm(dz.t(), h, out_dtype=torch.float32))
    else:
        acc.addmm_(dz.t().float(), h.float())


def _uses_main_grad(weight: torch.Tensor) -> bool:
    """Whether the weight's gradient goes straight into megatron DDP's main_grad buffer."""
    return (
        getattr(weight, "main_grad", None) is not None
        and hasattr(weight, "grad_added_to_main_grad")
        and not hasattr(weight, "__fsdp_param__")
    )


class _FusedOutputShapedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        config: RewardShapingConfig,
        tp_group: dist.ProcessGroup | None,
        ignore_index: int,
        return_stats: bool,
        check_finite: bool,
        input_flags: torch.Tensor | None,
        chunk_rows: int | None,
    ):
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(
                f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} disagree: hidden "
                "must be [N, h] and weight this rank's [V/tp, h]"
            )
        if target.shape != hidden.shape[:1]:
            raise ValueError(
                f"target {tuple(target.shape)} must be [N] for hidden {tuple(hidden.shape)}"
            )
        if hidden.dtype != weight.dtype or not hidden.is_floating_point():
            raise TypeError(
                f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one "
                "floating-point dtype"
            )
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1 or None, got {chunk_rows}")
        check_input_flags(input_flags, hidden)
        tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        rank = 0 if tp_group is None else dist.get_rank(tp_group)
        n, vp = hidden.shape[0], weight.shape[0]
        vocab_size = vp * tp
        vocab_start, _ = vocab_range(vp, rank, tp)
        plan = plan_shard(config, vp, vocab_size, return_stats)
        # The forward's exp buffer is dropped chunk by chunk: no tie marks, no top indices.
        plan = dataclasses.replace(plan, mark_head=False, save_topk_indices=False)
        rows = chunk_rows or chunk_rows_for(n, vp, hidden.device)

        hidden = hidden.contiguous()
        target = target.contiguous()
        valid = target != ignore_index
        block = torch.empty(
            n, plan.kk + len(STAT_COLUMNS), dtype=torch.float32, device=hidden.device
        )
        buf = torch.empty(min(rows, n), vp, dtype=torch.float32, device=hidden.device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            out = buf[: r1 - r0]  # [c, Vp] fp32: the logits (fp32 inputs), then exp(z - m_r)
            logits = _chunk_logits(hidden[r0:r1], weight, out)
            block[r0:r1], _, _ = shard_statistics(
                logits, target[r0:r1], valid[r0:r1], vocab_start, plan, out
            )
        del buf
        merged = gather_and_merge(
            block,
            valid,
            target,
            config,
            plan,
            vocab_size,
            tp_group,
            ignore_index=ignore_index,
            check_finite=check_finite,
            input_flags=input_flags,
        )

        ctx.config, ctx.vocab_start, ctx.rows = config, vocab_start, rows
        ctx.vocab_size = vocab_size
        ctx.weight = weight if _uses_main_grad(weight) else None
        ctx.save_for_backward(
            hidden,
            weight,
            target,
            valid,
            merged.shift,
            merged.tau,
            merged.stats.target_logprob,
            merged.w_pos,
            merged.weight_sum,
        )
        if not return_stats:
            return merged.loss
        ctx.mark_non_differentiable(*merged.stats)
        return (merged.loss, *merged.stats)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        hidden, weight, target, valid, shift, tau, target_logprob, w_pos, weight_sum = (
            ctx.saved_tensors
        )
        config: RewardShapingConfig = ctx.config
        n, vp = hidden.shape[0], weight.shape[0]
        # The backward needs no statistics: the top-k search only where the rewards need it.
        plan = plan_shard(config, vp, ctx.vocab_size, return_stats=False)
        grad_loss = grad_loss.float().contiguous()
        rows = ctx.rows
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        buf = torch.empty(min(rows, n), vp, dtype=torch.float32, device=hidden.device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            h = hidden[r0:r1]  # [c, h]
            out = buf[: r1 - r0]  # [c, Vp]
            logits = _chunk_logits(h, weight, out)
            block, top_idx, marked = shard_statistics(
                logits, target[r0:r1], valid[r0:r1], ctx.vocab_start, plan, out
            )
            dz = shard_gradient_(
                out,
                grad_loss[r0:r1],
                block,
                top_idx,
                marked,
                target[r0:r1],
                valid[r0:r1],
                ctx.vocab_start,
                shift[r0:r1],
                tau[r0:r1],
                target_logprob[r0:r1],
                w_pos[r0:r1],
                weight_sum[r0:r1],
                config,
                plan,
                out_dtype=hidden.dtype,
            ).to(hidden.dtype)  # [c, Vp] dloss/dz, in the dtype of the output layer's matmuls
            if grad_hidden is not None:
                torch.matmul(dz, weight, out=grad_hidden[r0:r1])
            if grad_weight is not None:
                _add_weight_grad(grad_weight, dz, h)
        del buf
        if grad_weight is not None and ctx.weight is not None:
            # megatron DDP: fp32 straight into the gradient buffer; autograd gets a placeholder
            # that the DDP hook drops (or adds, zeros, for a weight shared with the embedding).
            param = ctx.weight
            param.main_grad.add_(grad_weight)
            param.grad_added_to_main_grad = True
            if getattr(param, "zero_out_wgrad", False):
                grad_weight = torch.zeros_like(weight)
            else:
                grad_weight = torch.empty_like(weight)
        elif grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def fused_output_shaped_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    config: RewardShapingConfig,
    tp_group: dist.ProcessGroup | None,
    ignore_index: int = -100,
    return_stats: bool = False,
    check_finite: bool = True,
    *,
    input_flags: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ShapedLossStats]:
    """Reward-shaped loss of the logits `hidden @ weight.T`, which are never materialised whole.

    The same loss, statistics, errors and input_flags contract as
    vocab_parallel_shaped_cross_entropy (see there) on the logits `hidden @ weight.T` of this
    rank's vocabulary slice; the gradient reaches hidden and weight (not megatron's output
    layer mappings: the caller applies them to hidden, see models/output.py). One all-gather of
    [N, kk + 6] statistics in the forward, none in the backward. The inputs are not modified.

    Args:
        hidden: [N, h] final hidden states of every position, the same on every rank of
            tp_group.
        weight: [V/tp, h] this rank's slice of the output weight (rank r holds vocabulary ids
            [r * V/tp, (r + 1) * V/tp)), the dtype of hidden (fp32 or bf16; math in fp32).
        target: [N] global target ids.
        config: the reward shaping.
        tp_group: the tensor-parallel group the vocabulary is split over; None: no split.
        ignore_index: target value of positions with zero loss and zero gradient.
        return_stats: also return ShapedLossStats.
        check_finite: as in vocab_parallel_shaped_cross_entropy.
        input_flags: as in vocab_parallel_shaped_cross_entropy (no host synchronisation).
        chunk_rows: positions per chunk; None: chunk_rows_for (the device's element budget).

    Returns:
        loss [N] fp32; with return_stats, (loss, ShapedLossStats of [N] tensors).
    """
    out = _FusedOutputShapedCrossEntropy.apply(
        hidden,
        weight,
        target,
        config,
        tp_group,
        ignore_index,
        return_stats,
        check_finite,
        input_flags,
        chunk_rows,
    )
    if not return_stats:
        return out
    loss, *stats = out
    return loss, ShapedLossStats(*stats)
