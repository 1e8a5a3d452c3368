"""Compiled CPU kernel of the sparse co-occurrence product of
:class:`skdict.updates.SparseStats`: ``(A - diag(A)) @ D`` on the touched atoms.

``A``'s off-diagonal part is stored as its coalesced upper triangle (row-major
COO). A general sparse product visits every stored entry for every output row
and (scipy) converts to CSR first; the dictionary update needs only the rows of
the atoms it refreshes. Each entry ``(r, c, v)`` adds ``v d_c`` to row ``r`` and
``v d_r`` to row ``c`` when those atoms are refreshed; threads split the
feature columns, so no two threads write the same element.
Reference: :meth:`skdict.updates.SparseStats.offdiag_matmul` (torch path).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["offdiag_rows_matmul"]


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def _kernel(rows, cols, vals, D, slot, out, n_parts):
    P = D.shape[1]
    step = (P + n_parts - 1) // n_parts
    for part in prange(n_parts):
        p0 = part * step
        p1 = min(P, p0 + step)
        for e in range(vals.shape[0]):
            r = rows[e]
            c = cols[e]
            v = vals[e]
            sr = slot[r]
            if sr >= 0:
                for p in range(p0, p1):
                    out[sr, p] += v * D[c, p]
            sc = slot[c]
            if sc >= 0:
                for p in range(p0, p1):
                    out[sc, p] += v * D[r, p]


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
        Column slices processed in parallel.

    Returns
    -------
    out : ndarray (m, P)
    """
    out = np.zeros((atoms.shape[0], D.shape[1]), dtype=D.dtype)
    if vals.shape[0] and atoms.shape[0]:
        slot = np.full(D.shape[0], -1, dtype=np.int64)
        slot[atoms] = np.arange(atoms.shape[0])
        # slices of at least 16 features (a cache line of float32 values or two)
        n_parts = max(1, min(int(n_threads), D.shape[1] // 16))
        _kernel(rows, cols, vals.astype(D.dtype, copy=False), D, slot, out, n_parts)
    return out
