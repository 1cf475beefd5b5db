"""The numba kernel of megatron_ext.loss.select (imported on first use: numba is optional).

Every comparison is made on an integer key of each fp32 logit's bits, `b ^ ((b >> 31) & 0x7FFFFFFF)`,
whose signed order is the float order (-0.0 just below +0.0; a NaN of either sign lies beyond
+-inf, which is how NaN rows are found). Integer max/min loops vectorise where float ones would
need fast-math flags that break NaN handling. The arithmetic is spelled in int32 throughout:
numba widens integer expressions to int64, which AVX2 cannot take eight at a time.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["top_k_fp32"]

_MASK = np.int32(0x7FFFFFFF)
_MIN_KEY = np.int32(-(2**31))
_INF_KEY = np.int32(0x7F800000)  # the key of +inf; a NaN's key is above it, or below ~_INF_KEY


@numba.njit(inline="always")
def _key(b):
    return np.int32(b ^ np.int32(np.int32(b >> np.int32(31)) & _MASK))


@numba.njit(inline="always")
def _partition_top(keys, idx, n, k):
    """Reorder keys[:n] / idx[:n] so that their first k are the k largest (quickselect)."""
    lo, hi = 0, n - 1
    target = k - 1
    while lo < hi:
        pivot = keys[(lo + hi) >> 1]
        i, j = lo, hi
        while i <= j:
            while keys[i] > pivot:
                i += 1
            while keys[j] < pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                idx[i], idx[j] = idx[j], idx[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break


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
    """The largest of keys[:k] to position 0, the smallest to k - 1, the next smallest to k - 2."""
    for end in range(min(2, k)):
        low = 0
        for t in range(1, k - end):
            if keys[t] < keys[low]:
                low = t
        last = k - 1 - end
        keys[low], keys[last] = keys[last], keys[low]
        idx[low], idx[last] = idx[last], idx[low]
    high = 0
    for t in range(1, max(1, k - 2)):
        if keys[t] > keys[high]:
            high = t
    keys[0], keys[high] = keys[high], keys[0]
    idx[0], idx[high] = idx[high], idx[0]


@numba.njit(parallel=True, nogil=True, cache=True)
def top_k_fp32(x, bits, k, group, chunks, fully_sorted, out_vals, out_idx):
    """out_vals[r] / out_idx[r] = the k largest values of x[r] [n, V] fp32 and their columns.

    bits is x viewed as int32. Per row: one pass computes every group's largest key (and finds
    NaN); a 16-bit prefix floor of the k-th largest group key bounds the k-th largest value from
    below (the k groups with the largest maxima each hold a value at least that large); the
    groups reaching the floor, still in cache, give the candidates, from which a quickselect
    takes k. Rows with a NaN get NaN values (torch.topk ranks NaN first).

    `group` must reach the kernel as a run-time value: compiled with the constant 32, LLVM
    unrolls the group loops instead of vectorising them and the kernel runs 2-3x slower.
    """
    n_rows, width = bits.shape
    full = width // group
    n_groups = (width + group - 1) // group
    per = (n_rows + chunks - 1) // chunks
    for c in numba.prange(chunks):
        gkey = np.empty(n_groups, dtype=np.int32)
        hist = np.empty(256, dtype=np.int64)
        ckey = np.empty(width + 1, dtype=np.int32)
        cidx = np.empty(width + 1, dtype=np.int32)
        for r in range(c * per, min(n_rows, (c + 1) * per)):
            row = bits[r]
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
            if full < n_groups:
                best = _MIN_KEY
                for j in range(full * group, width):
                    key = _key(row[j])
                    best = max(best, key)
                    lowest = min(lowest, key)
                gkey[full] = best
            if gkey.max() > _INF_KEY or lowest < ~_INF_KEY:
                for t in range(k):
                    out_vals[r, t] = np.nan
                    out_idx[r, t] = t
                continue
            if k <= n_groups:
                threshold = np.int32(_prefix_floor(gkey, k, hist) << 16)
            else:
                threshold = lowest  # every logit is a candidate
            count = 0
            for g in range(n_groups):
                if gkey[g] >= threshold:
                    s = g * group
                    if g < full:
                        for j in range(group):
                            key = _key(row[s + j])
                            ckey[count] = key  # written always, kept when it counts
                            cidx[count] = np.int32(s + j)
                            count += key >= threshold
                    else:
                        for j in range(s, width):
                            key = _key(row[j])
                            ckey[count] = key
                            cidx[count] = np.int32(j)
                            count += key >= threshold
            if count > k:
                _partition_top(ckey, cidx, count, k)
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
