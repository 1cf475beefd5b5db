"""The numba kernel of megatron_ext.loss.select (imported on first use: numba is optional)."""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["top_k_of_groups"]


@numba.njit(inline="always")
def _partition_top(vals, idx, n, k):
    """Reorder vals[:n] / idx[:n] so that their first k are the k largest (quickselect)."""
    lo, hi = 0, n - 1
    target = k - 1
    while lo < hi:
        pivot = vals[(lo + hi) >> 1]
        i, j = lo, hi
        while i <= j:
            while vals[i] > pivot:
                i += 1
            while vals[j] < pivot:
                j -= 1
            if i <= j:
                vals[i], vals[j] = vals[j], vals[i]
                idx[i], idx[j] = idx[j], idx[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break


@numba.njit(parallel=True, nogil=True, cache=True)
def top_k_of_groups(x, groups, bounds, group, fully_sorted, out_vals, out_idx):
    """out_*[r] = the k largest values of x[r] and their columns, given the k groups of
    `group` columns holding them and bounds[r] <= the k-th largest value."""
    n_rows, k = groups.shape
    for r in numba.prange(n_rows):
        bound = bounds[r]
        if bound != bound:  # noqa: PLR0124 - NaN test (a group maximum is NaN if any is)
            for t in range(k):  # torch.topk puts NaN first; callers only need to see one
                out_vals[r, t] = np.nan
                out_idx[r, t] = t
            continue
        row = x[r]
        vals = np.empty(k * group, dtype=x.dtype)
        idx = np.empty(k * group, dtype=np.int64)
        count = 0
        for g in range(k):
            start = groups[r, g] * group
            for j in range(start, start + group):
                v = row[j]
                if v >= bound:
                    vals[count] = v
                    idx[count] = j
                    count += 1
        m = min(k, count)
        if count > m:
            _partition_top(vals, idx, count, m)
        if fully_sorted:
            order = np.argsort(-vals[:m], kind="mergesort")
            for t in range(m):
                out_vals[r, t] = vals[order[t]]
                out_idx[r, t] = idx[order[t]]
        else:  # only the ends in order: the largest first, the two smallest last
            for end in range(min(2, m)):  # the smallest to m-1, then the next to m-2
                low = 0
                for t in range(1, m - end):
                    if vals[t] < vals[low]:
                        low = t
                last = m - 1 - end
                vals[low], vals[last] = vals[last], vals[low]
                idx[low], idx[last] = idx[last], idx[low]
            high = 0
            for t in range(1, max(1, m - 2)):
                if vals[t] > vals[high]:
                    high = t
            vals[0], vals[high] = vals[high], vals[0]
            idx[0], idx[high] = idx[high], idx[0]
            for t in range(m):
                out_vals[r, t] = vals[t]
                out_idx[r, t] = idx[t]
