"""Compiled CPU kernels of the sparse statistics of :class:`skdict.updates.SparseStats`.

* :func:`scatter_rows` -- ``B[idx[i, j]] += vals[i, j] * X[i]``. Each thread owns the
  atoms ``k % n_threads == t`` and scans every pair, so the scattered writes need
  no lock and no sort. Reference: ``index_put_(accumulate=True)``.
* :func:`batch_pairs` -- the strictly upper co-occurrence entries of one batch of
  fixed-width codes, coalesced and sorted by ``(row, col)``. When ``K <= 65536`` a
  pair is packed with its float32 product into one uint64 (key in the high bits)
  and the packed words are sorted by an LSD radix sort on the key bits only
  (``ceil(log2 K^2)`` bits, three passes of <= 11 bits): ~5x faster than
  ``np.sort``'s comparison sort of the whole words, which took most of the step's
  statistics at s = 32. Reference: the torch / numpy path of
  :func:`skdict.updates.sparse_stats.batch_cooccurrence`.
* :func:`merge_sorted` -- two coalesced, ``(row, col)``-sorted entry lists summed
  by one linear merge (the accumulated list and a batch's), then pruned to the
  ``max_nnz`` largest ``|value|`` keeping the order (ties by position).
  Reference: concatenation, ``np.unique`` and ``np.partition``
  (:meth:`skdict.updates.SparseStats._add_offdiag_torch`).
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from ...solvers._kernels.select import _parallel, _twins

__all__ = ["scatter_rows", "batch_pairs", "merge_sorted"]


def _scatter_impl(B, X, idx, vals, n_parts):
    n, s = idx.shape
    P = X.shape[1]
    for t in prange(n_parts):
        for i in range(n):
            for j in range(s):
                k = idx[i, j]
                if k % n_parts != t:
                    continue
                v = vals[i, j]
                if v == 0:
                    continue
                for p in range(P):
                    B[k, p] += v * X[i, p]


_scatter = _twins(_scatter_impl, True)


def scatter_rows(B, X, idx, vals):
    """In place ``B[idx[i, j]] += vals[i, j] * X[i]`` (B, X, vals of one dtype)."""
    if idx.size:
        _parallel(_scatter)(B, X, idx, vals, max(1, get_num_threads()))
    return B


@njit(cache=True, nogil=True)
def _pairs_keys(idx, vals, K, keys, pv):
    n, s = idx.shape
    e = 0
    for i in range(n):
        for a in range(s):
            ia = idx[i, a]
            for b in range(a + 1, s):
                ib = idx[i, b]
                v = vals[i, a] * vals[i, b]
                if v == 0 or ia == ib:
                    keys[e] = -1
                else:
                    lo, hi = (ia, ib) if ia < ib else (ib, ia)
                    keys[e] = lo * K + hi
                pv[e] = v
                e += 1


@njit(cache=True, nogil=True)
def _coalesce_sorted(keys, pv, order, K, rows, cols, out):
    m = -1
    last = -1
    acc = 0.0
    for e in range(order.shape[0]):
        key = keys[order[e]]
        if key < 0:
            continue
        v = np.float64(pv[order[e]])
        if key != last:
            if m >= 0:
                out[m] = acc
            m += 1
            rows[m] = key // K
            cols[m] = key % K
            last = key
            acc = v
        else:
            acc += v
    if m >= 0:
        out[m] = acc
    return m + 1


@njit(cache=True, nogil=True)
def _pack(keys, bits, out):
    """The valid pairs (``keys >= 0``) packed as ``key << 32 | bits``; returns
    their count."""
    m = 0
    for e in range(keys.shape[0]):
        if keys[e] >= 0:
            out[m] = (np.uint64(keys[e]) << np.uint64(32)) | np.uint64(bits[e])
            m += 1
    return m


@njit(cache=True, nogil=True)
def _radix_sort_hi(a, tmp, key_bits):
    """Stable LSD radix sort of ``a`` by bits ``32 .. 32 + key_bits`` (the packed
    key); returns whichever of ``a`` / ``tmp`` holds the result."""
    n = a.shape[0]
    if key_bits <= 0 or n < 2:
        return a
    passes = (key_bits + 10) // 11
    width = (key_bits + passes - 1) // passes
    nb = 1 << width
    mask = np.uint64(nb - 1)
    src, dst = a, tmp
    for p in range(passes):
        shift = np.uint64(32 + p * width)
        count = np.zeros(nb + 1, dtype=np.int64)
        for e in range(n):
            count[np.int64((src[e] >> shift) & mask) + 1] += 1
        if count[np.int64((src[0] >> shift) & mask) + 1] == n:
            continue  # one digit value in this pass: already in order
        for d in range(nb):
            count[d + 1] += count[d]
        for e in range(n):
            x = src[e]
            d = np.int64((x >> shift) & mask)
            dst[count[d]] = x
            count[d] += 1
        src, dst = dst, src
    return src


def batch_pairs(idx, vals, K):
    """Coalesced strictly upper co-occurrence ``(rows, cols, vals)`` of one batch
    of codes ``idx``, ``vals`` (n, s), sorted by ``(row, col)``; sums in float64,
    returned in ``vals``' dtype."""
    n, s = idx.shape
    n_pairs = n * (s * (s - 1) // 2)
    if n_pairs == 0:
        return (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64),
                np.empty(0, dtype=vals.dtype))
    keys = np.empty(n_pairs, dtype=np.int64)
    pv = np.empty(n_pairs, dtype=vals.dtype)
    _pairs_keys(idx, vals, np.int64(K), keys, pv)
    if vals.dtype == np.float32 and K * K <= 2**32:
        packed = np.empty(n_pairs, dtype=np.uint64)
        packed = packed[:_pack(keys, pv.view(np.uint32), packed)]
        packed = _radix_sort_hi(packed, np.empty_like(packed),
                                int(K * K - 1).bit_length() if K > 1 else 0)
        keys = (packed >> np.uint64(32)).astype(np.int64)
        pv = (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
        order = np.arange(keys.shape[0])
    else:
        order = np.argsort(keys, kind="stable")
    rows = np.empty(order.shape[0], dtype=np.int64)
    cols = np.empty(order.shape[0], dtype=np.int64)
    out = np.empty(order.shape[0], dtype=np.float64)
    m = _coalesce_sorted(keys, pv, order, np.int64(K), rows, cols, out)
    if 2 * m < rows.shape[0]:  # mostly repeated pairs: do not keep the buffers alive
        return rows[:m].copy(), cols[:m].copy(), out[:m].astype(vals.dtype)
    return rows[:m], cols[:m], out[:m].astype(vals.dtype)


@njit(cache=True, nogil=True)
def _merge(r1, c1, v1, r2, c2, v2, K, rows, cols, out):
    i = j = m = 0
    n1, n2 = v1.shape[0], v2.shape[0]
    while i < n1 or j < n2:
        k1 = r1[i] * K + c1[i] if i < n1 else np.int64(-1)
        k2 = r2[j] * K + c2[j] if j < n2 else np.int64(-1)
        if j >= n2 or (i < n1 and k1 < k2):
            rows[m], cols[m], out[m] = r1[i], c1[i], v1[i]
            i += 1
        elif i >= n1 or k2 < k1:
            rows[m], cols[m], out[m] = r2[j], c2[j], v2[j]
            j += 1
        else:
            rows[m], cols[m] = r1[i], c1[i]
            out[m] = np.float64(v1[i]) + np.float64(v2[j])
            i += 1
            j += 1
        m += 1
    return m


@njit(cache=True, nogil=True)
def _keep_largest(rows, cols, vals, thr, n_keep):
    """Compact in place the entries with ``|v| > thr``, then the first ties."""
    above = 0
    for e in range(vals.shape[0]):
        if abs(vals[e]) > thr:
            above += 1
    ties = n_keep - above
    m = 0
    for e in range(vals.shape[0]):
        a = abs(vals[e])
        if a > thr:
            keep = True
        elif a == thr and ties > 0:
            keep = True
            ties -= 1
        else:
            keep = False
        if keep:
            rows[m], cols[m], vals[m] = rows[e], cols[e], vals[e]
            m += 1
    return m


def merge_sorted(r1, c1, v1, r2, c2, v2, K, max_nnz):
    """``(r1, c1, v1) + (r2, c2, v2)`` (both coalesced and sorted by ``(row, col)``),
    coalesced, sorted, pruned to the ``max_nnz`` largest ``|value|``."""
    n = v1.shape[0] + v2.shape[0]
    rows = np.empty(n, dtype=np.int64)
    cols = np.empty(n, dtype=np.int64)
    out = np.empty(n, dtype=v1.dtype)
    m = _merge(r1, c1, v1, r2, c2, v2.astype(v1.dtype, copy=False), np.int64(K),
               rows, cols, out)
    rows, cols, out = rows[:m], cols[:m], out[:m]
    if m > max_nnz:
        a = np.abs(out)  # numpy's introselect beats a scalar quickselect here
        thr = np.partition(a, m - max_nnz)[m - max_nnz] if max_nnz > 0 else np.inf
        m = _keep_largest(rows, cols, out, out.dtype.type(thr), np.int64(max_nnz))
        rows, cols, out = rows[:m], cols[:m], out[:m]
    return rows.copy(), cols.copy(), out.copy()
