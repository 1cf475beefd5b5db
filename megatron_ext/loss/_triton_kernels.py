"""Triton kernels of the loss's CUDA path (also run on CPU tensors under TRITON_INTERPRET=1).

The same three steps as the CPU numba kernels (_cpu_kernels.py), with the same inputs and outputs
as the torch ops of functional.py (the same [N, kk + 6] block, marks and saved buffer), so that
the all-gather between them does not change. Nothing here reads a tensor on the host.

- `shard_statistics` (_statistics_kernel), the forward of one vocabulary slice. Persistent
  programs, one row at a time each:

  1. pass 1 over the row: its largest and smallest keys and, when the top-k set is needed, the
     largest key of every group of GROUP logits (to a scratch row, 1/GROUP of the row);
  2. top-k only, no full pass: the kk-th largest group maximum by a search on counts over the
     group maxima (in registers). The kk groups with the largest maxima hold kk logits at least
     that large, so it is a floor under the kk-th largest logit; the groups whose maximum reaches
     it (about kk of them, kk * GROUP logits) are read again, sparsely, into one register tile,
     where the same search finds the exact kk-th largest logit and the counts above and at it,
     and from which the top-kk values and columns are written;
  3. pass 2 over the row: exp(z - m) written out (sign-marked where the kk-th value has
     ungathered twins) with its two sums.

  So two passes over the logits (plus the sparse re-read for top-k). Rows of at most
  CUDA_SINGLE_MAX logits (TP >= 16 at Qwen3's 151,936, or small vocabularies) are loaded into
  registers once and both passes run there: one read from memory. Longer rows are read in
  chunks; there the persistent grid keeps the rows in flight within CUDA_L2_SHARE of the L2
  cache where it can (at least one row per SM), so that pass 2 finds the row in L2: a bf16 slice
  at TP = 2 (152 KB, 20 MB for 132 SMs) or TP = 1 (304 KB, 40 MB) fits an H100/H200's 50 MB L2,
  an fp32 slice at TP = 1 (608 KB, 80 MB) only partly (part of it is then read twice). Those are
  estimates, not measurements. Exact fallback, for a row whose groups at the floor are too many
  for the tile (long runs of ties), k > MAX_TILE_K, or rows shorter than kk groups: the same
  search over the whole row, each count one more pass (bounds snap to the nearest keys: usually
  3-8 counts, at most about 32), two counting passes and one collection pass.
- `merge_statistics` (_merge_kernel): functional.merge_statistics over the gathered blocks
  [tp, N, kk + 6] in one launch, a block of rows per program, fp64 scalars as the CPU kernel;
  it reads no logits.
- `shard_gradient` (_gradient_kernel): functional.shard_gradient_ in ONE pass per row (read the
  saved buffer, write the gradient in the logits' dtype, over the fp32 buffer for fp32 logits),
  then, for rank-split rewards in rows without valid marks, at most kk scattered writes at the
  gathered top columns.

Order of logits: an int32 key of each fp32 value's bits, `b ^ ((b >> 31) & 0x7FFFFFFF)`, whose
signed order is the float order, with -0.0 first turned into +0.0 (the float comparison of the
tie rule cannot tell them apart) and a NaN beyond +-inf (which is how non-finite rows show).
Arithmetic in fp32 (the merge in fp64), exp as tl.exp. functional.TRITON_ON_CPU sends CPU
tensors here (tests); the CUDA launch settings below are module attributes, so that a benchmark
can try others (tools/bench_gpu.py --sweep).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "MERGED_ROWS",
    "merge_statistics",
    "shard_gradient",
    "shard_statistics",
]

try:
    INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton before 3.4 has no knobs
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether the kernels below were built for Triton's interpreter (TRITON_INTERPRET=1)."""

# Launch settings of the CUDA path (module attributes, so that a benchmark can try others).
CUDA_CHUNK = 8192
"""Logits per chunk of the row loops (a [CUDA_CHUNK // GROUP, GROUP] tile)."""
CUDA_SINGLE_MAX = 16384
"""Rows of at most this many logits (rounded up to a power of 2) are read into one tile, once."""
CUDA_L2_SHARE = 0.6
"""Share of the L2 cache the rows in flight may fill (the forward's second read of a row should
come from L2): programs per SM = this * L2 bytes / (SMs * row bytes), between 1 and 4."""
CUDA_PROGRAMS_PER_SM: int | None = None
"""Persistent programs per SM; None: from CUDA_L2_SHARE."""
CUDA_NUM_WARPS = 16
"""Warps per program of the forward and backward kernels."""
INTERPRETER_CHUNK = 1024
"""Chunk of the row loops on CPU tensors (the interpreter); tests make it small."""
GROUP = 32
"""Logits per group of the top-k floor."""
MAX_TILE_K = 256
"""Largest kk searched in the candidate tile; larger ones take the exact fallback."""
MERGE_MAX_CANDIDATES = 16384
"""Largest tp * kk the merge kernel takes in one tile; beyond, functional's torch merge runs."""

# Rows of merge_statistics' output, as _cpu_kernels.MERGED_ROWS.
MERGED_ROWS = (
    "loss",
    "entropy",
    "target_prob",
    "target_logprob",
    "topk_mass",
    "shift",
    "tau",
    "w_pos",
    "weight_sum",
    "bad_target",
    "non_finite",
    "unequal_slices",
)

# Device functions: @triton.jit, or under the interpreter the plain Python function (same source;
# the interpreted kernel that calls it has already patched triton.language, and a nested
# interpreted call would patch it again, about a millisecond per call).
_device_fn = (lambda fn: fn) if INTERPRETED else triton.jit

_MIN_KEY = tl.constexpr(-2147483648)  # below every key but a NaN's with the sign bit set
_MAX_KEY = tl.constexpr(2147483647)
_INF_KEY = tl.constexpr(2139095040)  # the key of +inf; -2139095041 (~_INF_KEY) is -inf's
_NEG_INF_KEY = tl.constexpr(-2139095041)
_BIG_COL = tl.constexpr(2147483647)
_FP32_TINY = tl.constexpr(1.1754943508222875e-38)


# ---------------------------------------------------------------------------------------------
# Helpers

# Reductions through tl.reduce / tl.associative_scan with triton's own combine functions: the same
# code as tl.sum, tl.max, tl.min and tl.cumsum on int32 / fp32 / fp64 tiles, minus a jit wrapper
# per call that the interpreter would run at the cost of a language patch each time.


@_device_fn
def _sum(x, axis=None):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@_device_fn
def _max(x, axis=None):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@_device_fn
def _min(x, axis=None):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@_device_fn
def _cumsum(x, axis):
    return tl.associative_scan(x, axis, tl.standard._sum_combine)


@_device_fn
def _keys(z):
    """int32 keys of fp32 z: signed order = float order (-0.0 as +0.0, NaN beyond +-inf)."""
    b = z.to(tl.int32, bitcast=True)
    b = tl.where(b == _MIN_KEY, 0, b)  # -0.0 -> +0.0
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@_device_fn
def _key_value(key):
    """The fp32 whose key is `key` (int32)."""
    b = key ^ ((key >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@_device_fn
def _to_bf16(x):
    """fp32 -> bf16 rounded to nearest even (NaN stays NaN) by integer ops: what a GPU's
    conversion gives, and also what the interpreter gives (its own conversion truncates)."""
    b = x.to(tl.int32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@_device_fn
def _ranks(x):
    """Row-major inclusive prefix count minus one of a 2-D 0/1 int32 tile (the rank of each set
    element among the set ones)."""
    rows = _sum(x, 1)
    before = _cumsum(rows, 0) - rows
    return before[:, None] + _cumsum(x, 1) - 1


@_device_fn
def _count_tile(keys, p):
    """(#keys >= p, smallest key >= p, largest key < p) over a tile (sentinels _MIN_KEY)."""
    ge = keys >= p
    count = _sum(ge.to(tl.int32))
    above = _min(tl.where(ge, keys, _MAX_KEY))
    below = _max(tl.where(ge, _MIN_KEY, keys))
    return count, above, below


@_device_fn
def _count_row(zrow, vp, p, offs, BLOCK: tl.constexpr):
    """_count_tile over a whole row, one pass."""
    count = p * 0
    above = p * 0 + _MAX_KEY
    below = p * 0 + _MIN_KEY
    for start in range(0, vp, BLOCK):
        _, keys, _ = _load_keys(zrow, start + offs, vp)
        c, a, b = _count_tile(keys, p)
        count += c
        above = tl.minimum(above, a)
        below = tl.maximum(below, b)
    return count, above, below


@_device_fn
def _search(
    keys, zrow, vp, offs, need, lo, hi, c_lo, c_hi, BLOCK: tl.constexpr, ON_ROW: tl.constexpr
):
    """The largest key p in [lo, hi) with count(keys >= p) >= need, given c_lo = count(keys >=
    lo) >= need > c_hi = count(keys >= hi), lo a key: a search on counts over the tile `keys`
    or, ON_ROW, over the row (one pass per count). The pivot is interpolated between the bounds
    in value space (logits are smooth there, their keys are not); after two moves of the same
    bound it bisects the key interval instead. Bounds snap to the nearest keys, so a run of
    equal keys ends the search at once. Returns an int32 key."""
    lo = tl.cast(lo, tl.int64)
    hi = tl.cast(hi, tl.int64)
    c_lo = tl.cast(c_lo, tl.int32)
    c_hi = tl.cast(c_hi, tl.int32)
    streak = c_lo * 0
    side = c_lo * 0
    while hi - lo > 1:
        v_lo = _key_value(lo.to(tl.int32))
        v_hi = _key_value((hi - 1).to(tl.int32))
        frac = (c_lo - need + 0.5) / (c_lo - c_hi).to(tl.float32)
        v = v_lo + frac * (v_hi - v_lo)
        bisect = (streak >= 2) | ~(tl.abs(v) < 3.0e38)  # also NaN and infinite bounds
        p = tl.minimum(tl.maximum(_keys(v).to(tl.int64), lo + 1), hi - 1)
        p = tl.where(bisect, (lo + hi) >> 1, p).to(tl.int32)
        if ON_ROW:
            count, above, below = _count_row(zrow, vp, p, offs, BLOCK)
        else:
            count, above, below = _count_tile(keys, p)
        enough = count >= need
        now = tl.where(enough, 1, -1)
        streak = tl.where(bisect, 0, tl.where(side == now, streak + 1, 1))
        side = now
        lo = tl.where(enough, above.to(tl.int64), lo)
        c_lo = tl.where(enough, count, c_lo)
        hi = tl.where(count == need, lo + 1, tl.where(enough, hi, below.to(tl.int64) + 1))
        c_hi = tl.where(enough, c_hi, count)
    return lo.to(tl.int32)


@_device_fn
def _load_keys(zrow, cols, vp):
    inside = cols < vp
    z = tl.load(zrow + cols, mask=inside, other=0.0).to(tl.float32)
    return z, tl.where(inside, _keys(z), _MIN_KEY), inside


@_device_fn
def _write_top(
    brow,
    irow,
    z,
    keys,
    cols,
    kth,
    maxkey,
    take_eq,
    first_col,
    gt_base,
    eq_base,
    kk,
    SAVE_IDX: tl.constexpr,
):
    """Store a tile's share of the top-kk values (and columns): the first column holding the
    maximum to slot 0, the other keys above kth to slots 1, 2, ... in column order, and keys
    equal to kth (up to take_eq of them) to slots kk - 1, kk - 2, ... . gt_base / eq_base: how
    many of each the tiles before this one held; returns the updated counts."""
    first = (cols == first_col) & (keys == maxkey)
    gt = (keys > kth) & ~first
    eq = (keys == kth) & ~first
    rank_gt = gt_base + _ranks(gt.to(tl.int32))
    rank_eq = eq_base + _ranks(eq.to(tl.int32))
    slot = tl.where(first, 0, tl.where(gt, 1 + rank_gt, kk - 1 - rank_eq))
    keep = first | gt | (eq & (rank_eq < take_eq))
    tl.store(brow + slot, z, mask=keep)
    if SAVE_IDX:
        tl.store(irow + slot, cols.to(tl.int64), mask=keep)
    return gt_base + _sum(gt.to(tl.int32)), eq_base + _sum(eq.to(tl.int32))


# ---------------------------------------------------------------------------------------------
# Forward of one vocabulary slice


@triton.jit(do_not_specialize=["n_rows", "vocab_start", "kk"])
def _statistics_kernel(
    z_ptr,
    out_ptr,
    target_ptr,
    valid_ptr,
    block_ptr,
    idx_ptr,
    ties_ptr,
    scratch_ptr,
    n_rows,
    vp,
    vocab_start,
    kk,
    vp_float,
    FIND_TOPK: tl.constexpr,
    MARK: tl.constexpr,
    SAVE_IDX: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    NG_PAD: tl.constexpr,
    SEL: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """Rows [N, vp] of z -> block [N, kk + 6], out = exp(z - m) (sign-marked), idx [N, kk] (with
    SAVE_IDX), ties [N] (with MARK). SINGLE: the row fits one [BLOCK // GROUP, GROUP] tile and is
    read once. SEL: groups of the candidate tile (0: always the row fallback)."""
    R: tl.constexpr = BLOCK // GROUP
    width = kk + 6
    pid = tl.program_id(0)
    offs = tl.arange(0, R)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [R, GROUP]
    n_groups = (vp + GROUP - 1) // GROUP
    scratch = scratch_ptr + tl.cast(pid, tl.int64) * (2 * NG_PAD)
    for r in range(pid, n_rows, tl.num_programs(0)):
        zrow = z_ptr + tl.cast(r, tl.int64) * vp
        orow = out_ptr + tl.cast(r, tl.int64) * vp
        brow = block_ptr + tl.cast(r, tl.int64) * width
        irow = idx_ptr + tl.cast(r, tl.int64) * kk
        # The target's logit, read before out (maybe the logits themselves) is written.
        col = tl.load(target_ptr + r) - vocab_start
        owns = (tl.load(valid_ptr + r) != 0) & (col >= 0) & (col < vp)
        zx = tl.load(zrow + tl.where(owns, col, 0)).to(tl.float32)
        tl.store(brow + kk + 2, tl.where(owns, zx, 0.0))
        tl.store(brow + kk + 3, tl.where(owns, 1.0, 0.0))
        tl.store(brow + kk + 5, vp_float)

        # Pass 1: the largest and smallest keys; the group maxima for the top-k floor.
        tl.debug_barrier()  # the previous row's scratch is read by every thread before this
        kmax = tl.full([R, GROUP], _MIN_KEY, tl.int32)
        kmin = tl.full([R, GROUP], _MAX_KEY, tl.int32)
        if SINGLE:
            z_tile, keys_tile, inside_tile = _load_keys(zrow, offs, vp)
        for start in range(0, vp, BLOCK):
            if SINGLE:
                keys = keys_tile
                inside = inside_tile
            else:
                _, keys, inside = _load_keys(zrow, start + offs, vp)
            kmax = tl.maximum(kmax, keys)
            kmin = tl.minimum(kmin, tl.where(inside, keys, _MAX_KEY))
            if FIND_TOPK:
                g = start // GROUP + tl.arange(0, R)
                tl.store(scratch + g, _max(keys, 1), mask=g < n_groups)
        maxkey = _max(kmax)
        minkey = _min(kmin)
        has_nan = (maxkey > _INF_KEY) | (minkey < _NEG_INF_KEY)
        m = _key_value(maxkey)  # the slice's maximum (NaN in a row holding a NaN)

        kth = maxkey
        count = kk * 1
        if FIND_TOPK:
            if has_nan:
                for t0 in range(0, kk, BLOCK):
                    t = t0 + offs
                    tl.store(brow + t, float("nan"), mask=t < kk)
                    if SAVE_IDX:
                        tl.store(irow + t, t.to(tl.int64), mask=t < kk)
            else:
                done = kk * 0
                lo = minkey
                if SEL > 0:
                    search_tile = (kk < vp) & (kk <= n_groups)
                else:
                    search_tile = kk < 0
                if search_tile:
                    # Top-k, no full pass: the floor is the kk-th largest group maximum.
                    tl.debug_barrier()
                    gi = tl.arange(0, NG_PAD)
                    gk = tl.load(scratch + gi, mask=gi < n_groups, other=_MIN_KEY)
                    low_g = _min(tl.where(gi < n_groups, gk, _MAX_KEY))
                    floor = _search(
                        gk, zrow, vp, offs, kk, low_g, maxkey.to(tl.int64) + 1, n_groups, 0,
                        BLOCK, False,
                    )  # fmt: skip
                    lo = floor
                    sel = (gk >= floor) & (gi < n_groups)
                    n_sel = _sum(sel.to(tl.int32))
                    if n_sel <= SEL:
                        # The groups reaching the floor, read again into one tile.
                        pos = _cumsum(sel.to(tl.int32), 0) - 1
                        tl.store(scratch + NG_PAD + pos, gi, mask=sel)
                        tl.debug_barrier()
                        s = tl.arange(0, SEL)
                        gsel = tl.load(scratch + NG_PAD + s, mask=s < n_sel, other=0)
                        cols = gsel[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [SEL, G]
                        cz, ck, cin = _load_keys(zrow, cols, vp)
                        ck = tl.where(s[:, None] < n_sel, ck, _MIN_KEY)
                        n_cand = _sum((ck >= floor).to(tl.int32))
                        kth = _search(
                            ck, zrow, vp, offs, kk, floor, maxkey.to(tl.int64) + 1, n_cand, 0,
                            BLOCK, False,
                        )  # fmt: skip
                        count = _sum((ck >= kth).to(tl.int32))
                        n_gt = _sum((ck > kth).to(tl.int32))
                        take_eq = kk - 1 - n_gt + (maxkey > kth).to(tl.int32)
                        first = _min(tl.where(ck == maxkey, cols, _BIG_COL))
                        _write_top(
                            brow, irow, cz, ck, cols, kth, maxkey, take_eq, first, kk * 0,
                            kk * 0, kk, SAVE_IDX,
                        )  # fmt: skip
                        done = 1
                if done == 0:
                    # Exact fallback over the whole row (ties beyond the tile, k > MAX_TILE_K,
                    # short rows, the whole slice).
                    if kk >= vp:
                        kth = minkey
                    else:
                        c_lo, _, _ = _count_row(zrow, vp, lo, offs, BLOCK)
                        kth = _search(
                            offs, zrow, vp, offs, kk, lo, maxkey.to(tl.int64) + 1, c_lo, 0,
                            BLOCK, True,
                        )  # fmt: skip
                    count, _, _ = _count_row(zrow, vp, kth, offs, BLOCK)
                    n_gt, _, _ = _count_row(zrow, vp, kth + 1, offs, BLOCK)
                    n_gt = tl.where(kth == _MAX_KEY, 0, n_gt)
                    take_eq = kk - 1 - n_gt + (maxkey > kth).to(tl.int32)
                    first = kk * 0 + _BIG_COL
                    gt_base = kk * 0
                    eq_base = kk * 0
                    for start in range(0, vp, BLOCK):
                        cols = start + offs
                        cz, ck, cin = _load_keys(zrow, cols, vp)
                        here = _min(tl.where(ck == maxkey, cols, _BIG_COL))
                        first = tl.where(first < _BIG_COL, first, here)
                        gt_base, eq_base = _write_top(
                            brow, irow, cz, ck, cols, kth, maxkey, take_eq, first, gt_base,
                            eq_base, kk, SAVE_IDX,
                        )  # fmt: skip
        else:
            tl.store(brow, m)
        tie = count > kk  # only when FIND_TOPK: the kk-th value has ungathered twins
        if MARK:
            tl.store(ties_ptr + r, tie)
            negate = tie
        else:
            negate = tie & (count < 0)  # False
        kth_value = _key_value(kth)

        # Pass 2: exp(z - m) (sign-marked) and its sums.
        s_acc = tl.full([R, GROUP], 0.0, tl.float32)
        t_acc = tl.full([R, GROUP], 0.0, tl.float32)
        for start in range(0, vp, BLOCK):
            cols = start + offs
            if SINGLE:
                z = z_tile
                inside = inside_tile
            else:
                inside = cols < vp
                z = tl.load(zrow + cols, mask=inside, other=0.0).to(tl.float32)
            d = z - m
            e = tl.exp(d)
            e = tl.where(d == d, e, 0.0)  # +inf logits: inf - inf gives 0, as the CPU kernel
            e = tl.where(has_nan, float("nan"), e)
            s_acc += tl.where(inside, e, 0.0)
            t_acc += tl.where(inside, d * e, 0.0)
            tl.store(orow + cols, tl.where(negate & (z >= kth_value), -e, e), mask=inside)
        tl.store(brow + kk, _sum(s_acc))
        tl.store(brow + kk + 1, _sum(t_acc))
        tl.store(brow + kk + 4, count.to(tl.float32))


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.cache
def _device_sizes(index: int) -> tuple[int, int]:
    """(SMs, L2 bytes) of a CUDA device (a host query, no synchronisation)."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, int(getattr(props, "L2_cache_size", 50 << 20))


def _programs(n: int, device: torch.device, programs: int | None, row_bytes: int) -> int:
    """Persistent programs of a row kernel: enough to fill the SMs, few enough that the rows in
    flight stay in L2."""
    if programs is not None:
        return max(1, min(n, programs))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms, l2 = _device_sizes(index)
        per_sm = CUDA_PROGRAMS_PER_SM or int(CUDA_L2_SHARE * l2 // max(1, sms * row_bytes))
        return max(1, min(n, sms * min(4, max(1, per_sm))))
    return n  # the interpreter runs programs one after another: one per row


def _row_tile(vp: int, device: torch.device, chunk: int | None, group: int) -> tuple[int, bool]:
    """(BLOCK, SINGLE): the tile width and whether the whole row fits one tile."""
    whole = max(group, _next_pow2(vp))
    if chunk is not None:
        block = max(group, _next_pow2(chunk))
    elif device.type == "cuda":
        block = whole if whole <= CUDA_SINGLE_MAX else CUDA_CHUNK
    else:
        block = min(whole, INTERPRETER_CHUNK)
    return min(block, whole), block >= vp


def shard_statistics(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    vocab_start: int,
    kk: int,
    find_topk: bool,
    mark_head: bool,
    save_topk_indices: bool,
    out: torch.Tensor,
    *,
    chunk: int | None = None,
    group: int | None = None,
    programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """functional.shard_statistics through _statistics_kernel (same arguments, plan fields
    spelled out, same results). chunk / group / programs override the launch settings (tests)."""
    n, vp = logits.shape
    dev = logits.device
    group = group or GROUP
    block_w = kk + 6
    block = torch.empty(n, block_w, dtype=torch.float32, device=dev)
    top_idx = torch.empty(n, kk, dtype=torch.long, device=dev) if save_topk_indices else None
    ties = torch.zeros(n, dtype=torch.bool, device=dev) if mark_head else None
    if n == 0:
        return block, top_idx, ties
    tile, single = _row_tile(vp, dev, chunk, group)
    ng_pad = _next_pow2(triton.cdiv(vp, group)) if find_topk else 1
    sel = _next_pow2(2 * kk) if find_topk and kk <= MAX_TILE_K else 0
    grid = _programs(n, dev, programs, vp * logits.element_size())
    scratch = torch.empty(grid, 2 * ng_pad, dtype=torch.int32, device=dev)
    _statistics_kernel[(grid,)](
        logits,
        out,
        target,
        valid,
        block,
        top_idx if top_idx is not None else block,
        ties if ties is not None else valid,
        scratch,
        n,
        vp,
        vocab_start,
        kk,
        float(vp),
        FIND_TOPK=find_topk,
        MARK=mark_head,
        SAVE_IDX=save_topk_indices,
        BLOCK=tile,
        GROUP=group,
        NG_PAD=ng_pad,
        SEL=sel,
        SINGLE=single,
        num_warps=CUDA_NUM_WARPS if dev.type == "cuda" else 4,
    )
    return block, top_idx, ties


# ---------------------------------------------------------------------------------------------
# Merge of the gathered blocks


@_device_fn
def _search_rows(keys, need, lo, hi):
    """A bisection on keys for every row of a [ROWS, A, B] tile at once: the largest key p in
    [lo, hi) ([ROWS] int64 each) with count(keys >= p) >= need, given count(keys >= lo) >= need;
    bounds snapped to the nearest keys."""
    while _max(hi - lo) > 1:
        mid = ((lo + hi) >> 1).to(tl.int32)
        ge = keys >= mid[:, None, None]
        count = _sum(_sum(ge.to(tl.int32), 2), 1)
        above = _min(_min(tl.where(ge, keys, _MAX_KEY), 2), 1)
        below = _max(_max(tl.where(ge, _MIN_KEY, keys), 2), 1)
        open_ = hi - lo > 1
        enough = count >= need
        lo_new = tl.where(enough, above.to(tl.int64), lo)
        hi_new = tl.where(count == need, lo_new + 1, tl.where(enough, hi, below.to(tl.int64) + 1))
        lo = tl.where(open_, lo_new, lo)
        hi = tl.where(open_, hi_new, hi)
    return lo.to(tl.int32)


@triton.jit(do_not_specialize=["n_rows", "tp", "kk", "k"])
def _merge_kernel(
    g_ptr,
    valid_ptr,
    out_ptr,
    n_rows,
    tp,
    kk,
    k,
    beta,
    lambda_head,
    lambda_tail,
    FIND_TOPK: tl.constexpr,
    ALL_IN: tl.constexpr,
    BETA_ZERO: tl.constexpr,
    ROWS: tl.constexpr,
    TP_PAD: tl.constexpr,
    KK_PAD: tl.constexpr,
):
    """gathered [tp, N, kk + 6] -> out [12, N] (MERGED_ROWS), ROWS rows per program, fp64."""
    width = kk + 6
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_on = rows < n_rows
    i = tl.arange(0, TP_PAD)
    on = row_on[:, None] & (i < tp)[None, :]  # [ROWS, TP_PAD]
    base = g_ptr + i.to(tl.int64)[None, :] * n_rows * width + rows.to(tl.int64)[:, None] * width
    m_i = tl.load(base, mask=on, other=float("-inf")).to(tl.float64)
    s_i = tl.load(base + kk, mask=on, other=0.0).to(tl.float64)
    t_i = tl.load(base + kk + 1, mask=on, other=0.0).to(tl.float64)
    zx = _sum(tl.load(base + kk + 2, mask=on, other=0.0).to(tl.float64), 1)
    owners = _sum(tl.load(base + kk + 3, mask=on, other=0.0), 1)
    count_i = tl.load(base + kk + 4, mask=on, other=0.0).to(tl.float64)
    vp_i = tl.load(base + kk + 5, mask=on, other=0.0)
    kth_i = tl.load(base + kk - 1, mask=on, other=float("inf"))
    any_nan = _sum((m_i != m_i).to(tl.int32), 1) > 0
    m = tl.where(any_nan, float("nan"), _max(m_i, 1))  # [ROWS]; NaN sticks (amax's rule)
    scale = tl.where(on, tl.exp(m_i - m[:, None]), 0.0)
    s = _sum(s_i * scale, 1)
    t = _sum(tl.where(on, scale * (t_i + (m_i - m[:, None]) * s_i), 0.0), 1)
    log_s = tl.log(s)
    logprob = zx - m - log_s
    prob = tl.exp(logprob)
    target_e = prob * s
    target_e_shifted = target_e * (zx - m)
    if FIND_TOPK:
        j = tl.arange(0, KK_PAD)
        cand = on[:, :, None] & (j < kk)[None, None, :]  # [ROWS, TP_PAD, KK_PAD]
        v = tl.load(base[:, :, None] + j[None, None, :], mask=cand, other=0.0)  # fp32
        if ALL_IN:
            tau = _min(kth_i, 1).to(tl.float64)  # every gathered value is in the set
        else:
            keys = tl.where(cand, _keys(v), _MIN_KEY)
            low = _min(_min(tl.where(cand, keys, _MAX_KEY), 2), 1)
            high = _max(_max(keys, 2), 1)
            low = tl.where(row_on, low, 0)
            high = tl.where(row_on, high, 0)
            tau_key = _search_rows(keys, k, low.to(tl.int64), high.to(tl.int64) + 1)
            tau = _key_value(tau_key).to(tl.float64)
        # exp in fp32 (the values are fp32), sums in fp64, as the CPU kernel does
        shifted = v.to(tl.float64) - m[:, None, None]
        in_set = cand & (v.to(tl.float64) >= tau[:, None, None])
        e = tl.where(in_set, tl.exp(v - m.to(tl.float32)[:, None, None]), 0.0).to(tl.float64)
        head = _sum(_sum(e, 2), 1)
        head_shifted = _sum(_sum(e * shifted, 2), 1)
        at_tau = on & (kth_i.to(tl.float64) == tau[:, None])
        extra = _sum(tl.where(at_tau, count_i - kk, 0.0), 1)
        e_tau = tl.exp(tau - m)
        head += extra * e_tau
        head_shifted += extra * e_tau * (tau - m)
        in_head = zx >= tau
    else:
        tau = tl.full([ROWS], float("inf"), tl.float64)
        head = tl.full([ROWS], 0.0, tl.float64)
        head_shifted = tl.full([ROWS], 0.0, tl.float64)
        in_head = rows < 0  # False
    head_neg = head - tl.where(in_head, target_e, 0.0)
    head_neg_shifted = head_shifted - tl.where(in_head, target_e_shifted, 0.0)
    tail_neg = s - head - tl.where(in_head, 0.0, target_e)
    tail_neg_shifted = t - head_shifted - tl.where(in_head, 0.0, target_e_shifted)
    p_head = head_neg / s
    p_tail = tail_neg / s
    plogp_head = head_neg_shifted / s - log_s * p_head
    plogp_tail = tail_neg_shifted / s - log_s * p_tail
    if BETA_ZERO:
        w_pos = tl.full([ROWS], 1.0, tl.float64)
    else:
        # 1 - p = -expm1(log p), clamped: a series near 0, where exp(x) - 1 would cancel.
        x = logprob
        expm1 = tl.where(x > -1e-5, x + x * x * 0.5 + x * x * x / 6.0, tl.exp(x) - 1.0)
        one_minus_p = tl.maximum(-expm1, _FP32_TINY)
        w_pos = tl.exp((1.0 - tl.exp(beta * tl.log(one_minus_p))) * logprob)
    weight_sum = w_pos + lambda_head * p_head + lambda_tail * p_tail
    loss = -(w_pos * logprob + lambda_head * plogp_head + lambda_tail * plogp_tail)
    ok = tl.load(valid_ptr + rows, mask=row_on, other=0) != 0
    finite = (m == m) & (tl.abs(m) < float("inf")) & (s == s) & (tl.abs(s) < float("inf"))
    finite = finite & (t == t) & (tl.abs(t) < float("inf"))
    vp0 = _sum(tl.where((i == 0)[None, :], vp_i, 0.0), 1)
    unequal = _sum((on & (vp_i != vp0[:, None])).to(tl.int32), 1) > 0
    o = out_ptr + rows
    tl.store(o, tl.where(ok, loss, 0.0).to(tl.float32), mask=row_on)
    tl.store(o + n_rows, (log_s - t / s).to(tl.float32), mask=row_on)
    tl.store(o + 2 * n_rows, tl.where(ok, prob, 0.0).to(tl.float32), mask=row_on)
    tl.store(o + 3 * n_rows, tl.where(ok, logprob, 0.0).to(tl.float32), mask=row_on)
    if FIND_TOPK:
        tl.store(o + 4 * n_rows, (head / s).to(tl.float32), mask=row_on)
    else:
        tl.store(o + 4 * n_rows, tl.full([ROWS], float("nan"), tl.float32), mask=row_on)
    tl.store(o + 5 * n_rows, (m + log_s).to(tl.float32), mask=row_on)
    tl.store(o + 6 * n_rows, tau.to(tl.float32), mask=row_on)
    tl.store(o + 7 * n_rows, tl.where(ok, w_pos, 0.0).to(tl.float32), mask=row_on)
    tl.store(o + 8 * n_rows, tl.where(ok, weight_sum, 0.0).to(tl.float32), mask=row_on)
    tl.store(o + 9 * n_rows, tl.where(ok & (owners != 1.0), 1.0, 0.0), mask=row_on)
    tl.store(o + 10 * n_rows, tl.where(finite, 0.0, 1.0), mask=row_on)
    tl.store(o + 11 * n_rows, tl.where(unequal, 1.0, 0.0), mask=row_on)


MERGE_TILE = 2048
"""Elements of the merge's candidate tile per program: rows * next_pow2(tp) * next_pow2(kk)."""
MERGE_NUM_WARPS = 8


def merge_statistics(
    gathered: torch.Tensor,
    valid: torch.Tensor,
    kk: int,
    k: int,
    find_topk: bool,
    beta: float,
    lambda_head: float,
    lambda_tail: float,
) -> torch.Tensor | None:
    """functional.merge_statistics' numbers as out [len(MERGED_ROWS), N] fp32 (the three flags
    0/1 per position), or None when tp * kk is too large for one tile."""
    tp, n = gathered.shape[0], gathered.shape[1]
    if tp * kk > MERGE_MAX_CANDIDATES:
        return None
    gathered = gathered.contiguous()
    out = torch.empty(len(MERGED_ROWS), n, dtype=torch.float32, device=gathered.device)
    if n == 0:
        return out
    tp_pad = _next_pow2(tp)
    kk_pad = _next_pow2(kk) if find_topk else 1
    rows = max(1, min(_next_pow2(n), 256, MERGE_TILE // (tp_pad * kk_pad)))
    _merge_kernel[(triton.cdiv(n, rows),)](
        gathered,
        valid,
        out,
        n,
        tp,
        kk,
        k,
        float(beta),
        float(lambda_head),
        float(lambda_tail),
        FIND_TOPK=find_topk,
        ALL_IN=find_topk and k == tp * kk,
        BETA_ZERO=beta == 0.0,
        ROWS=rows,
        TP_PAD=tp_pad,
        KK_PAD=kk_pad,
        num_warps=MERGE_NUM_WARPS,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit(do_not_specialize=["n_rows", "vocab_start", "kk"])
def _gradient_kernel(
    buf_ptr,
    grad_ptr,
    grad_loss_ptr,
    valid_ptr,
    target_ptr,
    block_ptr,
    shift_ptr,
    tau_ptr,
    logprob_ptr,
    w_pos_ptr,
    weight_sum_ptr,
    marked_ptr,
    idx_ptr,
    n_rows,
    vp,
    vocab_start,
    kk,
    lambda_head,
    lambda_tail,
    HAS_MARKS: tl.constexpr,
    FIX_TOP: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    KK_BLOCK: tl.constexpr,
):
    """buf [N, vp] (exp(z - m_r), sign-marked) -> grad [N, vp] (may be buf), one pass per row.

    Set members get the head coefficient, every other logit the tail one. In a marked row whose
    kk-th value is tau the marks are the members. Elsewhere (FIX_TOP) the members are among the
    gathered top-kk columns: after the pass, which gave them the tail coefficient (stale marks
    included), those columns are written again from exp(value - m_r) recomputed from the block."""
    R: tl.constexpr = BLOCK // GROUP
    width = kk + 6
    pid = tl.program_id(0)
    offs = tl.arange(0, R)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    for r in range(pid, n_rows, tl.num_programs(0)):
        brow = block_ptr + tl.cast(r, tl.int64) * width
        buf = buf_ptr + tl.cast(r, tl.int64) * vp
        grad = grad_ptr + tl.cast(r, tl.int64) * vp
        ok = tl.load(valid_ptr + r) != 0
        g = tl.where(ok, tl.load(grad_loss_ptr + r), 0.0)
        w_sum = tl.load(weight_sum_ptr + r)
        tau = tl.load(tau_ptr + r)
        local_max = tl.load(brow)
        row_scale = g * tl.exp(local_max - tl.load(shift_ptr + r))
        a = row_scale * (w_sum - lambda_tail)
        b = row_scale * (w_sum - lambda_head)
        if HAS_MARKS:
            # Marks in a row whose kk-th value is not tau are stale: tail logits like the rest.
            marks = (tl.load(marked_ptr + r) != 0) & (tl.load(brow + kk - 1) == tau)
        else:
            marks = ok & ~ok  # False
        b_marked = tl.where(marks, b, a)
        col = tl.load(target_ptr + r) - vocab_start
        owns = (tl.load(brow + kk + 3) > 0.0) & (col >= 0) & (col < vp)
        col = tl.where(owns, col, -1)  # -1: no column of this slice
        target_grad = g * (w_sum * tl.exp(tl.load(logprob_ptr + r)) - tl.load(w_pos_ptr + r))
        for start in range(0, vp, BLOCK):
            cols = start + offs
            inside = cols < vp
            e = tl.load(buf + cols, mask=inside, other=0.0)
            out = tl.where(e < 0.0, -b_marked * e, a * e)
            out = tl.where(cols == col, target_grad, out)
            if OUT_BF16:
                tl.store(grad + cols, _to_bf16(out), mask=inside)
            else:
                tl.store(grad + cols, out.to(grad_ptr.dtype.element_ty), mask=inside)
        if FIX_TOP:
            if ~marks:
                tl.debug_barrier()  # the pass's stores before these
                for t0 in range(0, kk, KK_BLOCK):
                    t = t0 + tl.arange(0, KK_BLOCK)
                    v = tl.load(brow + t, mask=t < kk, other=float("-inf"))
                    j = tl.load(idx_ptr + tl.cast(r, tl.int64) * kk + t, mask=t < kk, other=0)
                    member = (t < kk) & (v >= tau) & (j != col)
                    e = tl.exp(v - local_max)
                    if OUT_BF16:
                        tl.store(grad + j, _to_bf16(b * e), mask=member)
                    else:
                        tl.store(grad + j, (b * e).to(grad_ptr.dtype.element_ty), mask=member)


def shard_gradient(
    buf: torch.Tensor,
    grad_loss: torch.Tensor,
    block: torch.Tensor,
    local_top_idx: torch.Tensor | None,
    marked: torch.Tensor | None,
    target: torch.Tensor,
    valid: torch.Tensor,
    vocab_start: int,
    shift: torch.Tensor,
    tau: torch.Tensor,
    target_logprob: torch.Tensor,
    w_pos: torch.Tensor,
    weight_sum: torch.Tensor,
    lambda_head: float,
    lambda_tail: float,
    kk: int,
    fix_top: bool,
    out_dtype: torch.dtype,
    *,
    chunk: int | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """functional.shard_gradient_ through _gradient_kernel: the gradient [N, Vp] in out_dtype,
    over buf itself when out_dtype is fp32 (buf is consumed either way: its marks change)."""
    n, vp = buf.shape
    if out_dtype == torch.float32:
        grad = buf
    else:
        grad = torch.empty(n, vp, dtype=out_dtype, device=buf.device)
    if n == 0:
        return grad
    tile, _ = _row_tile(vp, buf.device, chunk, GROUP)
    if buf.device.type == "cuda" and chunk is None:
        tile = min(tile, CUDA_CHUNK)
    grid = _programs(n, buf.device, programs, vp * 4)
    _gradient_kernel[(grid,)](
        buf,
        grad,
        grad_loss.float().contiguous(),
        valid,
        target,
        block,
        shift,
        tau,
        target_logprob,
        w_pos,
        weight_sum,
        marked if marked is not None else valid,
        local_top_idx if local_top_idx is not None else target,
        n,
        vp,
        vocab_start,
        kk,
        float(lambda_head),
        float(lambda_tail),
        HAS_MARKS=marked is not None,
        FIX_TOP=fix_top,
        OUT_BF16=out_dtype == torch.bfloat16,
        BLOCK=tile,
        GROUP=min(GROUP, tile),
        KK_BLOCK=min(1024, _next_pow2(kk)),
        num_warps=CUDA_NUM_WARPS if buf.device.type == "cuda" else 4,
    )
    return grad
