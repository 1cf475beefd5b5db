"""Local-shard math of the vocab-parallel reward-shaped loss. No collectives here.

The vocab-parallel loss (vocab_parallel.py) is three steps around ONE all-gather:

1. `shard_statistics` finds the slice's top-(kk + 1) logits in one call, then reads the slice once
   more, chunk by chunk (on CPU with fp32 logits both steps are one numba kernel that reads each
   row from memory once: _cpu_kernels.row_statistics_fp32), and returns a small block [N, kk + 6]
   per position: the slice's top-kk logits (their first is the slice's maximum m_r),
   S_r = sum exp(z - m_r), T_r = sum exp(z - m_r) (z - m_r), the target's logit (0 if not
   owned), an ownership flag, the number of logits >= the slice's kk-th value, and Vp. It writes
   exp(z - m_r) over a fp32 buffer (the logits themselves when they are fp32, as megatron-core's
   cross-entropy does) for the backward.
2. `merge_statistics` turns the gathered blocks [tp, N, kk + 6] into every per-position quantity:
   global max and log-sum-exp, tau (the global k-th logit), head and tail sums (exactly, ties
   included), the weights, the loss and the diagnostics. Every rank computes the same numbers.
3. `shard_gradient_` writes the gradient over the buffer, in place:
   dloss/dz_j = W p_j - w_pos 1[j = x] - c_j p_j 1[j != x],  c_j = lambda_head if z_j >= tau
   else lambda_tail.

Why the sign bit: a slice whose kk-th value equals tau may hold more logits equal to tau than it
could gather (ties, common with bf16 logits). Those are all in the top-k set (tau is a threshold).
The top-(kk + 1) search shows which rows have such twins; in those rows alone, when head and tail
rewards differ, the forward sets the sign bit of exp(z - m_r) on every logit >= the kk-th value.
In every other row the set members are among the gathered top-kk indices. So the backward needs
neither the logits nor a mask.

Where each step runs: on CUDA tensors the three steps are Triton kernels (_triton_kernels.py:
the forward reads each row from memory about once and makes no host synchronisation, nor does
the merge or the one-pass backward) whenever triton imports; on CPU with fp32 logits the numba
kernels (_cpu_kernels.py); elsewhere the torch ops below. `TRITON_ON_CPU` (from the environment
variable MEGATRON_EXT_LOSS_TRITON=1, read once; tests set it) sends CPU tensors through the Triton
kernels too, which needs TRITON_INTERPRET=1 before triton is imported: the tests check the code
the GPU runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from megatron_ext.loss.config import RewardShapingConfig
from megatron_ext.loss.reference import ShapedLossStats, positive_weight
from megatron_ext.loss.select import GROUP, cpu_kernels, run_kernel, top_k_rows

__all__ = [
    "vocab_range",
    "ShardPlan",
    "plan_shard",
    "shard_statistics",
    "MergedStatistics",
    "merge_statistics",
    "shard_gradient_",
    "STAT_COLUMNS",
    "TRITON_ON_CPU",
    "triton_kernels",
]

# Columns after the kk top values in a shard's statistics block.
STAT_COLUMNS = ("sum_exp", "sum_exp_shifted", "target_logit", "owns_target", "count_ge_kth", "vp")
_S, _T, _ZX, _OWN, _CNT, _VP = range(len(STAT_COLUMNS))

# The forward reads the logits chunk by chunk so that its one fp32 temporary stays small: at most
# 1/16 of the logits on CPU (and at most 2**23 elements), 2**25 elements on a GPU. Few, large
# chunks: on a busy CPU every extra parallel op costs far more than its arithmetic.
_CHUNK_DIVISOR = 16
_CHUNK_ELEMENTS_CPU = (1 << 18, 1 << 23)
_CHUNK_ELEMENTS_GPU = 1 << 25

TRITON_ON_CPU: bool = os.environ.get("MEGATRON_EXT_LOSS_TRITON", "") == "1"
"""Run the Triton kernels on CPU tensors too (needs TRITON_INTERPRET=1; for tests)."""

# A kernel argument for "no rows" (no top-k indices to save, no marked rows).
_NO_ROWS_LONG = torch.empty(0, 0, dtype=torch.long)
_NO_ROWS_BOOL = torch.empty(0, dtype=torch.bool)


def vocab_range(partition_vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the vocabulary slice held by `rank` when each rank holds an equal slice."""
    if partition_vocab_size <= 0:
        raise ValueError(f"partition_vocab_size must be positive, got {partition_vocab_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    start = rank * partition_vocab_size
    return start, start + partition_vocab_size


def _rows_per_chunk(num_rows: int, row_len: int, device: torch.device) -> int:
    if device.type == "cuda":
        budget = _CHUNK_ELEMENTS_GPU
    else:
        low, high = _CHUNK_ELEMENTS_CPU
        budget = max(low, min(high, num_rows * row_len // _CHUNK_DIVISOR))
    return max(1, min(num_rows, budget // max(1, row_len)))


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What one call has to compute, fixed by the config, the slice size and the stats request."""

    kk: int
    """Top values gathered per slice (1: only the maximum)."""
    find_topk: bool
    """Whether tau and the head sums are needed (rank-split rewards or top-k mass statistics)."""
    mark_head: bool
    """Whether top-k candidates are sign-marked in the buffer (rank split and kk < slice)."""
    save_topk_indices: bool
    """Whether the backward needs the gathered top-kk indices (rank-split rewards)."""


def plan_shard(
    config: RewardShapingConfig, partition_vocab_size: int, vocab_size: int, return_stats: bool
) -> ShardPlan:
    """The work of one call; raises if top_k does not fit the vocabulary."""
    if config.uses_top_k and config.top_k > vocab_size:
        raise ValueError(
            f"top_k={config.top_k} exceeds the vocabulary size {vocab_size} (the full, padded "
            f"vocabulary over all tensor-parallel ranks); choose top_k <= {vocab_size}"
        )
    find_topk = config.needs_rank_split or return_stats
    k = min(config.top_k, vocab_size)
    kk = min(k, partition_vocab_size) if find_topk else 1
    return ShardPlan(
        kk=kk,
        find_topk=find_topk,
        mark_head=config.needs_rank_split and kk < partition_vocab_size,
        save_topk_indices=config.needs_rank_split,
    )


@functools.cache
def triton_kernels():
    """The module of Triton kernels (megatron_ext.loss._triton_kernels), or None when triton does
    not import."""
    try:
        from megatron_ext.loss import _triton_kernels
    except ImportError:
        return None
    return _triton_kernels


def _triton_path(*tensors: torch.Tensor):
    """The Triton kernels when every tensor is on CUDA (or on CPU with TRITON_ON_CPU) and
    contiguous, else None."""
    device = tensors[0].device.type
    if device != "cuda" and not (TRITON_ON_CPU and device == "cpu"):
        return None
    if not all(t.is_contiguous() for t in tensors):
        return None
    kernels = triton_kernels()
    if kernels is not None and device == "cpu" and not kernels.INTERPRETED:
        raise RuntimeError(
            "the loss's Triton kernels run on CPU tensors only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported (or unset MEGATRON_EXT_LOSS_TRITON)"
        )
    return kernels


def _fused_cpu_path(logits: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the forward's inputs suit the numba kernel (when numba is there): fp32 logits and
    buffer on CPU, rows contiguous (the kernel reads and writes whole rows; out may be the
    logits themselves)."""
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.numel() > 0
        and logits.is_contiguous()
        and out.is_contiguous()
    )


def shard_statistics(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    vocab_start: int,
    plan: ShardPlan,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-position statistics of one vocabulary slice, and exp(z - m_r) written into `out`.

    Args:
        logits: [N, Vp] this rank's logits, any float dtype.
        target: [N] global target ids.
        valid: [N] bool, False at ignored positions.
        vocab_start: first vocabulary id of this slice.
        plan: from plan_shard.
        out: [N, Vp] fp32 buffer for exp(z - m_r); may be `logits` itself (fp32 logits).

    Returns:
        block [N, kk + 6] fp32 (the top-kk values, the largest first and the kk-th largest at
        kk - 1, then STAT_COLUMNS); the local indices [N, kk] of the
        top-kk values when plan.save_topk_indices, else None; and when plan.mark_head, a mask
        [N] bool of the rows whose kk-th value ties with a logit beyond the gathered ones (their
        candidates are sign-marked in `out`), else None.
    """
    triton_ops = (
        _triton_path(logits, out, target, valid)
        if logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
        else None
    )
    if triton_ops is not None:
        return triton_ops.shard_statistics(
            logits,
            target,
            valid,
            vocab_start,
            plan.kk,
            plan.find_topk,
            plan.mark_head,
            plan.save_topk_indices,
            out,
        )
    n, vp = logits.shape
    kk = plan.kk
    block = torch.empty(n, kk + len(STAT_COLUMNS), dtype=torch.float32, device=logits.device)
    top_idx = (
        torch.empty(n, kk, dtype=torch.long, device=logits.device)
        if plan.save_topk_indices
        else None
    )

    # Top-kk + 1 tells whether the kk-th value ties with a logit that was not gathered; only
    # such rows need the count of logits >= it (and, for rank-split rewards, the marks).
    look_beyond = plan.find_topk and kk < vp
    kernels = cpu_kernels() if _fused_cpu_path(logits, out) else None
    if kernels is not None:
        ties = torch.zeros(n, dtype=torch.bool)
        run_kernel(
            kernels.row_statistics_fp32,
            n,
            logits.numel(),
            logits.numpy(),
            logits.view(torch.int32).numpy(),
            target.numpy(),
            valid.numpy(),
            vocab_start,
            kk,
            plan.find_topk,
            look_beyond,
            plan.mark_head,
            GROUP,
            out.numpy(),
            out.data_ptr() == logits.data_ptr(),
            block.numpy(),
            (top_idx if top_idx is not None else _NO_ROWS_LONG).numpy(),
            ties.numpy(),
        )
        return block, top_idx, ties if plan.mark_head else None

    # The target logit, read before `out` (possibly the logits themselves) is overwritten.
    local_t = target - vocab_start
    owns = valid & (local_t >= 0) & (local_t < vp)
    local_t = torch.where(owns, local_t, torch.zeros_like(local_t))
    block[:, kk + _ZX] = torch.where(owns, logits.gather(1, local_t.unsqueeze(1)).squeeze(1), 0)
    block[:, kk + _OWN] = owns.float()
    block[:, kk + _VP] = float(vp)
    block[:, kk + _CNT] = float(kk)
    if plan.find_topk:
        # One top-k call over all rows: per-chunk calls on a few rows cost several times more.
        if look_beyond:
            # [N, kk + 1]: the largest first, the kk-th and (kk + 1)-th largest last
            values, idx = top_k_rows(logits, kk + 1, fully_sorted=False)
            ties_all = values[:, kk] == values[:, kk - 1]  # the kk-th value has an ungathered twin
            values, idx = values[:, :kk], idx[:, :kk]
        else:
            values, idx = torch.sort(logits, dim=-1, descending=True)  # the whole slice
        block[:, :kk] = values
        if top_idx is not None:
            top_idx.copy_(idx)
        row_max = block[:, :1]
        any_ties = look_beyond and bool(ties_all.any())  # rare with fp32 logits, common with bf16
    else:
        any_ties = False
        row_max = logits.amax(dim=-1, keepdim=True).float()
        block[:, :1] = row_max
    rows = _rows_per_chunk(n, vp, logits.device)
    # One fp32 temporary for every chunk: a fresh large allocation per chunk costs page faults.
    scratch = torch.empty(rows, vp, dtype=torch.float32, device=logits.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        chunk = logits[r0:r1]  # [c, Vp] in the logits' dtype
        ties = ties_all[r0:r1].nonzero().squeeze(1) if any_ties else None  # [t]
        if ties is not None and ties.numel() > 0:
            # [t, Vp] the slice's top-kk and every logit tied with its kk-th value
            kth = block[r0:r1, kk - 1 : kk].index_select(0, ties)
            candidate = chunk.index_select(0, ties).float() >= kth
            block[r0 + ties, kk + _CNT] = candidate.sum(-1, dtype=torch.float32)
        shifted = torch.sub(chunk, row_max[r0:r1], out=scratch[: r1 - r0])  # [c, Vp] z - m_r
        e = torch.exp(shifted, out=out[r0:r1])  # [c, Vp], over the fp32 logits themselves
        block[r0:r1, kk + _S] = e.sum(-1)
        block[r0:r1, kk + _T] = shifted.mul_(e).sum(-1)
        if plan.mark_head and ties is not None and ties.numel() > 0:
            marked = e.index_select(0, ties)
            e.index_copy_(0, ties, torch.where(candidate, marked.neg(), marked))
    return block, top_idx, ties_all if plan.mark_head else None


@dataclasses.dataclass
class MergedStatistics:
    """Per-position results of merging every slice's block; identical on every rank."""

    loss: torch.Tensor  # [N]
    stats: ShapedLossStats  # each [N]
    shift: torch.Tensor  # [N] max + log S: p_j = exp(z_j - shift)
    tau: torch.Tensor  # [N] the k-th largest logit (+inf when not needed)
    w_pos: torch.Tensor  # [N] 0 at ignored positions
    weight_sum: torch.Tensor  # [N] W, 0 at ignored positions
    bad_target: torch.Tensor  # [N] nonzero: a valid target owned by no rank or by several
    non_finite: torch.Tensor  # [N] nonzero: some logit of the position is NaN or infinite
    flags: torch.Tensor
    """[3] fp32 on the logits' device: positions with a bad target, positions with non-finite
    logits, positions whose slices differ in width (0 or all). Reading it is a host sync."""


def _merged_from_rows(out: torch.Tensor, names: tuple[str, ...]) -> MergedStatistics:
    """MergedStatistics from a merge kernel's output rows [len(names), N] (names as
    _cpu_kernels.MERGED_ROWS; the last three are the 0/1 flags)."""
    r = dict(zip(names, out, strict=True))
    return MergedStatistics(
        loss=r["loss"],
        stats=ShapedLossStats(
            entropy=r["entropy"],
            target_prob=r["target_prob"],
            target_logprob=r["target_logprob"],
            topk_mass=r["topk_mass"],
        ),
        shift=r["shift"],
        tau=r["tau"],
        w_pos=r["w_pos"],
        weight_sum=r["weight_sum"],
        bad_target=r["bad_target"],
        non_finite=r["non_finite"],
        flags=out[-3:].sum(1),  # one op for the three
    )


def merge_statistics(
    gathered: torch.Tensor,
    valid: torch.Tensor,
    config: RewardShapingConfig,
    plan: ShardPlan,
    vocab_size: int,
) -> MergedStatistics:
    """Combine the per-slice blocks [tp, N, kk + 6] into the loss and the backward's scalars
    (on CPU one kernel, _cpu_kernels.merge_fp32, with fp64 scalars; elsewhere the torch ops
    below)."""
    kk = plan.kk
    # What both merge kernels take after the gathered blocks and the valid mask.
    shaping = (
        kk,
        min(config.top_k, vocab_size),
        plan.find_topk,
        config.beta,
        config.lambda_head,
        config.lambda_tail,
    )
    triton_ops = _triton_path(gathered, valid)
    if triton_ops is not None:
        out = triton_ops.merge_statistics(gathered, valid, *shaping)
        if out is not None:
            return _merged_from_rows(out, triton_ops.MERGED_ROWS)
    kernels = (
        cpu_kernels() if gathered.device.type == "cpu" and triton_ops is None else None
    )
    if kernels is not None and gathered.dtype == torch.float32:
        n = gathered.shape[1]
        out = torch.empty(len(kernels.MERGED_ROWS), n, dtype=torch.float32)
        run_kernel(
            kernels.merge_fp32,
            n,
            gathered.numel(),
            gathered.contiguous().numpy(),
            valid.numpy(),
            *shaping,
            out.numpy(),
        )
        return _merged_from_rows(out, kernels.MERGED_ROWS)
    values = gathered[..., :kk]  # [tp, N, kk]
    col = gathered[..., kk:]  # [tp, N, 6]
    m_r = values[..., 0]  # [tp, N]
    m = m_r.amax(0)  # [N]
    scale = torch.exp(m_r - m)  # [tp, N]
    sum_exp = (col[..., _S] * scale).sum(0)  # [N] S = sum_a exp(z_a - m)
    # sum_a exp(z_a - m) (z_a - m), rescaled from each slice's own maximum to the global one.
    sum_exp_shifted = (scale * (col[..., _T] + (m_r - m) * col[..., _S])).sum(0)
    log_s = torch.log(sum_exp)
    target_logit = col[..., _ZX].sum(0)
    owners = col[..., _OWN].sum(0)
    target_logprob = target_logit - m - log_s
    target_prob = torch.exp(target_logprob)
    target_e = target_prob * sum_exp  # exp(z_x - m)
    target_e_shifted = target_e * (target_logit - m)

    if plan.find_topk:
        k = min(config.top_k, vocab_size)
        tp = gathered.shape[0]
        candidates = values.permute(1, 0, 2).reshape(-1, tp * kk)  # [N, tp*kk]
        if k == candidates.shape[1]:
            tau = candidates.amin(-1)  # [N] every gathered value is in the set
        else:
            tau = top_k_rows(candidates, k, fully_sorted=False)[0][:, -1]  # [N] k-th largest
        in_head = candidates >= tau.unsqueeze(1)
        e_head = torch.exp(candidates - m.unsqueeze(1)) * in_head
        head_sum = e_head.sum(-1)
        head_shifted = (e_head * (candidates - m.unsqueeze(1))).sum(-1)
        # A slice whose own kk-th value equals tau may hold more logits equal to tau than it
        # gathered; count_ge_kth tells how many it holds.
        extra = torch.where(values[..., kk - 1] == tau, col[..., _CNT] - kk, 0.0).sum(0)
        e_tau = torch.exp(tau - m)
        head_sum = head_sum + extra * e_tau
        head_shifted = head_shifted + extra * e_tau * (tau - m)
        target_in_head = target_logit >= tau
    else:
        tau = torch.full_like(m, float("inf"))
        head_sum = torch.zeros_like(m)
        head_shifted = torch.zeros_like(m)
        target_in_head = torch.zeros_like(valid)

    # Negatives only: the target never gets a negative reward.
    head_neg = head_sum - target_e * target_in_head
    head_neg_shifted = head_shifted - target_e_shifted * target_in_head
    tail_neg = sum_exp - head_sum - target_e * ~target_in_head
    tail_neg_shifted = sum_exp_shifted - head_shifted - target_e_shifted * ~target_in_head
    # sum_{a in set} p_a log p_a = (1/S) sum e_a (z_a - m) - log S * (1/S) sum e_a
    p_head_neg, p_tail_neg = head_neg / sum_exp, tail_neg / sum_exp
    plogp_head = head_neg_shifted / sum_exp - log_s * p_head_neg
    plogp_tail = tail_neg_shifted / sum_exp - log_s * p_tail_neg

    w_pos = positive_weight(target_logprob, config.beta)
    weight_sum = w_pos + config.lambda_head * p_head_neg + config.lambda_tail * p_tail_neg
    loss = -(
        w_pos * target_logprob + config.lambda_head * plogp_head + config.lambda_tail * plogp_tail
    )

    zero = torch.zeros_like(loss)
    bad_target = valid & (owners != 1)
    non_finite = ~(torch.isfinite(m) & torch.isfinite(sum_exp) & torch.isfinite(sum_exp_shifted))
    vp_col = gathered[..., -1]
    flags = torch.stack(  # [3] on the device: the caller reads them (or not)
        [bad_target.sum(), non_finite.sum(), (vp_col != vp_col[0:1]).any(0).sum()]
    ).float()
    return MergedStatistics(
        loss=torch.where(valid, loss, zero),
        stats=ShapedLossStats(
            entropy=log_s - sum_exp_shifted / sum_exp,
            target_prob=torch.where(valid, target_prob, zero),
            target_logprob=torch.where(valid, target_logprob, zero),
            topk_mass=head_sum / sum_exp if plan.find_topk else torch.full_like(m, float("nan")),
        ),
        shift=m + log_s,
        tau=tau,
        w_pos=torch.where(valid, w_pos, zero),
        weight_sum=torch.where(valid, weight_sum, zero),
        bad_target=bad_target,
        non_finite=non_finite,
        flags=flags,
    )


def shard_gradient_(
    buf: torch.Tensor,
    grad_loss: torch.Tensor,
    block: torch.Tensor,
    local_top_idx: torch.Tensor | None,
    marked: torch.Tensor | None,
    target: torch.Tensor,
    valid: torch.Tensor,
    vocab_start: int,
    merged_shift: torch.Tensor,
    tau: torch.Tensor,
    target_logprob: torch.Tensor,
    w_pos: torch.Tensor,
    weight_sum: torch.Tensor,
    config: RewardShapingConfig,
    plan: ShardPlan,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Turn buf [N, Vp] (exp(z - m_r), sign-marked rows) into dloss/dz of this slice, in place.

    block, local_top_idx and marked are shard_statistics' results for this slice; merged_shift,
    tau, target_logprob, w_pos and weight_sum [N] the merge's. grad_loss [N] is the upstream
    gradient of the per-position loss; ignored positions (valid False) get a zero gradient
    whatever it says. On CPU one kernel (_cpu_kernels.gradient_fp32) does it row by row; on CUDA
    one Triton kernel (_triton_kernels.shard_gradient), which writes the gradient in out_dtype
    (e.g. the logits' bf16) in the same pass (a new tensor; over buf when fp32); elsewhere the
    torch ops below. Every path but Triton's returns fp32 (buf) whatever out_dtype says.
    """
    triton_ops = _triton_path(buf, block, target, valid)
    if triton_ops is not None:
        return triton_ops.shard_gradient(
            buf,
            grad_loss,
            block,
            local_top_idx,
            marked,
            target,
            valid,
            vocab_start,
            merged_shift,
            tau,
            target_logprob,
            w_pos,
            weight_sum,
            config.lambda_head,
            config.lambda_tail,
            plan.kk,
            plan.save_topk_indices,
            out_dtype or torch.float32,
        )
    n = buf.shape[0]
    kernels = cpu_kernels() if buf.device.type == "cpu" and buf.is_contiguous() else None
    if kernels is not None:
        run_kernel(
            kernels.gradient_fp32,
            n,
            buf.numel(),
            buf.numpy(),
            grad_loss.float().contiguous().numpy(),
            valid.numpy(),
            target.numpy(),
            vocab_start,
            block.numpy(),
            merged_shift.numpy(),
            tau.numpy(),
            target_logprob.numpy(),
            w_pos.numpy(),
            weight_sum.numpy(),
            (marked if marked is not None else _NO_ROWS_BOOL).numpy(),
            (local_top_idx if plan.save_topk_indices else _NO_ROWS_LONG).numpy(),
            config.lambda_head,
            config.lambda_tail,
            plan.kk,
        )
        return buf
    g = grad_loss.float() * valid
    local_max = block[:, 0]
    local_top_values = block[:, : plan.kk]
    owns_target = block[:, plan.kk + _OWN] > 0
    marked_rows = marked.nonzero().squeeze(1) if marked is not None else None
    # p_j = |buf_j| * exp(m_r - shift); every logit first gets the tail coefficient W - lambda_tail.
    row_scale = g * torch.exp(local_max - merged_shift)  # [N]
    coef_tail = (row_scale * (weight_sum - config.lambda_tail)).unsqueeze(1)  # [N, 1]

    marked_grad = None
    marks_are_members = torch.zeros_like(valid)
    if marked_rows is not None and marked_rows.numel() > 0:
        # In rows whose kk-th value is tau, every marked logit is in the set (ties included); in
        # the other marked rows the marks are stale and every logit is a tail logit.
        kth = local_top_values.index_select(0, marked_rows)[:, plan.kk - 1]
        members = kth == tau.index_select(0, marked_rows)  # [R]
        marks_are_members.index_fill_(0, marked_rows[members], True)
        a = coef_tail.index_select(0, marked_rows)  # [R, 1]
        b = torch.where(
            members,
            row_scale.index_select(0, marked_rows)
            * (weight_sum - config.lambda_head).index_select(0, marked_rows),
            a.squeeze(1),
        ).unsqueeze(1)
        e = buf.index_select(0, marked_rows)  # [R, Vp]
        # a * e where e >= 0 (unmarked), b * |e| where e < 0 (marked): a e - (a + b) min(e, 0)
        marked_grad = e.mul(a).sub_(e.clamp_max(0.0).mul_(a + b))

    buf.mul_(coef_tail)  # in place, no temporary: one op over the whole slice
    if marked_grad is not None:
        buf.index_copy_(0, marked_rows, marked_grad)

    if plan.save_topk_indices:
        # Set members among the gathered indices, in rows the marks did not handle: they got
        # W - lambda_tail and need W - lambda_head, so add (lambda_tail - lambda_head) p_j.
        p_top = torch.exp(local_top_values - merged_shift.unsqueeze(1))  # [N, kk]
        member = (local_top_values >= tau.unsqueeze(1)) & ~marks_are_members.unsqueeze(1)
        fix = (g * (config.lambda_tail - config.lambda_head)).unsqueeze(1) * p_top * member
        buf.scatter_add_(1, local_top_idx, fix)

    # The target: W p_x - w_pos (it is never a negative, whatever the marks said).
    local_t = torch.where(owns_target, target - vocab_start, torch.zeros_like(target))
    target_grad = g * (weight_sum * torch.exp(target_logprob) - w_pos)  # [N]
    current = buf.gather(1, local_t.unsqueeze(1)).squeeze(1)
    buf.scatter_(
        1, local_t.unsqueeze(1), torch.where(owns_target, target_grad, current).unsqueeze(1)
    )
    return buf
