"""Compiled CPU kernel: the ``k``-th largest value of every row, by quickselect.

``torch.topk`` on CPU sorts (or heap-selects) each row and returns indices, which
for a budget that is a sizeable share of the row (top 1638 of 3276 candidates in
block-preselected attention) costs several times the attention's own softmax. A
threshold is all a masked softmax needs: an in-place Hoare quickselect on a
per-thread copy of the row finds it in linear expected time, parallel over rows.

Reference: ``torch.topk(x, k).values[..., -1]`` (tests/test_nn_attention.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["kth_largest"]


@njit(cache=True, nogil=True, fastmath=False)
def _select_desc(buf, k):
    """Rearrange ``buf`` so that ``buf[k]`` is its (k+1)-th largest; returns it."""
    lo, hi = 0, buf.shape[0] - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        # median of three as the pivot
        a, b, c = buf[lo], buf[mid], buf[hi]
        if (a >= b) == (b >= c):
            pivot = b
        elif (b >= a) == (a >= c):
            pivot = a
        else:
            pivot = c
        i, j = lo, hi
        while i <= j:
            while buf[i] > pivot:
                i += 1
            while buf[j] < pivot:
                j -= 1
            if i <= j:
                t = buf[i]
                buf[i] = buf[j]
                buf[j] = t
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return buf[k]


@njit(cache=True, parallel=True, nogil=True)
def _kth_rows(X, k, thr, ties):
    n, m = X.shape
    for r in prange(n):
        buf = X[r].copy()
        t = _select_desc(buf, k - 1)
        thr[r] = t
        if t > -np.inf:
            cnt = 0
            for j in range(m):
                if X[r, j] >= t:
                    cnt += 1
            ties[r] = cnt > k


def kth_largest(X, k):
    """``k``-th largest value of each row of ``X`` and whether it is tied.

    Parameters
    ----------
    X : ndarray (n, m), float32 or float64, C-contiguous
        ``-inf`` entries (masked) sort last.
    k : int, ``1 <= k <= m``

    Returns
    -------
    thr : ndarray (n,)
        The threshold: ``X[r] >= thr[r]`` holds for the ``k`` largest entries.
    ties : bool ndarray (n,)
        True where more than ``k`` entries reach the threshold (ties at it),
        so that ``>= thr`` would keep more than ``k``.
    """
    X = np.ascontiguousarray(X)
    n, m = X.shape
    if not 1 <= int(k) <= m:
        raise ValueError(f"k={k} must be between 1 and the row length {m}.")
    thr = np.empty(n, dtype=X.dtype)
    ties = np.zeros(n, dtype=np.bool_)
    if n:
        _kth_rows(X, int(k), thr, ties)
    return thr, ties


@njit(cache=True, nogil=True, fastmath=True)
def _sift_down(hv, hi, pos, m):
    """Restore the min-heap ``hv[:m]`` (with payload ``hi``) below ``pos``."""
    v, i = hv[pos], hi[pos]
    while True:
        c = 2 * pos + 1
        if c >= m:
            break
        if c + 1 < m and hv[c + 1] < hv[c]:
            c += 1
        if hv[c] >= v:
            break
        hv[pos] = hv[c]
        hi[pos] = hi[c]
        pos = c
    hv[pos] = v
    hi[pos] = i


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def _heap_rows(S, col0, absval, hv, hi):
    n, t = S.shape
    m = hv.shape[1]
    for r in prange(n):
        row_v = hv[r]
        row_i = hi[r]
        floor = row_v[0]
        for j in range(t):
            x = S[r, j]
            if absval:
                x = abs(x)
            if x > floor:
                row_v[0] = x
                row_i[0] = col0 + j
                _sift_down(row_v, row_i, 0, m)
                floor = row_v[0]


def running_topk(S, col0, values, indices, *, absval):
    """Merge the columns of a score block into each row's running top-``m``, in place.

    ``values`` / ``indices`` (n, m) are per-row min-heaps (start them at ``-inf``
    and any index); column ``j`` of ``S`` is the global column ``col0 + j``; with
    ``absval`` the key is ``|S|``. One pass over ``S``: an entry below the row's
    current ``m``-th best costs one comparison. Reference: ``torch.topk`` of the
    concatenated columns (tests/test_large.py).
    """
    _heap_rows(S, int(col0), bool(absval), values, indices)
