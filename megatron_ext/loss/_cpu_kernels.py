"""numba kernels of the loss's CPU path (imported on first use; see select.py for the loader).

- `top_k_fp32`: the k largest logits of each row (select.top_k_rows).
- `row_statistics_fp32`: the forward of one vocabulary slice (functional.shard_statistics) in one
  read of each row from memory: the row's top values (or only its maximum), then, while the row
  is still in cache, exp(z - m) written out with its sums.
- `merge_fp32`: functional.merge_statistics over the gathered blocks, one row at a time.
- `gradient_fp32`: functional.shard_gradient_, in place, one pass per row.
Each is a `Kernel`: a parallel and a serial build of the same code (select.run_kernel picks).

Comparisons are made on an integer key of each fp32 logit's bits, `b ^ ((b >> 31) & 0x7FFFFFFF)`,
whose signed order is the float order (-0.0 just below +0.0; a NaN of either sign lies beyond
+-inf, which is how non-finite rows are found). Integer max/min loops vectorise where float ones
would need fast-math flags that break NaN handling. The arithmetic is spelled in int32: numba
widens integer expressions to int64, which AVX2 cannot take eight at a time. The group width
must reach the kernels as a run-time value: compiled with a constant 32, LLVM unrolls the group
loops instead of vectorising them and the kernels run 2-3x slower.
"""

from __future__ import annotations

import math
from types import FunctionType

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = [
    "MERGED_ROWS",
    "Kernel",
    "gradient_fp32",
    "merge_fp32",
    "row_statistics_fp32",
    "top_k_fp32",
]

_MASK = np.int32(0x7FFFFFFF)
_MIN_KEY = np.int32(-(2**31))
_INF_KEY = np.int32(0x7F800000)  # the key of +inf; ~_INF_KEY is the key of -inf

# exp for z - m <= 0 in fp32 (Cephes' expf: 2^n times a degree-7 polynomial, within 2 ulp).
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.33654)  # ln of the smallest normal fp32; below it exp gives 0
_P0, _P1, _P2 = (
    np.float32(1.9875691500e-4),
    np.float32(1.3981999507e-3),
    np.float32(8.3334519073e-3),
)
_P3, _P4, _P5 = (
    np.float32(4.1665795894e-2),
    np.float32(1.6666665459e-1),
    np.float32(5.0000001201e-1),
)


class Kernel:
    """One kernel compiled twice: `parallel` splits its rows over numba's threads, `serial` runs
    them on the calling thread (a parallel launch costs ~65 us even on one thread, more than a
    small call's work). Both take the number of row chunks as their last argument."""

    def __init__(self, fn):
        twin = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__)
        twin.__qualname__ = fn.__qualname__ + "_serial"  # its own entry in numba's disk cache
        self.parallel = numba.njit(parallel=True, nogil=True, cache=True)(fn)
        self.serial = numba.njit(nogil=True, cache=True)(twin)
        self.__doc__ = fn.__doc__


@intrinsic
def _bits_to_float(typingctx, bits):
    """The fp32 whose bits are the int32 `bits`."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _float_to_bits(typingctx, value):
    """The int32 bits of the fp32 `value`."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@numba.njit(inline="always")
def _key(b):
    return np.int32(b ^ np.int32(np.int32(b >> np.int32(31)) & _MASK))


@numba.njit(inline="always")
def _exp_nonpositive(d):
    """exp(d) for a fp32 d <= 0; 0 below _EXP_MIN (and for NaN)."""
    x = d if d > _EXP_MIN else _EXP_MIN
    fx = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - fx * _LN2_HI - fx * _LN2_LO
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    y = p * (r * r) + r + np.float32(1.0)
    scale = _bits_to_float(np.int32(np.int32(np.int32(fx) + np.int32(127)) << np.int32(23)))
    return y * scale if d >= _EXP_MIN else np.float32(0.0)


@numba.njit(nogil=True, cache=True)
def _exp_nonpositive_strict(d):
    """_exp_nonpositive compiled on its own, for callers with fast-math flags: inlined by numba,
    their reassoc would merge the two halves of ln 2 (16 ulp instead of 2)."""
    return _exp_nonpositive(d)


@numba.njit(inline="always")
def _key_value(key):
    """The fp32 whose key is `key` (an int32 or int64 within int32 range)."""
    k = np.int32(key)
    return _bits_to_float(np.int32(k ^ np.int32(np.int32(k >> np.int32(31)) & _MASK)))


@numba.njit(inline="always")
def _count_at_least(keys, n, p):
    """How many of keys[:n] are >= p, the smallest of them and the largest key below p (one
    vectorised pass)."""
    count = 0
    above = _MASK
    below = _MIN_KEY
    for i in range(n):
        v = keys[i]
        ge = v >= p
        count += ge
        above = min(above, v) if ge else above
        below = below if ge else max(below, v)
    return count, above, below


@numba.njit(inline="always")
def _kth_largest(keys, n, k, floor, highest):
    """(tau, c): tau = the k-th largest of keys[:n], c = how many keys are >= tau (more than k
    when tau has twins), given that every key is >= floor and the largest is `highest`.

    A search on the count of keys >= p, each count one vectorised pass: p is interpolated between
    the bounds in value space (logits are smooth there, their keys are not), and after two moves
    of the same bound p bisects the key interval instead, so that skewed rows take at most about
    32 more passes. Each pass also returns the nearest keys on either side of p, so the bounds
    snap to keys and a run of equal keys ends the search at once."""
    lo, c_lo = np.int64(floor), n  # c(lo) >= k
    hi, c_hi = np.int64(highest) + 1, 0  # c(hi) < k
    side = 0
    streak = 0
    while hi - lo > 1:
        if streak >= 2:
            p = (lo + hi) >> 1
            streak = 0
        else:
            v_lo = np.float64(_key_value(lo))
            v_hi = np.float64(_key_value(hi - 1))
            v = v_lo + (c_lo - k + 0.5) / (c_lo - c_hi) * (v_hi - v_lo)
            if abs(v) < 3.0e38:  # False for NaN and infinities
                p = np.int64(_key(_float_to_bits(np.float32(v))))
            else:
                p = (lo + hi) >> 1
            p = min(max(p, lo + 1), hi - 1)
        count, above, below = _count_at_least(keys, n, np.int32(p))
        if count == k:
            return above, count
        if count > k:
            lo, c_lo = np.int64(above), count
            streak = streak + 1 if side == 1 else 1
            side = 1
        else:
            hi, c_hi = np.int64(below) + 1, count
            streak = streak + 1 if side == -1 else 1
            side = -1
    return np.int32(lo), c_lo


@numba.njit(inline="always")
def _keep_top(keys, idx, n, k, floor, highest, spare):
    """Reorder keys[:n] / idx[:n] so that their first k are the k largest (every key >= floor,
    the largest `highest`)."""
    tau, count = _kth_largest(keys, n, k, floor, highest)
    kept = 0
    for i in range(n):  # the keys >= tau to the front, in order
        v = keys[i]
        keys[kept] = v  # kept <= i: nothing unread is overwritten
        idx[kept] = idx[i]
        kept += v >= tau
    if count > k:  # twins of tau: every key > tau, then as many equal to tau as fit
        above = 0
        equal = 0
        for i in range(count):
            v = keys[i]
            if v > tau:
                keys[above] = v
                idx[above] = idx[i]
                above += 1
            else:
                spare[equal] = idx[i]
                equal += 1
        for t in range(above, k):
            keys[t] = tau
            idx[t] = np.int32(spare[t - above])


@numba.njit(inline="always")
def _prefix_floor(gkey, k, hist):
    """The largest 16-bit prefix p with at least k of gkey having (key >> 16) >= p: two passes
    of a 256-bin histogram, on the top byte and then on the next one within the chosen bin."""
    hist[:] = 0
    for g in range(gkey.shape[0]):
        hist[(gkey[g] >> 24) + 128] += 1
    need = k
    b1 = 255
    while hist[b1] < need:
        need -= hist[b1]
        b1 -= 1
    top = b1 - 128
    hist[:] = 0
    for g in range(gkey.shape[0]):
        key = gkey[g]
        if (key >> 24) == top:
            hist[(key >> 16) & 255] += 1
    b2 = 255
    while hist[b2] < need:
        need -= hist[b2]
        b2 -= 1
    return top * 256 + b2


@numba.njit(inline="always")
def _order_ends(keys, idx, k):
    """The largest of keys[:k] to position 0, the smallest to k - 1, the next smallest to k - 2
    (one pass finds the three, then three swaps, each following the moves of the one before)."""
    high, low, second = 0, 0, -1
    for t in range(1, k):
        v = keys[t]
        if v > keys[high]:
            high = t
        if v < keys[low]:
            second, low = low, t
        elif second < 0 or v < keys[second]:
            second = t
    _swap(keys, idx, low, k - 1)
    if high == k - 1:
        high = low
    if second == k - 1:
        second = low
    if k >= 2:
        _swap(keys, idx, second, k - 2)
        if high == k - 2:
            high = second
    if k >= 3:
        _swap(keys, idx, high, 0)


@numba.njit(inline="always")
def _swap(keys, idx, i, j):
    keys[i], keys[j] = keys[j], keys[i]
    idx[i], idx[j] = idx[j], idx[i]


@numba.njit(inline="always")
def _key_bounds(row, grouped, group, gkey):
    """The smallest and the largest key of row; with `grouped`, also gkey from _group_keys.
    Without groups one plain min/max pass: 3-4x faster than the per-group maxima."""
    if grouped:
        lowest = _group_keys(row, group, gkey)
        return lowest, gkey.max()
    lowest = _MASK
    highest = _MIN_KEY
    for j in range(row.shape[0]):
        key = _key(row[j])
        lowest = min(lowest, key)
        highest = max(highest, key)
    return lowest, highest


@numba.njit(inline="always")
def _group_keys(row, group, gkey):
    """gkey[g] = the largest key of the g-th group of `group` logits of row (int32 bits);
    returns the smallest key of the row."""
    width = row.shape[0]
    full = width // group
    lowest = _MASK
    for g in range(full):
        s = g * group
        best = _MIN_KEY
        low = _MASK
        for j in range(group):
            key = _key(row[s + j])
            best = key if key > best else best
            low = key if key < low else low
        gkey[g] = best
        lowest = min(lowest, low)
    if full < gkey.shape[0]:
        best = _MIN_KEY
        for j in range(full * group, width):
            key = _key(row[j])
            best = max(best, key)
            lowest = min(lowest, key)
        gkey[full] = best
    return lowest


@numba.njit(inline="always")
def _top_candidates(row, k, group, gkey, hist, ckey, cidx, spare, lowest, highest):
    """ckey[:k] / cidx[:k] = the k largest keys of row and their columns, given the row's
    smallest and largest keys and, with at least k groups, gkey (from _key_bounds). The k groups
    with the largest maxima each hold a value at least the k-th largest group maximum, so a floor
    at or below it leaves every one of the k largest values among a few candidates, from which
    _keep_top takes them. Short rows (fewer groups than k) take every logit as a candidate."""
    width = row.shape[0]
    full = width // group
    n_groups = gkey.shape[0]
    if k > n_groups:
        for j in range(width):
            ckey[j] = _key(row[j])
            cidx[j] = np.int32(j)
        count = width
        floor = lowest
    else:
        floor = np.int32(_prefix_floor(gkey, k, hist) << 16)
        count = 0
        for g in range(n_groups):
            if gkey[g] >= floor:
                s = g * group
                if g < full:
                    for j in range(group):
                        key = _key(row[s + j])
                        ckey[count] = key  # written always, kept when it counts
                        cidx[count] = np.int32(s + j)
                        count += key >= floor
                else:
                    for j in range(s, width):
                        key = _key(row[j])
                        ckey[count] = key
                        cidx[count] = np.int32(j)
                        count += key >= floor
    if count > k:
        _keep_top(ckey, cidx, count, k, floor, highest, spare)


@Kernel
def top_k_fp32(x, bits, k, group, fully_sorted, out_vals, out_idx, chunks):
    """out_vals[r] / out_idx[r] = the k largest values of x[r] ([n, V] fp32; bits is x viewed as
    int32) and their columns. Rows with a NaN get NaN values (torch.topk ranks NaN first)."""
    n_rows, width = bits.shape
    n_groups = (width + group - 1) // group
    per = (n_rows + chunks - 1) // chunks
    for c in numba.prange(chunks):
        gkey = np.empty(n_groups, dtype=np.int32)
        hist = np.empty(256, dtype=np.int64)
        ckey = np.empty(width + 1, dtype=np.int32)
        cidx = np.empty(width + 1, dtype=np.int32)
        spare = np.empty(width + 1, dtype=np.int32)
        for r in range(c * per, min(n_rows, (c + 1) * per)):
            lowest, highest = _key_bounds(bits[r], k <= n_groups, group, gkey)
            if highest > _INF_KEY or lowest < ~_INF_KEY:
                for t in range(k):
                    out_vals[r, t] = np.nan
                    out_idx[r, t] = t
                continue
            _top_candidates(bits[r], k, group, gkey, hist, ckey, cidx, spare, lowest, highest)
            if fully_sorted:
                order = np.argsort(ckey[:k])[::-1]
                for t in range(k):
                    out_idx[r, t] = cidx[order[t]]
                    out_vals[r, t] = x[r, cidx[order[t]]]
            else:
                _order_ends(ckey, cidx, k)
                for t in range(k):
                    out_idx[r, t] = cidx[t]
                    out_vals[r, t] = x[r, cidx[t]]


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True)
def _exp_row(row, m, out_row):
    """out_row = exp(row - m); returns (sum e, sum e (z - m)) in fp64. reassoc lets the two sums
    run in vector lanes (NaN still propagates: no nnan flag)."""
    s = 0.0
    t = 0.0
    for j in range(row.shape[0]):
        d = row[j] - m
        e = _exp_nonpositive_strict(d)
        out_row[j] = e
        s += np.float64(e)
        t += np.float64(d * e)
    return s, t


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True)
def _exp_row_inplace(row, m):
    """_exp_row with the row as its own output. A separate function: given two views of one
    row, LLVM's run-time overlap check would send the loop down its scalar version."""
    s = 0.0
    t = 0.0
    for j in range(row.shape[0]):
        d = row[j] - m
        e = _exp_nonpositive_strict(d)
        row[j] = e
        s += np.float64(e)
        t += np.float64(d * e)
    return s, t


@numba.njit(nogil=True, cache=True)
def _exp_row_ties(row, m, kth, negate, out_row):
    """_exp_row for a row whose kth value has ungathered twins: also counts the logits >= kth
    and, with `negate`, sets the sign bit of their exp (the forward's marks)."""
    s = 0.0
    t = 0.0
    count = 0
    for j in range(row.shape[0]):
        z = row[j]
        d = z - m
        e = _exp_nonpositive(d)
        s += np.float64(e)
        t += np.float64(d * e)
        member = z >= kth
        count += member
        out_row[j] = -e if member and negate else e
    return s, t, count


@Kernel
def row_statistics_fp32(
    x,
    bits,
    target,
    valid,
    vocab_start,
    kk,
    find_topk,
    look_beyond,
    mark,
    group,
    out,
    in_place,
    block,
    top_idx,
    ties,
    chunks,
):
    """The forward of functional.shard_statistics for fp32 logits x [n, Vp] (bits: x as int32).

    Per row, in the block's layout [kk values, then functional.STAT_COLUMNS]: block[r, :kk] =
    the kk largest logits (the largest first, the kk-th at kk - 1) when find_topk, else
    block[r, 0] = the maximum m; out[r] = exp(x[r] - m) (in_place: out is x), with the fp64
    sums of out and of out (x - m); the target's logit and ownership (target [n] global ids,
    valid [n] bool, this slice starting at vocab_start), the count of logits >= the kk-th
    (kk unless it has twins) and the slice width. top_idx[r] = the columns of the kk values
    (when top_idx has rows). With look_beyond, the (kk + 1)-th value is found too: where it
    equals the kk-th, ties[r] is set, the count is made, and with `mark` their exp is negated.
    A row holding a NaN gets NaN statistics and a NaN row in out; with -inf logits the second
    sum is NaN (0 * -inf), with +inf m is +inf and the first sum 0: every non-finite row shows.
    """
    n_rows, width = bits.shape
    n_groups = (width + group - 1) // group
    per = (n_rows + chunks - 1) // chunks
    want = kk + 1 if look_beyond else kk
    save_idx = top_idx.shape[0] > 0
    c_sum, c_shifted, c_target, c_owns, c_count, c_width = (
        kk,
        kk + 1,
        kk + 2,
        kk + 3,
        kk + 4,
        kk + 5,
    )
    for c in numba.prange(chunks):
        gkey = np.empty(n_groups, dtype=np.int32)
        hist = np.empty(256, dtype=np.int64)
        ckey = np.empty(width + 1, dtype=np.int32)
        cidx = np.empty(width + 1, dtype=np.int32)
        spare = np.empty(width + 1, dtype=np.int32)
        for r in range(c * per, min(n_rows, (c + 1) * per)):
            row = x[r]
            col = target[r] - vocab_start
            owns = valid[r] and 0 <= col < width
            block[r, c_target] = row[col] if owns else np.float32(0.0)  # before out overwrites it
            block[r, c_owns] = 1.0 if owns else 0.0
            block[r, c_count] = kk
            block[r, c_width] = width
            lowest, highest = _key_bounds(bits[r], find_topk and want <= n_groups, group, gkey)
            if highest > _INF_KEY or lowest < ~_INF_KEY:  # a NaN
                out[r, :] = np.nan
                block[r, :kk] = np.nan
                block[r, c_sum] = np.nan
                block[r, c_shifted] = np.nan
                if save_idx:
                    for t in range(kk):
                        top_idx[r, t] = t
                continue
            tie = False
            kth = np.float32(0.0)
            if find_topk:
                _top_candidates(
                    bits[r], want, group, gkey, hist, ckey, cidx, spare, lowest, highest
                )
                _order_ends(ckey, cidx, want)
                for t in range(kk):
                    block[r, t] = row[cidx[t]]
                    if save_idx:
                        top_idx[r, t] = cidx[t]
                kth = row[cidx[kk - 1]]
                tie = look_beyond and row[cidx[kk]] == kth
                m = row[cidx[0]]
            else:
                m = _key_value(highest)
                block[r, 0] = m
            if tie:
                total, shifted, count = _exp_row_ties(row, m, kth, mark, out[r])
                block[r, c_count] = count
                ties[r] = True
            elif in_place:
                total, shifted = _exp_row_inplace(row, m)
            else:
                total, shifted = _exp_row(row, m, out[r])
            block[r, c_sum] = total
            block[r, c_shifted] = shifted


# Rows of merge_fp32's output block.
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
_FP32_TINY = 1.1754943508222875e-38


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True)
def _head_sums(values, m, tau):
    """fp64 sums of exp(v - m) and of exp(v - m) (v - m) over the values >= tau (m: the
    position's maximum, fp64). reassoc lets the masked sums run in vector lanes."""
    m32 = np.float32(m)
    head = 0.0
    shifted = 0.0
    for j in range(values.shape[0]):
        v = values[j]
        e = np.float64(_exp_nonpositive_strict(v - m32))
        keep = v >= tau
        head += e if keep else 0.0
        shifted += e * (np.float64(v) - m) if keep else 0.0
    return head, shifted


@Kernel
def merge_fp32(gathered, valid, kk, k, find_topk, beta, lambda_head, lambda_tail, out, chunks):
    """functional.merge_statistics for fp32 blocks gathered [tp, N, kk + 6], one row at a time
    (fp64 scalars): out [len(MERGED_ROWS), N] fp32, in MERGED_ROWS order (the three flags 0/1;
    unequal_slices: the slices' widths differ)."""
    tp, n_rows = gathered.shape[0], gathered.shape[1]
    n_cand = tp * kk
    per = (n_rows + chunks - 1) // chunks
    for c in numba.prange(chunks):
        ckey = np.empty(n_cand, dtype=np.int32)
        for r in range(c * per, min(n_rows, (c + 1) * per)):
            m = -np.inf
            for i in range(tp):
                m_i = np.float64(gathered[i, r, 0])
                m = m_i if m_i > m or m_i != m_i else m  # NaN sticks (amax's rule)
                if m != m:
                    break
            s = 0.0
            t = 0.0
            zx = 0.0
            owners = 0.0
            for i in range(tp):
                m_i = np.float64(gathered[i, r, 0])
                s_i = np.float64(gathered[i, r, kk])
                scale = math.exp(m_i - m)
                s += s_i * scale
                t += scale * (np.float64(gathered[i, r, kk + 1]) + (m_i - m) * s_i)
                zx += gathered[i, r, kk + 2]
                owners += gathered[i, r, kk + 3]
            log_s = math.log(s)
            logprob = zx - m - log_s
            prob = math.exp(logprob)
            target_e = prob * s
            target_e_shifted = target_e * (zx - m)
            tau = np.inf
            head = 0.0
            head_shifted = 0.0
            in_head = False
            if find_topk:
                if k == n_cand:  # every gathered value is in the set: tau is the smallest
                    tau = np.inf
                    for i in range(tp):  # a slice's smallest gathered value is its kk-th
                        tau = min(tau, np.float64(gathered[i, r, kk - 1]))
                else:
                    lowest = _MASK
                    highest = _MIN_KEY
                    for i in range(tp):
                        for j in range(kk):
                            key = _key(_float_to_bits(gathered[i, r, j]))
                            ckey[i * kk + j] = key
                            lowest = min(lowest, key)
                            highest = max(highest, key)
                    tau = _key_value(_kth_largest(ckey, n_cand, k, lowest, highest)[0])
                for i in range(tp):
                    h, h_shifted = _head_sums(gathered[i, r, :kk], m, tau)
                    head += h
                    head_shifted += h_shifted
                extra = 0.0
                for i in range(tp):
                    if gathered[i, r, kk - 1] == tau:
                        extra += gathered[i, r, kk + 4] - kk
                e_tau = math.exp(tau - m)
                head += extra * e_tau
                head_shifted += extra * e_tau * (tau - m)
                in_head = zx >= tau
            head_neg = head - target_e * in_head
            head_neg_shifted = head_shifted - target_e_shifted * in_head
            tail_neg = s - head - target_e * (not in_head)
            tail_neg_shifted = t - head_shifted - target_e_shifted * (not in_head)
            p_head, p_tail = head_neg / s, tail_neg / s
            plogp_head = head_neg_shifted / s - log_s * p_head
            plogp_tail = tail_neg_shifted / s - log_s * p_tail
            if beta == 0.0:
                w_pos = 1.0
            else:
                one_minus_p = max(-math.expm1(logprob), _FP32_TINY)
                w_pos = math.exp((1.0 - one_minus_p**beta) * logprob)
            weight_sum = w_pos + lambda_head * p_head + lambda_tail * p_tail
            loss = -(w_pos * logprob + lambda_head * plogp_head + lambda_tail * plogp_tail)
            ok = valid[r]
            out[0, r] = loss if ok else 0.0
            out[1, r] = log_s - t / s
            out[2, r] = prob if ok else 0.0
            out[3, r] = logprob if ok else 0.0
            out[4, r] = head / s if find_topk else np.nan
            out[5, r] = m + log_s
            out[6, r] = tau
            out[7, r] = w_pos if ok else 0.0
            out[8, r] = weight_sum if ok else 0.0
            out[9, r] = ok and owners != 1.0
            out[10, r] = not (np.isfinite(m) and np.isfinite(s) and np.isfinite(t))
            unequal = False
            for i in range(1, tp):
                unequal |= gathered[i, r, kk + 5] != gathered[0, r, kk + 5]
            out[11, r] = unequal


@Kernel
def gradient_fp32(
    buf,
    grad_loss,
    valid,
    target,
    vocab_start,
    block,
    shift,
    tau,
    target_logprob,
    w_pos,
    weight_sum,
    marked,
    top_idx,
    lambda_head,
    lambda_tail,
    kk,
    chunks,
):
    """functional.shard_gradient_ for a fp32 buffer [N, Vp] (exp(z - m_r), sign-marked rows),
    in place, one row at a time. grad_loss [N] fp32 (ignored where valid [N] is False); target
    [N] global ids, this slice starting at vocab_start; block [N, kk + 6] the forward's
    statistics of this slice (its maximum, top values and target ownership); shift, tau,
    target_logprob, w_pos, weight_sum [N] from the merge; marked [N] bool: rows the forward
    sign-marked (no rows: none); top_idx [N, kk] (no rows without rank-split rewards).

    Set members get the head coefficient, every other logit the tail one: in a marked row whose
    kk-th value is tau the forward's marks are the members; elsewhere the members are among the
    gathered top-kk columns, which get marked here, so one pass over the row applies both."""
    n_rows, width = buf.shape
    fix_top = top_idx.shape[0] > 0
    any_marked = marked.shape[0] > 0
    per = (n_rows + chunks - 1) // chunks
    for c in numba.prange(chunks):
        for r in range(c * per, min(n_rows, (c + 1) * per)):
            g = np.float64(grad_loss[r]) if valid[r] else 0.0
            w_sum = np.float64(weight_sum[r])
            row_scale = g * math.exp(np.float64(block[r, 0]) - np.float64(shift[r]))
            a = np.float32(row_scale * (w_sum - lambda_tail))
            b = np.float32(row_scale * (w_sum - lambda_head))
            row = buf[r]
            t_r = tau[r]
            has_marks = any_marked and marked[r]
            if has_marks and block[r, kk - 1] != t_r:
                # the slice's kk-th value is not tau: its marks are stale, clear them
                _unmark_row(row)
                has_marks = False
            if fix_top and not has_marks:
                for t in range(kk):
                    if block[r, t] >= t_r:
                        j = top_idx[r, t]
                        row[j] = -abs(row[j])
                        has_marks = True
            if has_marks:
                _scale_marked_row(row, a, b)
            else:
                _scale_row(row, a)
            col = target[r] - vocab_start
            if block[r, kk + 3] > 0.0 and 0 <= col < width:  # this slice owns the target
                row[col] = np.float32(
                    g * (w_sum * math.exp(np.float64(target_logprob[r])) - np.float64(w_pos[r]))
                )


@numba.njit(nogil=True, cache=True)
def _scale_row(row, a):
    for j in range(row.shape[0]):
        row[j] *= a


@numba.njit(nogil=True, cache=True)
def _scale_marked_row(row, a, b):
    """row = a e for e >= 0, b |e| for the marked (negative) e."""
    for j in range(row.shape[0]):
        e = row[j]
        row[j] = a * e if e >= 0.0 else -b * e


@numba.njit(nogil=True, cache=True)
def _unmark_row(row):
    for j in range(row.shape[0]):
        row[j] = abs(row[j])
