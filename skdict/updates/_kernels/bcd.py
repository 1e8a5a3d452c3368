"""Compiled CPU kernels of online dictionary learning (Mairal et al. 2010).

* :func:`bcd_sweep` -- the block-coordinate atom update, reference
  :func:`skdict.updates.online.bcd_update_torch`. The update of atom ``j`` depends
  on every atom updated before it, so the sweep is sequential over atoms; a torch
  loop pays a few operator launches per atom (K per minibatch). This loop does the
  same arithmetic in place, in float64 accumulators.
* :func:`sparse_stats_update` -- the decayed statistics ``A``, ``B``, visiting only
  the non-zeros of the codes, reference
  :func:`skdict.updates.online.statistics_update_torch`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["bcd_sweep", "sparse_stats_update"]


@njit(cache=True, nogil=True)
def _sweep(D, A, B, n_passes, eps):
    K, P = D.shape
    u = np.empty(P)
    for _ in range(n_passes):
        for j in range(K):
            ajj = A[j, j]
            if ajj <= eps:
                continue
            # u = d_j + (B_j - A_j D) / A_jj, skipping the zero co-activations
            for p in range(P):
                u[p] = B[j, p]
            for k in range(K):
                a = A[j, k]
                if a != 0.0:
                    for p in range(P):
                        u[p] -= a * D[k, p]
            nrm = 0.0
            for p in range(P):
                u[p] = D[j, p] + u[p] / ajj
                nrm += u[p] * u[p]
            nrm = np.sqrt(nrm)
            if nrm > 1e-12:
                for p in range(P):
                    D[j, p] = u[p] / nrm


def bcd_sweep(D, A, B, n_passes=1, eps=1e-10):
    """One or more in-place sweeps over the atoms (rows) of ``D`` (numpy arrays of
    one dtype; ``D`` must be writeable and C-contiguous)."""
    _sweep(D, A, B, int(n_passes), float(eps))
    return D


@njit(cache=True, nogil=True)
def _stats(A, B, codes, X, beta):
    n, K = codes.shape
    P = X.shape[1]
    for i in range(K):
        for j in range(K):
            A[i, j] *= beta
        for p in range(P):
            B[i, p] *= beta
    inv = 1.0 / n
    nz = np.empty(K, dtype=np.int64)
    for r in range(n):
        m = 0
        for k in range(K):
            if codes[r, k] != 0:
                nz[m] = k
                m += 1
        for a in range(m):
            ia = nz[a]
            va = codes[r, ia] * inv
            for b in range(m):
                A[ia, nz[b]] += va * codes[r, nz[b]]
            for p in range(P):
                B[ia, p] += va * X[r, p]


def sparse_stats_update(A, B, codes, X, beta):
    """In place: ``A <- beta A + codes^T codes / n``, ``B <- beta B + codes^T X / n``,
    visiting only the non-zeros of each row of ``codes``."""
    _stats(A, B, codes, X, float(beta))
    return A, B
