"""The output layer and the reward-shaped loss in one step, without the [N, V/tp] logits.

`fused_output_shaped_cross_entropy(hidden, weight, target, ...)` returns what
`vocab_parallel_shaped_cross_entropy(hidden @ weight.T, target, ...)` returns, loss and
statistics, but computes the logits a chunk of positions at a time (chunk_rows_for) and never
holds more than one chunk of them (plus, for bf16 inputs, the chunk's fp32 copy).

Gradient strategy, "precompute" by default (Liger-Kernel's): per chunk, the forward computes the
logits, their statistics, the chunk's ONE all-gather and merge, then dloss/dz for an upstream
gradient of 1 and its two products, dhidden = dz W and dweight += dz^T h (fp32); the backward
only scales them: dhidden row by row (exact for any upstream gradient) and dweight by the one
upstream gradient that every counted position has. That last step is exact for megatron's loss
functions (a sum or mean of the per-position losses, or the losses times a 0/1 loss mask, times
a loss scale) and is checked: a gradient that differs between counted positions raises (or,
without host synchronisation, gives a NaN weight gradient). Three matmuls, as without fusion.
"recompute" (Apple's Cut Cross-Entropy's) keeps only five scalars per position and the inputs,
and computes each chunk's logits again in the backward: exact for any upstream gradient and one
all-gather in all, but one matmul more. Measured on 2 CPU cores (tools/bench_output_loss.py,
1,024 positions, V = 151,936, h = 256, fp32), against megatron-core's output layer + CE:
precompute 1.11x the time, recompute 1.59x, with chunks of 110 positions; precompute with the
chunk rule below 0.90-0.93x. Precompute holds the fp32 weight gradient [V/tp, h] from a
micro-batch's forward to its backward (the weight's own size; megatron's schedules run the last
stage's backward right after its forward).

Each chunk reuses the loss's three steps (functional.py): shard_statistics on the chunk's logits
(numba on CPU, Triton on CUDA, the torch ops elsewhere), merge_statistics and shard_gradient_.

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
from typing import NamedTuple

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

__all__ = ["GRADIENTS", "chunk_rows_for", "fused_output_shaped_cross_entropy"]

# Logits per chunk: an eighth of the whole logits, at least 2**24 and at most 2**26 elements
# (64 and 256 MiB in fp32), in whole rows. At Qwen3's 151,936-token vocabulary: 256 positions per
# chunk at 2,048 positions, 441 from 3,552 positions on. Each chunk's matmuls stay wide enough to
# run at full speed, and the weight gradient's accumulator [V/tp, h], read and written once per
# chunk, is visited a few dozen times at most; the chunk's memory stays at most an eighth of the
# logits' (measured on 2 CPU cores at 1,024 positions: chunks of 55 / 110 / 220 / 440 rows took
# 1.30x / 1.06x / 0.93x / 0.90x megatron-core's time).
CHUNK_FRACTION = 8
CHUNK_ELEMENTS = (1 << 24, 1 << 26)


def chunk_rows_for(num_rows: int, partition_vocab_size: int) -> int:
    """Positions per chunk: whole rows of logits, num_rows * V/tp / CHUNK_FRACTION elements within
    CHUNK_ELEMENTS, at least one row, at most num_rows (the same rule on every device)."""
    low, high = CHUNK_ELEMENTS
    vp = max(1, partition_vocab_size)
    budget = max(low, min(high, num_rows * vp // CHUNK_FRACTION))
    return max(1, min(num_rows, budget // vp))


class _ChunkBuffers:
    """The two buffers every chunk reuses: fp32 [rows, Vp] (the logits of fp32 inputs, then
    exp(z - m_r) and the gradient) and, for bf16 / fp16 inputs, their logits [rows, Vp]."""

    def __init__(self, rows: int, weight: torch.Tensor) -> None:
        vp, dtype, device = weight.shape[0], weight.dtype, weight.device
        self.fp32 = torch.empty(rows, vp, dtype=torch.float32, device=device)
        self.low = (
            None if dtype == torch.float32 else torch.empty(rows, vp, dtype=dtype, device=device)
        )

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's logits h @ weight.T [c, Vp] in the inputs' dtype (as the output layer's
        matmul gives them) and the fp32 buffer [c, Vp] for the loss (the same tensor for fp32)."""
        c = h.shape[0]
        out = self.fp32[:c]
        if self.low is None:
            return torch.matmul(h, weight.t(), out=out), out
        return torch.matmul(h, weight.t(), out=self.low[:c]), out


def _add_weight_grad(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """acc [Vp, h] fp32 += dz^T h (acc = dz^T h for the first chunk: acc is not zeroed first),
    accumulated in fp32: on CUDA a bf16 matmul with fp32 output, elsewhere (no such matmul) in
    fp32."""
    if dz.dtype != torch.float32 and dz.is_cuda:
        try:
            product = torch.mm(dz.t(), h, out_dtype=torch.float32)
        except TypeError:  # a torch without out_dtype (before 2.8)
            product = None
        if product is not None:
            acc.copy_(product) if first else acc.add_(product)
            return
    if dz.dtype != torch.float32:
        dz, h = dz.float(), h.float()
    if first:
        torch.mm(dz.t(), h, out=acc)
    else:
        acc.addmm_(dz.t(), h)


def _uses_main_grad(weight: torch.Tensor) -> bool:
    """Whether the weight's gradient goes straight into megatron DDP's main_grad buffer."""
    return (
        getattr(weight, "main_grad", None) is not None
        and hasattr(weight, "grad_added_to_main_grad")
        and not hasattr(weight, "__fsdp_param__")
    )


GRADIENTS = ("precompute", "recompute")
"""The fused loss's gradient strategies (see the module docstring)."""


def _check_inputs(hidden, weight, target, chunk_rows) -> None:
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
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating-point "
            "dtype"
        )
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1 or None, got {chunk_rows}")


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
        gradient: str | None,
    ):
        _check_inputs(hidden, weight, target, chunk_rows)
        check_input_flags(input_flags, hidden)
        tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        rank = 0 if tp_group is None else dist.get_rank(tp_group)
        n, vp = hidden.shape[0], weight.shape[0]
        vocab_size = vp * tp
        vocab_start, _ = vocab_range(vp, rank, tp)
        plan = plan_shard(config, vp, vocab_size, return_stats)
        rows = chunk_rows or chunk_rows_for(n, vp)
        hidden = hidden.contiguous()
        target = target.contiguous()
        valid = target != ignore_index
        merge_args = dict(  # noqa: C408
            config=config,
            plan=plan,
            vocab_size=vocab_size,
            tp_group=tp_group,
            ignore_index=ignore_index,
            check_finite=check_finite,
            input_flags=input_flags,
        )
        ctx.config, ctx.vocab_start, ctx.rows = config, vocab_start, rows
        ctx.vocab_size, ctx.gradient, ctx.weight_dtype = vocab_size, gradient, weight.dtype
        ctx.weight = weight if _uses_main_grad(weight) else None
        ctx.check_uniform = input_flags is None
        ctx.consumed = False
        buffers = _ChunkBuffers(min(rows, n), weight)

        if gradient == "precompute":
            # Per chunk: logits, statistics, the chunk's all-gather and merge, then dloss/dz for
            # an upstream gradient of 1 at every position and its products with the weight and
            # the hidden states; the backward scales them.
            loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
            stats = [torch.empty_like(loss) for _ in ShapedLossStats._fields]
            ctx.grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            ctx.grad_weight = (
                torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
                if ctx.needs_input_grad[1]
                else None
            )
            ones = torch.ones(min(rows, n), dtype=torch.float32, device=hidden.device)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                h, t, v = hidden[r0:r1], target[r0:r1], valid[r0:r1]
                logits, out = buffers.logits(h, weight)  # [c, Vp] each
                block, top_idx, marked = shard_statistics(logits, t, v, vocab_start, plan, out)
                merged = gather_and_merge(block, v, t, **merge_args, first_position=r0)
                loss[r0:r1] = merged.loss
                for whole, part in zip(stats, merged.stats, strict=True):
                    whole[r0:r1] = part
                dz = _chunk_gradient(out, ones[: r1 - r0], block, top_idx, marked, t, v,
                                     _Scalars.of(merged), ctx, plan, hidden.dtype)  # fmt: skip
                _multiply_out(dz, h, weight, ctx.grad_hidden, ctx.grad_weight, r0)
            ctx.save_for_backward(valid)
            return _outputs(ctx, loss, ShapedLossStats(*stats), return_stats)

        # recompute (or no backward): the statistics of every chunk, then ONE all-gather.
        fwd_plan = dataclasses.replace(plan, mark_head=False, save_topk_indices=False)
        block = torch.empty(
            n, plan.kk + len(STAT_COLUMNS), dtype=torch.float32, device=hidden.device
        )
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            logits, out = buffers.logits(hidden[r0:r1], weight)  # [c, Vp] each
            block[r0:r1], _, _ = shard_statistics(
                logits, target[r0:r1], valid[r0:r1], vocab_start, fwd_plan, out
            )
        del buffers
        merged = gather_and_merge(block, valid, target, **merge_args)
        if gradient == "recompute":
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
        return _outputs(ctx, merged.loss, merged.stats, return_stats)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        grad_loss = grad_loss.float().contiguous()
        scale = None
        if ctx.gradient == "precompute":
            if ctx.consumed:
                raise RuntimeError(
                    "the fused loss's precomputed gradients serve one backward per forward "
                    "(retain_graph); use gradient='recompute' to backpropagate twice"
                )
            ctx.consumed = True
            (valid,) = ctx.saved_tensors
            grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
            ctx.grad_hidden = ctx.grad_weight = None
            if grad_hidden is not None:
                # Exact for any upstream gradient: row r of dhidden is linear in grad_loss[r].
                grad_hidden = (grad_loss.unsqueeze(1) * grad_hidden).to(grad_hidden.dtype)
            if grad_weight is not None:
                scale = _uniform_scale(grad_loss, valid, ctx.check_uniform)  # 0-dim
        else:
            grad_hidden, grad_weight = _recompute_gradients(ctx, grad_loss)
        if grad_weight is not None and ctx.weight is not None:
            # megatron DDP: fp32 straight into the gradient buffer; autograd gets a placeholder
            # that the DDP hook drops (or adds, zeros, for a weight shared with the embedding).
            param = ctx.weight
            if scale is None:
                param.main_grad.add_(grad_weight)
            else:
                param.main_grad.addcmul_(grad_weight, scale)
            param.grad_added_to_main_grad = True
            if getattr(param, "zero_out_wgrad", False):
                grad_weight = torch.zeros_like(param)
            else:
                grad_weight = torch.empty_like(param)
        elif grad_weight is not None:
            if scale is not None:
                grad_weight.mul_(scale)
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, *([None] * 9)


def _outputs(ctx, loss: torch.Tensor, stats: ShapedLossStats, return_stats: bool):
    if not return_stats:
        return loss
    ctx.mark_non_differentiable(*stats)
    return (loss, *stats)


class _Scalars(NamedTuple):
    """The merged per-position scalars the gradient needs (functional.shard_gradient_)."""

    shift: torch.Tensor
    tau: torch.Tensor
    target_logprob: torch.Tensor
    w_pos: torch.Tensor
    weight_sum: torch.Tensor

    @classmethod
    def of(cls, merged) -> _Scalars:
        return cls(
            merged.shift, merged.tau, merged.stats.target_logprob, merged.w_pos, merged.weight_sum
        )


def _chunk_gradient(
    out, grad_loss, block, top_idx, marked, target, valid, scalars, ctx, plan, dtype
):
    """dloss/dz [c, Vp] of a chunk (over `out`, the chunk's exp buffer, when fp32), in the dtype
    of the output layer's matmuls."""
    return shard_gradient_(
        out,
        grad_loss,
        block,
        top_idx,
        marked,
        target,
        valid,
        ctx.vocab_start,
        *scalars,
        ctx.config,
        plan,
        out_dtype=dtype,
    ).to(dtype)


def _multiply_out(dz, h, weight, grad_hidden, grad_weight, r0: int) -> None:
    """A chunk's share of the gradients: dhidden[r0 : r0 + c] = dz W, dweight += dz^T h (the
    chunk at r0 = 0 writes dweight: it need not be zeroed)."""
    if grad_hidden is not None:
        torch.matmul(dz, weight, out=grad_hidden[r0 : r0 + dz.shape[0]])
    if grad_weight is not None:
        _add_weight_grad(grad_weight, dz, h, first=r0 == 0)


def _uniform_scale(grad_loss: torch.Tensor, valid: torch.Tensor, check: bool) -> torch.Tensor:
    """The one upstream gradient of every counted position (0-dim, on the device), which the
    precomputed weight gradient is multiplied by. A gradient that differs between counted
    positions (a loss weighted per position) cannot be applied to it: with check the call raises
    (one host synchronisation); without (input_flags: no synchronisation) the scale is NaN, so
    the weight gradient is NaN rather than silently wrong."""
    high = torch.where(valid, grad_loss, -torch.inf).amax()
    low = torch.where(valid, grad_loss, torch.inf).amin()
    none_counted = ~valid.any()
    uniform = (high == low) | none_counted
    if check and not bool(uniform):
        raise ValueError(
            "the fused loss's precomputed weight gradient needs the same upstream gradient at "
            f"every counted position (a sum or mean of the losses, or losses times a 0/1 mask), "
            f"got values from {float(low)} to {float(high)}; pass gradient='recompute' for "
            "per-position weights"
        )
    scale = torch.where(none_counted, torch.zeros_like(high), high)
    return torch.where(uniform, scale, torch.full_like(scale, float("nan")))


def _recompute_gradients(ctx, grad_loss: torch.Tensor):
    """Recompute each chunk's logits and statistics, then its dloss/dz and products."""
    hidden, weight, target, valid, shift, tau, target_logprob, w_pos, weight_sum = ctx.saved_tensors
    config: RewardShapingConfig = ctx.config
    n, vp = hidden.shape[0], weight.shape[0]
    # The backward needs no statistics: the top-k search only where the rewards need it.
    plan = plan_shard(config, vp, ctx.vocab_size, return_stats=False)
    rows = ctx.rows
    grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
    grad_weight = (
        torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        if ctx.needs_input_grad[1]
        else None
    )
    buffers = _ChunkBuffers(min(rows, n), weight)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h, t, v = hidden[r0:r1], target[r0:r1], valid[r0:r1]
        logits, out = buffers.logits(h, weight)  # [c, Vp] each
        block, top_idx, marked = shard_statistics(logits, t, v, ctx.vocab_start, plan, out)
        scalars = _Scalars(
            shift[r0:r1], tau[r0:r1], target_logprob[r0:r1], w_pos[r0:r1], weight_sum[r0:r1]
        )
        dz = _chunk_gradient(out, grad_loss[r0:r1], block, top_idx, marked, t, v, scalars, ctx,
                             plan, hidden.dtype)  # fmt: skip
        _multiply_out(dz, h, weight, grad_hidden, grad_weight, r0)
    return grad_hidden, grad_weight


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
    gradient: str = "precompute",
) -> torch.Tensor | tuple[torch.Tensor, ShapedLossStats]:
    """Reward-shaped loss of the logits `hidden @ weight.T`, which are never materialised whole.

    The same loss, statistics, errors and input_flags contract as
    vocab_parallel_shaped_cross_entropy (see there) on the logits `hidden @ weight.T` of this
    rank's vocabulary slice; the gradient reaches hidden and weight (not megatron's output
    layer mappings: the caller applies them to hidden, see models/output.py). The inputs are not
    modified.

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
        chunk_rows: positions per chunk; None: chunk_rows_for (an eighth of the logits, within
            CHUNK_ELEMENTS).
        gradient: "precompute" (default): the gradients are computed in the forward, with one
            all-gather per chunk, and scaled in the backward; the weight's needs the same
            upstream gradient at every position that is not ignored (a sum or mean of the
            losses, or the losses times a 0/1 mask: megatron's loss functions), else the
            backward raises (one host synchronisation; with input_flags none, and the weight
            gradient is NaN instead). "recompute": the backward computes the logits again (one
            matmul more, any upstream gradient, one all-gather in all). Without autograd (no
            grad mode, or no input requiring a gradient) neither: statistics and loss only.

    Returns:
        loss [N] fp32; with return_stats, (loss, ShapedLossStats of [N] tensors).
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    needs_backward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
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
        gradient if needs_backward else None,
    )
    if not return_stats:
        return out
    loss, *stats = out
    return loss, ShapedLossStats(*stats)
