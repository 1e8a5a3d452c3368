"""Compiled CPU kernel of the sparse co-occurrence product of
:class:`skdict.updates.SparseStats`: ``(A - diag(A)) @ D`` on the touched atoms.

``A``'s off-diagonal part is stored as its coalesced upper triangle (row-major
COO); the dictionary update needs only the rows of the atoms it refreshes. One
serial counting pass groups the symmetric entries of those rows by output row
(a CSR of the wanted rows only), then the rows are computed in parallel, each
by one thread reading its neighbours' atoms sequentially (no scattered writes,
no sort).
Reference: :meth:`skdict.updates.SparseStats.offdiag_matmul` (torch path).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...solvers._kernels.select import _parallel, _twins

__all__ = ["offdiag_rows_matmul", "refresh_rows"]


@njit(cache=True, nogil=True)
def _group(rows, cols, vals, slot, m):
    """The symmetric entries of the wanted rows, grouped by output row (CSR)."""
    ptr = np.zeros(m + 1, dtype=np.int64)
    for e in range(vals.shape[0]):
        if slot[rows[e]] >= 0:
            ptr[slot[rows[e]] + 1] += 1
        if slot[cols[e]] >= 0:
            ptr[slot[cols[e]] + 1] += 1
    for i in range(m):
        ptr[i + 1] += ptr[i]
    fill = ptr[:-1].copy()
    nbr = np.empty(ptr[m], dtype=np.int64)
    w = np.empty(ptr[m], dtype=vals.dtype)
    for e in range(vals.shape[0]):
        sr = slot[rows[e]]
        if sr >= 0:
            nbr[fill[sr]] = cols[e]
            w[fill[sr]] = vals[e]
            fill[sr] += 1
        sc = slot[cols[e]]
        if sc >= 0:
            nbr[fill[sc]] = rows[e]
            w[fill[sc]] = vals[e]
            fill[sc] += 1
    return ptr, nbr, w


def _rows_product_impl(ptr, nbr, w, D, out):
    P = D.shape[1]
    for i in prange(out.shape[0]):
        e, end = ptr[i], ptr[i + 1]
        # four neighbour rows per pass: four independent memory streams (the
        # scattered atom reads bound this loop) and a quarter of the stores
        while e + 4 <= end:
            j0, j1, j2, j3 = nbr[e], nbr[e + 1], nbr[e + 2], nbr[e + 3]
            v0, v1, v2, v3 = w[e], w[e + 1], w[e + 2], w[e + 3]
            for p in range(P):
                out[i, p] += v0 * D[j0, p] + v1 * D[j1, p] + v2 * D[j2, p] + v3 * D[j3, p]
            e += 4
        while e < end:
            j = nbr[e]
            v = w[e]
            for p in range(P):
                out[i, p] += v * D[j, p]
            e += 1


def offdiag_rows_matmul(rows, cols, vals, D, atoms, n_threads):
    """``out[i] = sum_{j != k} A_kj D[j]`` for ``k = atoms[i]``.

    Parameters
    ----------
    rows, cols : int64 ndarrays (nnz,)
        Upper-triangular coordinates (``rows < cols``).
    vals : ndarray (nnz,) of D's dtype
    D : ndarray (K, P), C-contiguous
    atoms : int64 ndarray (m,)
        Distinct atoms whose rows are wanted.
    n_threads : int
        Unused (numba's thread count applies); kept for the caller's signature.

    Returns
    -------
    out : ndarray (m, P)
    """
    if vals.shape[0] and atoms.shape[0]:
        return _grouped_product(rows, cols, vals, D, atoms)[2]
    return np.zeros((atoms.shape[0], D.shape[1]), dtype=D.dtype)


def _grouped_product(rows, cols, vals, D, atoms):
    """``(ptr, w, out)``: the entries of the wanted rows grouped by row (CSR
    pointers and values in D's dtype) and their product with ``D``."""
    m = atoms.shape[0]
    slot = np.full(D.shape[0], -1, dtype=np.int64)
    slot[atoms] = np.arange(m)
    ptr, nbr, w = _group(rows, cols, vals.astype(D.dtype, copy=False), slot, m)
    out = np.zeros((m, D.shape[1]), dtype=D.dtype)
    _parallel(_rows_product)(ptr, nbr, w, D, out)
    return ptr, w, out


def _refresh_impl(ptr, w, D, atoms, B, diag, gershgorin, step, eps, AD):
    P = D.shape[1]
    for i in prange(atoms.shape[0]):
        k = atoms[i]
        d = diag[k]
        if gershgorin:
            M = d
            for e in range(ptr[i], ptr[i + 1]):
                M += abs(w[e])
        # the new atom overwrites its row of AD, then is normalised into D
        for p in range(P):
            if gershgorin:
                v = D[k, p] + (B[k, p] - AD[i, p] - d * D[k, p]) / M
            else:
                v = (B[k, p] - AD[i, p]) / d
            AD[i, p] = (1 - step) * D[k, p] + step * v if step != 1 else v
        nrm = AD[i, 0] * 0
        for p in range(P):
            nrm += AD[i, p] * AD[i, p]
        nrm = np.sqrt(nrm)
        if not nrm < eps:  # else the atom keeps its old value (NaN is written)
            for p in range(P):
                D[k, p] = AD[i, p] / nrm


def refresh_rows(rows, cols, vals, D, atoms, B, diag, *, gershgorin, step, eps):
    """In place: the atoms ``atoms`` of ``D`` take one Jacobi (or Gershgorin-
    majorised) block-coordinate step from the statistics ``B``, ``diag`` and
    the off-diagonal entries, then unit norm (an atom whose new norm is below
    ``eps`` keeps its old value). Every new atom is computed from the old
    ``D`` before any is written. Reference:
    :func:`skdict.updates.sparse_stats.refresh_atoms` (torch path)."""
    if atoms.shape[0] == 0:
        return
    ptr, w, AD = _grouped_product(rows, cols, vals, D, atoms)
    _parallel(_refresh)(ptr, w, D, atoms, B, diag, bool(gershgorin), D.dtype.type(step),
                        D.dtype.type(eps), AD)


_rows_product = _twins(_rows_product_impl, True)
# no "nnan": a NaN atom must reach the learner's finiteness check
_refresh = _twins(_refresh_impl, {"reassoc", "contract", "arcp"})
