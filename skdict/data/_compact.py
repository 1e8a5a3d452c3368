"""Compiled helper: fixed-width ``(indices, values)`` rows to CSR pieces.

Imported lazily (it loads numba). Used by :class:`skdict.data.codes.CSRBuilder` for CPU
batches: one pass counts each row's non-zeros, one writes them, with no boolean
mask, no temporary copies and ``int32`` column indices (scipy's default).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["compact_fixed_width"]


@njit(cache=True, nogil=True)
def _count(values, counts):
    n, w = values.shape
    total = 0
    for r in range(n):
        c = 0
        for j in range(w):
            c += values[r, j] != 0
        counts[r] = c
        total += c
    return total


@njit(cache=True, nogil=True)
def _fill(indices, values, out_idx, out_val):
    n, w = values.shape
    p = 0
    for r in range(n):
        for j in range(w):  # branch-free: a zero is written and then overwritten
            v = values[r, j]
            out_idx[p] = indices[r, j]
            out_val[p] = v
            p += v != 0


@njit(cache=True, nogil=True)
def _count_leading(values, counts):
    n, w = values.shape
    total = 0
    for r in range(n):
        c = 0
        while c < w and values[r, c] != 0:
            c += 1
        counts[r] = c
        total += c
    return total


@njit(cache=True, nogil=True)
def _fill_leading(indices, values, counts, out_idx, out_val):
    p = 0
    for r in range(values.shape[0]):
        c = counts[r]
        for j in range(c):
            out_idx[p + j] = indices[r, j]
            out_val[p + j] = values[r, j]
        p += c


def compact_fixed_width(indices, values, n_columns, dtype=None, leading=False):
    """CSR pieces of fixed-width rows whose column indices are already increasing
    within each row (padding may follow); zero values are dropped.

    Parameters
    ----------
    indices : int ndarray (n, w)
    values : float ndarray (n, w)
    n_columns : int
        Number of columns of the matrix (int32 column indices when it allows).
    dtype : numpy dtype, optional
        dtype of the returned data (default: ``values``' dtype).
    leading : bool
        The producer guarantees that each row's non-zeros come first and only
        padding zeros follow them (the exact lasso kernel's rows): each row is
        read up to its first zero, not across the whole width.

    Returns
    -------
    data : ndarray (nnz,), cols : int32 or int64 ndarray (nnz,), counts : int64 ndarray (n,)
    """
    if indices.shape != values.shape or indices.ndim != 2:
        raise ValueError(f"indices and values must be 2-D arrays of one shape, got "
                         f"{indices.shape} and {values.shape}.")
    n = values.shape[0]
    counts = np.zeros(n, dtype=np.int64)
    nnz = int((_count_leading if leading else _count)(values, counts))
    # one row of slack for the branch-free fill's trailing writes
    pad = 0 if leading else values.shape[1]
    out_idx = np.empty(nnz + pad, dtype=np.int32 if n_columns < 2**31 - 1 else np.int64)
    out_val = np.empty(nnz + pad, dtype=values.dtype if dtype is None else dtype)
    if nnz and leading:
        _fill_leading(indices, values, counts, out_idx, out_val)
    elif nnz:
        _fill(indices, values, out_idx, out_val)
    return out_val[:nnz], out_idx[:nnz], counts
