"""Compiled CPU kernel of the batched ``s x s`` normal equations of
:func:`skdict.solvers.active_lstsq.active_lstsq`.

* :func:`ridge_cholesky_solve` -- per row, ``(G + ridge * mean(diag G) * I) a = c``
  by an in-place Cholesky factorisation and two triangular solves, rows in
  parallel. torch's batched ``cholesky_ex`` + ``cholesky_solve`` on CPU dispatch
  one LAPACK call per ``64 x 64`` system (2048 of them a minibatch) and cost
  several times the arithmetic. A row whose factorisation meets a non-positive
  pivot is flagged for the caller's guarded torch path.
  Reference: :func:`skdict.solvers.active_lstsq._spd_solve` (torch).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .select import _parallel, _twins

__all__ = ["ridge_cholesky_solve"]


def _chol_rows_impl(G, c, ridge, tiny, out, bad):
    n, s, _ = G.shape
    for r in prange(n):
        L = np.empty((s, s), dtype=G.dtype)
        scale = G[r, 0, 0] * 0
        for i in range(s):
            scale += G[r, i, i]
        scale = max(scale / s, tiny)
        ok = True
        for j in range(s):
            d = G[r, j, j] + ridge * scale
            for k in range(j):
                d -= L[j, k] * L[j, k]
            if not d > 0:
                ok = False
                break
            d = np.sqrt(d)
            L[j, j] = d
            for i in range(j + 1, s):
                v = G[r, i, j]
                for k in range(j):
                    v -= L[i, k] * L[j, k]
                L[i, j] = v / d
        if not ok:
            bad[r] = True
            continue
        y = np.empty(s, dtype=G.dtype)
        for i in range(s):
            v = c[r, i]
            for k in range(i):
                v -= L[i, k] * y[k]
            y[i] = v / L[i, i]
        for i in range(s - 1, -1, -1):
            v = y[i]
            for k in range(i + 1, s):
                v -= L[k, i] * y[k]
            y[i] = v / L[i, i]
        for i in range(s):
            out[r, i] = y[i]


# no "nnan": a NaN pivot must fail the ``d > 0`` test and reach the guarded path
_chol_rows = _twins(_chol_rows_impl, {"reassoc", "contract", "arcp"})


def ridge_cholesky_solve(G, c, ridge):
    """Solve ``(G_r + ridge * mean(diag G_r) * I) a_r = c_r`` for every row.

    Parameters
    ----------
    G : ndarray (n, s, s), symmetric; c : ndarray (n, s), same dtype
    ridge : float

    Returns
    -------
    a : ndarray (n, s)
    bad : bool ndarray (n,)
        Rows whose factorisation failed (``a`` undefined there).
    """
    n, s = c.shape
    out = np.empty((n, s), dtype=G.dtype)
    bad = np.zeros(n, dtype=np.bool_)
    if n and s:
        tiny = np.finfo(G.dtype).tiny
        _parallel(_chol_rows)(G, c, G.dtype.type(ridge), G.dtype.type(tiny), out, bad)
    return out, bad
