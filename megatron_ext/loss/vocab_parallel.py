"""Vocab-parallel reward-shaped loss: the local math of functional.py plus ONE all-gather."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_ext.loss.config import RewardShapingConfig
from megatron_ext.loss.functional import (
    MergedStatistics,
    ShardPlan,
    merge_statistics,
    plan_shard,
    shard_gradient_,
    shard_statistics,
    vocab_range,
)
from megatron_ext.loss.reference import ShapedLossStats

__all__ = [
    "INPUT_FLAGS",
    "check_input_flags",
    "gather_and_merge",
    "vocab_parallel_shaped_cross_entropy",
]

INPUT_FLAGS = ("bad_target", "non_finite", "unequal_slices")
"""What each entry of the `input_flags` accumulator counts (see
vocab_parallel_shaped_cross_entropy): positions whose label is outside the vocabulary (and not
ignore_index), positions with a NaN or infinite logit, positions whose ranks hold vocabulary
slices of different sizes (all of them or none)."""

# torch 2.14 renamed all_gather_into_tensor (concatenation along dim 0) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather_rows(block: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """[N, C] on each rank -> [tp, N, C], identical on every rank."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return block.unsqueeze(0)
    world = dist.get_world_size(tp_group)
    out = torch.empty(
        (world * block.shape[0], *block.shape[1:]), dtype=block.dtype, device=block.device
    )
    _all_gather_single(out, block.contiguous(), group=tp_group)
    return out.view(world, *block.shape)


def _non_finite_kinds(block: torch.Tensor) -> list[str]:
    """What a slice's statistics [kk + 6] say about its non-finite logits."""
    m, s, t = float(block[0]), float(block[-6]), float(block[-5])
    if math.isnan(m) or math.isnan(s):
        return ["NaN"]
    if m == math.inf:
        return ["+inf"]
    if m == -math.inf or math.isnan(t):
        return ["-inf"]
    return []


def _raise_bad_input(
    merged, gathered, target, vocab_size, ignore_index, check_finite, first_position=0
) -> bool:
    """Every rank sees the same merged flags, so every rank raises: no peer is left waiting.
    Reads the flags with one host synchronisation; returns whether some logit is non-finite.
    first_position: the flat position of the first row (a chunk of a longer call)."""
    where = f" from position {first_position}" if first_position else ""
    any_bad_target, any_non_finite, unequal_slices = (v > 0 for v in merged.flags.tolist())
    if unequal_slices:
        sizes = [int(v) for v in gathered[:, 0, -1]]
        raise ValueError(
            f"tensor-parallel ranks hold vocabulary slices of different sizes {sizes}; every rank "
            "must hold vocab_size / tp logits (megatron-core pads the vocabulary to make this so)"
        )
    if check_finite and any_non_finite:
        affected = merged.non_finite.nonzero().squeeze(1)
        pos = int(affected[0])
        holders = [
            f"TP rank {r} holds {'/'.join(kinds)}"
            for r in range(gathered.shape[0])
            if (kinds := _non_finite_kinds(gathered[r, pos]))
        ]
        raise ValueError(
            f"non-finite logits at flat position {first_position + pos} ({affected.numel()} of "
            f"{merged.non_finite.numel()} positions{where} affected; {', '.join(holders)}); the "
            "loss needs finite logits"
        )
    if any_bad_target:
        affected = merged.bad_target.nonzero().squeeze(1)
        pos = int(affected[0])
        raise ValueError(
            f"target id {int(target[pos])} at flat position {first_position + pos} is outside "
            f"the vocabulary [0, {vocab_size}) and is not ignore_index={ignore_index} "
            f"({affected.numel()} positions{where} affected)"
        )
    return any_non_finite


def check_input_flags(flags: torch.Tensor | None, logits: torch.Tensor) -> None:
    """Raise unless `flags` is None or a floating-point [len(INPUT_FLAGS)] tensor on the
    logits' device."""
    if flags is None:
        return
    if (
        not isinstance(flags, torch.Tensor)
        or flags.shape != (len(INPUT_FLAGS),)
        or not flags.is_floating_point()
        or flags.device != logits.device
    ):
        got = (
            f"{tuple(flags.shape)} {flags.dtype} on {flags.device}"
            if isinstance(flags, torch.Tensor)
            else repr(flags)
        )
        raise ValueError(
            f"input_flags must be a floating-point tensor of shape ({len(INPUT_FLAGS)},) on the "
            f"logits' device {logits.device}, got {got}"
        )


def gather_and_merge(
    block: torch.Tensor,
    valid: torch.Tensor,
    target: torch.Tensor,
    config: RewardShapingConfig,
    plan: ShardPlan,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None,
    *,
    ignore_index: int,
    check_finite: bool,
    input_flags: torch.Tensor | None,
    first_position: int = 0,
) -> MergedStatistics:
    """The loss's one collective and what follows it: all-gather this slice's statistics
    [N, kk + 6], merge them, and deal with bad input (raise on every rank alike, or, with
    input_flags, count it on the device and give those positions a NaN loss). first_position:
    the flat position of the first row, for the messages (a chunk of a longer call)."""
    gathered = _all_gather_rows(block, tp_group)  # [tp, N, kk + 6]
    merged = merge_statistics(gathered, valid, config, plan, vocab_size)
    if input_flags is None:
        any_non_finite = _raise_bad_input(
            merged, gathered, target, vocab_size, ignore_index, check_finite, first_position
        )
        if not check_finite and any_non_finite:
            # The caller detects non-finite losses itself (the trainer skips or stops the
            # step): make sure every position with a non-finite logit reports a NaN loss.
            merged.loss.masked_fill_(merged.non_finite.bool(), float("nan"))
    else:
        # No host synchronisation: the caller reads the counts when it wants them. Bad
        # positions get a NaN loss, so that ignoring the counts cannot train on them quietly.
        input_flags.add_(merged.flags.to(input_flags.dtype))
        bad = merged.non_finite.bool() | merged.bad_target.bool()
        merged.loss.masked_fill_(bad, float("nan"))
    return merged


class _VocabParallelShapedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        config: RewardShapingConfig,
        tp_group: dist.ProcessGroup | None,
        ignore_index: int,
        return_stats: bool,
        check_finite: bool,
        input_flags: torch.Tensor | None,
    ):
        if logits.shape[:-1] != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: logits "
                "must be [s, b, V/tp] and target [s, b]"
            )
        if not logits.is_floating_point():
            raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
        check_input_flags(input_flags, logits)
        tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        rank = 0 if tp_group is None else dist.get_rank(tp_group)
        vp = logits.shape[-1]
        vocab_size = vp * tp
        vocab_start, _ = vocab_range(vp, rank, tp)
        plan = plan_shard(config, vp, vocab_size, return_stats)

        logits = logits.contiguous()
        logits_2d = logits.view(-1, vp)  # [N, Vp]
        target_1d = target.reshape(-1).contiguous()  # [N]
        valid = target_1d != ignore_index
        # exp(z - m_r) goes over the fp32 logits in place, as megatron-core's cross-entropy does;
        # other dtypes get one fp32 buffer (megatron-core's .float() copy).
        buf = (
            logits_2d
            if logits_2d.dtype == torch.float32
            else torch.empty_like(logits_2d, dtype=torch.float32)
        )
        block, top_idx, marked = shard_statistics(
            logits_2d, target_1d, valid, vocab_start, plan, buf
        )

        merged = gather_and_merge(
            block,
            valid,
            target_1d,
            config,
            plan,
            vocab_size,
            tp_group,
            ignore_index=ignore_index,
            check_finite=check_finite,
            input_flags=input_flags,
        )

        ctx.config, ctx.plan, ctx.vocab_start = config, plan, vocab_start
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(
            logits if buf.data_ptr() == logits.data_ptr() else buf,  # autograd saves no views
            block,  # this slice's maximum, top values and target ownership
            top_idx,
            marked,
            target_1d,
            valid,
            merged.shift,
            merged.tau,
            merged.stats.target_logprob,
            merged.w_pos,
            merged.weight_sum,
        )
        loss = merged.loss.view(target.shape)
        if not return_stats:
            return loss
        stats = ShapedLossStats(*(s.view(target.shape) for s in merged.stats))
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        (
            buf,
            block,
            top_idx,
            marked,
            target_1d,
            valid,
            shift,
            tau,
            target_logprob,
            w_pos,
            weight_sum,
        ) = ctx.saved_tensors
        plan: ShardPlan = ctx.plan
        grad = shard_gradient_(
            buf.view(-1, buf.shape[-1]),
            grad_loss.reshape(-1),
            block,
            top_idx,
            marked,
            target_1d,
            valid,
            ctx.vocab_start,
            shift,
            tau,
            target_logprob,
            w_pos,
            weight_sum,
            ctx.config,
            plan,
            out_dtype=ctx.logits_dtype,
        )
        grad = grad.view(*grad_loss.shape, -1)
        return grad, None, None, None, None, None, None, None


def vocab_parallel_shaped_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    config: RewardShapingConfig,
    tp_group: dist.ProcessGroup | None,
    ignore_index: int = -100,
    return_stats: bool = False,
    check_finite: bool = True,
    *,
    input_flags: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ShapedLossStats]:
    """Reward-shaped loss over logits split along the vocabulary across tensor-parallel ranks.

    One all-gather of a [N, kk + 6] block per call (kk = min(top_k, V/tp) when the top-k set is
    needed, else 1); the backward is local. Math in fp32 whatever the logits' dtype. Exact against
    reference_shaped_cross_entropy, ties at the k-th logit included.

    On CUDA the forward, the merge and the backward are Triton kernels (functional.py says where
    each step runs) and nothing in the call waits for the device, except the check of bad input:
    by default the call reads the merged flags once (one host-device synchronisation per call,
    after the all-gather) so that it can raise. Pass `input_flags` to skip that read: then the
    call makes no host synchronisation at all (forward and backward), raises nothing about the
    values of its inputs, adds its counts to `input_flags` on the device, and gives a NaN loss at
    every position with a bad label or a non-finite logit. The trainer's use: one zero tensor per
    step, passed to every micro-batch's call, summed into the step's all-reduce, read once.

    Like megatron-core's vocab_parallel_cross_entropy, this overwrites fp32 logits in place (they
    hold exp(logit - max) after the forward and the gradient after the backward); pass a clone if
    you need them afterwards. Other dtypes are not modified; one fp32 buffer of their size is kept
    for the backward, as megatron-core does.

    Args:
        vocab_parallel_logits: [s, b, V/tp] (any leading shape) this rank's slice of the logits;
            rank r holds vocabulary ids [r * V/tp, (r + 1) * V/tp).
        target: [s, b] global target ids.
        config: the reward shaping.
        tp_group: the tensor-parallel group the vocabulary is split over; None means the logits
            hold the whole vocabulary (no communication).
        ignore_index: target value of positions that get zero loss and zero gradient.
        return_stats: also return ShapedLossStats computed from the same sums (top-k mass with
            k = config.top_k; it costs a top-k search when the config itself needs none).
        check_finite: raise on NaN or infinite logits (the statistics the forward gathers anyway
            show them, so the check costs no extra pass); False gives such positions a NaN loss
            instead, for callers that handle non-finite losses themselves (the trainer). Ignored
            with input_flags.
        input_flags: None (default: bad input raises, one host synchronisation per call), or a
            floating-point tensor [3] on the logits' device to which the call adds, in place and
            with no host synchronisation, the counts named by INPUT_FLAGS: positions with a label
            outside the vocabulary, positions with a NaN or infinite logit, positions whose ranks
            hold slices of different sizes. The counts come from the gathered statistics, so
            they are the same on every rank of tp_group. Nothing about the inputs' values raises
            then; those positions' losses are NaN.

    Returns:
        loss [s, b] fp32 per position; with return_stats, (loss, ShapedLossStats).

    Raises:
        ValueError: labels outside the vocabulary, unequal vocabulary slices, non-finite logits
            (with check_finite), all three only without input_flags; top_k larger than the
            vocabulary, a malformed input_flags. Raised on every rank of the group alike.
    """
    out = _VocabParallelShapedCrossEntropy.apply(
        vocab_parallel_logits,
        target,
        config,
        tp_group,
        ignore_index,
        return_stats,
        check_finite,
        input_flags,
    )
    if not return_stats:
        return out
    loss, *stats = out
    return loss, ShapedLossStats(*stats)
