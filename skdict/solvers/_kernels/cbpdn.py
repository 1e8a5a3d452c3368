"""Fused CPU kernels of the convolutional ADMM (:mod:`skdict.solvers.cbpdn`),
each tested against the torch reference path of that module.

The torch path takes one op per memory pass, and on a shared 2-core machine
each op's thread wake-up costs as much as a small pass; these kernels make
one pass where torch makes two to four:

* :func:`freq_step`: per block of frequencies of one image, the residual
  ``r = s - sum_m d_m z_m``, ``g = r / (rho + P)`` and ``z_m - conj(d_m) g``
  (the one-channel Sherman-Morrison x-update); the block of the spectrum
  (all filters) stays in cache between its two sweeps.
* :func:`real_step` / :func:`real_step_stats`: ``v += relax (x - y)``,
  ``y = S_t(v)``, ``a = v - 2 y`` in one pass; the ``_stats`` variant also
  sums what the scaled residuals need.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["freq_step", "real_step", "real_step_stats"]

_BLK = 256


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def freq_step(W, Dh, shat, inv):  # pragma: no cover - compiled
    """In place on ``W`` ``(n, M, F)`` (the spectrum of ``-(y - u)``):
    ``W_m <- W_m - conj(d_m) (s + sum_k d_k W_k) inv``, i.e. minus the spectrum
    of the x-update. ``Dh``: ``(M, F)``; ``shat``: ``(n, F)``; ``inv``:
    ``(n, F)`` real. A job is one block of frequencies for every image: the
    filters' block is read from memory once and stays in cache."""
    n, M, F = W.shape
    nb = (F + _BLK - 1) // _BLK
    for job in prange(nb):
        f0 = job * _BLK
        f1 = min(F, f0 + _BLK)
        acc = np.empty(f1 - f0, dtype=W.dtype)
        for i in range(n):
            for f in range(f0, f1):
                acc[f - f0] = shat[i, f]
            for m in range(M):
                for f in range(f0, f1):
                    acc[f - f0] += W[i, m, f] * Dh[m, f]
            for f in range(f0, f1):
                acc[f - f0] *= inv[i, f]
            for m in range(M):
                for f in range(f0, f1):
                    W[i, m, f] -= acc[f - f0] * Dh[m, f].conjugate()


@njit(cache=True, inline="always")
def _shrink(v, t, positive):  # pragma: no cover - compiled
    """Soft threshold of one value (one-sided when ``positive``)."""
    if positive:
        return max(v - t, 0.0)
    if v > t:
        return v - t
    if v < -t:
        return v + t
    return 0.0


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def real_step(a, Y, V, thr, ca, cy, positive):  # pragma: no cover - compiled
    """In place, rows ``(n, L)``: ``v += ca a + cy y``, ``y = S_thr(v)``,
    ``a = v - 2 y`` (``a`` holds a multiple of x on entry)."""
    n, L = a.shape
    nb = (L + 4 * _BLK - 1) // (4 * _BLK)
    for job in prange(n * nb):
        i = job // nb
        k0 = (job % nb) * 4 * _BLK
        k1 = min(L, k0 + 4 * _BLK)
        t = thr[i]
        for k in range(k0, k1):
            v = V[i, k] + ca * a[i, k] + cy * Y[i, k]
            yn = _shrink(v, t, positive)
            V[i, k] = v
            Y[i, k] = yn
            a[i, k] = v - 2.0 * yn


@njit(cache=True, parallel=True, nogil=True, fastmath=False)
def real_step_stats(a, Y, V, thr, ca, cy, positive, xs, stats):  # pragma: no cover
    """:func:`real_step`, also summing per row (float64, into ``stats``
    ``(n, 5)``) ``||x||^2, ||y||^2, ||x - y||^2`` (``x = xs * a``, ``y`` the
    entry value), ``||y_new - y||^2`` and ``||v - y_new||^2``."""
    n, L = a.shape
    nb = (L + 4 * _BLK - 1) // (4 * _BLK)
    part = np.zeros((n * nb, 5))
    for job in prange(n * nb):
        i = job // nb
        k0 = (job % nb) * 4 * _BLK
        k1 = min(L, k0 + 4 * _BLK)
        t = thr[i]
        s0 = s1 = s2 = s3 = s4 = 0.0
        for k in range(k0, k1):
            ak = a[i, k]
            y = Y[i, k]
            v = V[i, k] + ca * ak + cy * y
            yn = _shrink(v, t, positive)
            x = xs * float(ak)
            s0 += x * x
            s1 += float(y) * y
            s2 += (x - y) * (x - y)
            s3 += (float(yn) - y) * (float(yn) - y)
            s4 += (float(v) - yn) * (float(v) - yn)
            V[i, k] = v
            Y[i, k] = yn
            a[i, k] = v - 2.0 * yn
        part[job, 0] = s0
        part[job, 1] = s1
        part[job, 2] = s2
        part[job, 3] = s3
        part[job, 4] = s4
    for i in range(n):
        for c in range(5):
            acc = 0.0
            for b in range(nb):
                acc += part[i * nb + b, c]
            stats[i, c] = acc
