"""Exact row-wise top-k selection for the loss's top-k search.

On CPU, torch.topk copies every row into (value, index) pairs and partially sorts them, about
10 ns per element and thread, while the loss needs only the k largest of tens of thousands of
logits per row. `top_k_rows` narrows the search first: each row is cut into groups of `GROUP`
logits, and the k groups with the largest maxima hold the row's k largest values (a value
outside them is at most the k-th largest group maximum, and those k groups already hold k values
at least that large). torch finds the group maxima and the k best groups (two vectorised passes
over far fewer values); a small numba kernel then picks the k largest of the k * GROUP
candidates, skipping every value below the k-th largest group maximum.

Without numba, on CUDA, for short rows and for dtypes the kernel does not take, torch.topk is
used. Every path returns the same values: the k largest of
each row, descending; among equal values the indices may differ.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

__all__ = ["GROUP", "top_k_rows"]

GROUP = 32
"""Logits per group of the narrowing step."""
_MIN_GROUPS_PER_K = 4  # narrow only rows with at least this many groups per wanted value


@functools.cache
def _kernel():
    """The compiled CPU kernel, or None when numba is not installed."""
    try:
        import numba
    except ImportError:
        return None
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's own pthread pool: its idle threads sleep, where a second OpenMP runtime's
        # threads would spin beside torch's and slow every torch op that follows on a busy CPU.
        numba.config.THREADING_LAYER = "workqueue"

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

    return top_k_of_groups


def _torch_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk (on CPU it beats a full sort even for k close to the row length: at
    [256, 256], k = 101, 1.8 ms against 3.1 ms on one thread)."""
    return torch.topk(x, k, dim=-1)


def top_k_rows(
    x: torch.Tensor, k: int, fully_sorted: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of x [n, V], descending, and their column indices.

    Args:
        x: [n, V] float tensor.
        k: 1 <= k <= V.
        fully_sorted: False orders only the ends: the largest value first and the two smallest
            of the k last, (k-1)-th then k-th largest; the others come in any order (cheaper).

    Returns:
        (values [n, k] in x's dtype, indices [n, k] int64); the values equal torch.topk's (as a
        set, and at the ordered positions).
    """
    n, width = x.shape
    if not 1 <= k <= width:
        raise ValueError(f"k={k} must be in [1, {width}] (the row length)")
    narrow = (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and n > 0
        and width % GROUP == 0
        and width // GROUP >= _MIN_GROUPS_PER_K * k
    )
    kernel = _kernel() if narrow else None
    if kernel is None:
        return _torch_top_k(x, k)
    x = x.contiguous()
    group_max = x.view(n, width // GROUP, GROUP).amax(-1)  # [n, V / GROUP], NaN if any is
    best, groups = torch.topk(group_max, k, dim=-1, sorted=False)  # [n, k] each
    bounds = best.amin(-1)  # [n] the k-th largest group maximum <= the k-th largest value
    values = torch.empty(n, k, dtype=x.dtype)
    indices = torch.empty(n, k, dtype=torch.int64)
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    try:
        kernel(
            x.numpy(),
            groups.numpy(),
            bounds.numpy(),
            GROUP,
            fully_sorted,
            values.numpy(),
            indices.numpy(),
        )
    finally:
        numba.set_num_threads(threads)
    return values, indices
