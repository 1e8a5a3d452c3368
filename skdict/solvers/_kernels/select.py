"""Compiled CPU selection kernels, each tested against a torch reference.

* :func:`kth_largest` -- the ``k``-th largest value of every row, by quickselect.
  ``torch.topk`` on CPU sorts (or heap-selects) each row and returns indices,
  which for a budget that is a sizeable share of the row (top 1638 of 6552
  candidates in block-preselected attention) costs several times the
  attention's own softmax; a threshold is all a masked softmax needs.
  Reference: ``torch.topk(x, k).values[..., -1]``.
* :func:`running_topk` -- per-row top-``m`` heaps merged with a score block in
  one pass (exact routing of large dictionaries). Reference: ``torch.topk``.
* :func:`active_gram_rows` -- the per-row Gram of a few atoms read in place.
  Reference: :func:`skdict.solvers.active_lstsq.active_gram`'s torch path.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange

__all__ = ["kth_largest", "running_topk", "active_gram_rows"]


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


def _kth_rows_impl(X, k, thr, ties):
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
        _parallel(_kth_rows)(X, int(k), thr, ties)
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


def _heap_rows_impl(S, col0, absval, hv, hi):
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
    _parallel(_heap_rows)(S, int(col0), bool(absval), values, indices)


def _active_gram_rows_impl(X, D, idx, G, c):
    n, s = idx.shape
    P = D.shape[1]
    for r in prange(n):
        # accumulate in D's dtype (float32 * 0 would promote to float64 in numba)
        zero = np.zeros(1, dtype=D.dtype)[0]
        for a in range(s):
            da = idx[r, a]
            acc = zero
            for p in range(P):
                acc += D[da, p] * X[r, p]
            c[r, a] = acc
            for b in range(a + 1):
                db = idx[r, b]
                acc = zero
                for p in range(P):
                    acc += D[da, p] * D[db, p]
                G[r, a, b] = acc
                G[r, b, a] = acc


def _active_gram_tiles_impl(X, D, idx, G, c):
    # the atoms copied to a contiguous buffer, then 2 x 2 tiles of the lower
    # triangle (2 multiply-adds per load; as fast as 4 x 4 tiles and usable for
    # every even s, e.g. the 2 s routed candidates of an odd s)
    n, s = idx.shape
    P = D.shape[1]
    for r in prange(n):
        buf = np.empty((s, P), dtype=D.dtype)
        for a in range(s):
            da = idx[r, a]
            for p in range(P):
                buf[a, p] = D[da, p]
        zero = np.zeros(1, dtype=D.dtype)[0]  # D's dtype: float32 stays float32
        for a in range(s):
            acc = zero
            for p in range(P):
                acc += buf[a, p] * X[r, p]
            c[r, a] = acc
        for a0 in range(0, s, 2):
            for b0 in range(0, a0 + 2, 2):
                t00 = t01 = t10 = t11 = zero
                for p in range(P):
                    x0, x1, y0, y1 = buf[a0, p], buf[a0 + 1, p], buf[b0, p], buf[b0 + 1, p]
                    t00 += x0 * y0
                    t01 += x0 * y1
                    t10 += x1 * y0
                    t11 += x1 * y1
                G[r, a0, b0] = t00
                G[r, b0, a0] = t00
                G[r, a0, b0 + 1] = t01
                G[r, b0 + 1, a0] = t01
                G[r, a0 + 1, b0] = t10
                G[r, b0, a0 + 1] = t10
                G[r, a0 + 1, b0 + 1] = t11
                G[r, b0 + 1, a0 + 1] = t11


def active_gram_rows(X, D, idx):
    """Per-row Gram ``D_S D_S^T`` (n, s, s) and ``D_S x`` (n, s) of the atoms
    ``idx`` (n, s), read in place from ``D`` (no ``(n, s, P)`` gather).
    Reference: :func:`skdict.solvers.active_lstsq.active_gram` (torch)."""
    n, s = idx.shape
    G = np.empty((n, s, s), dtype=D.dtype)
    c = np.empty((n, s), dtype=D.dtype)
    if n:
        kernel = _active_gram_tiles if s % 2 == 0 else _active_gram_rows
        _parallel(kernel)(X, D, idx, G, c)
    return G, c


def _twins(impl, fastmath):
    """A parallel and a serial compilation of one kernel body (prange is range
    in the serial one). Only the parallel one is cached on disk: both would share
    one cache entry (same function, same signature)."""
    return (njit(cache=True, parallel=True, nogil=True, fastmath=fastmath)(impl),
            njit(nogil=True, fastmath=fastmath)(impl))


_kth_rows = _twins(_kth_rows_impl, False)
_heap_rows = _twins(_heap_rows_impl, True)
_active_gram_rows = _twins(_active_gram_rows_impl, True)
_active_gram_tiles = _twins(_active_gram_tiles_impl, True)


def _parallel(twins):
    """The parallel kernel from the main thread; the serial one from other threads
    (dask workers, data loaders), where numba's workqueue layer may not be re-entered
    and the caller already runs in parallel."""
    return twins[0] if threading.current_thread() is threading.main_thread() else twins[1]
