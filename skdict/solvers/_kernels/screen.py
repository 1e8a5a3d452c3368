"""Compiled CPU kernels of certified bfloat16 screening for exact routing.

Routing keeps each row's ``m`` atoms of largest ``|<x, d>|``. On CPUs with
native bfloat16 dot products a bfloat16 GEMM runs about twice as fast as the
float32 one, so :func:`skdict.solvers.routing.route_topk` scores every atom in
bfloat16, keeps a shortlist of a few more than ``m`` atoms per row, rescores the
shortlist in float32 and certifies it: with ``eps`` a bound on the bfloat16
score error, an atom outside the shortlist scores at most ``floor + eps``
(``floor``: the shortlist's smallest bfloat16 score), so when the ``m``-th best
float32 score of the shortlist exceeds that, the shortlist holds the exact
top-``m``. Rows that fail the certificate are routed again in float32.

* :func:`screen_block` -- per-row buffers of the best bfloat16 scores of a
  score block, compared as 16-bit integer keys (an order-preserving map of the
  bfloat16 bits: for magnitudes, the bits with the sign cleared), cut back to
  the best ``m`` by a radix select whenever full (:func:`finish` at the end).
* :func:`rescore_certify` -- float32 scores of the shortlist, atom by atom,
  its top ``s`` and the certificate.

Reference: :func:`skdict.solvers.routing.route_dense` (tests/test_large.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .select import _parallel, _twins

__all__ = ["screen_block", "finish", "key_values", "rescore_certify"]


@njit(cache=True, nogil=True)
def _compact(bk, bi, c, m):
    """Keep ``m`` of the ``c`` buffered entries with the largest keys (at the
    front, unordered); returns the ``m``-th largest key, which no dropped entry
    exceeds. A radix select on the two bytes of the 16-bit keys."""
    hist = np.zeros(256, dtype=np.int64)
    for a in range(c):
        hist[bk[a] >> 8] += 1
    need = m
    hb = 255
    while hist[hb] < need:
        need -= hist[hb]
        hb -= 1
    hist[:] = 0
    for a in range(c):
        if (bk[a] >> 8) == hb:
            hist[bk[a] & 0xFF] += 1
    lb = 255
    while hist[lb] < need:
        need -= hist[lb]
        lb -= 1
    thr = (hb << 8) | lb
    # keep every key above thr and the first `need` keys equal to it
    w = 0
    for a in range(c):
        k = bk[a]
        if k > thr or (k == thr and need > 0):
            if k == thr:
                need -= 1
            bk[w] = k
            bi[w] = bi[a]
            w += 1
    return thr


@njit(cache=True, nogil=True, inline="always")
def _key_abs(b):
    return b & np.uint16(0x7FFF)


@njit(cache=True, nogil=True, inline="always")
def _key_signed(b):
    return (b ^ np.uint16(0x8000)) if b < np.uint16(0x8000) else ~b


@njit(cache=True, nogil=True)
def _screen_row(row, col0, absval, bk, bi, c, f, m, q):
    """One row of :func:`screen_block`; returns the new count and floor. (A
    plain function: inside a parallel loop body numba does not vectorise the
    block maxima.)"""
    t = row.shape[0]
    C = bk.shape[0]
    W = 64
    nb = t // W
    # block maxima in one vectorised pass: most blocks hold no key above the
    # row's floor and are never visited again
    bmax = np.empty(nb, dtype=np.uint16)
    if absval:
        for b in range(nb):
            bm = np.uint16(0)
            for j in range(W):
                bm = max(bm, _key_abs(row[b * W + j]))
            bmax[b] = bm
    else:
        for b in range(nb):
            bm = np.uint16(0)
            for j in range(W):
                bm = max(bm, _key_signed(row[b * W + j]))
            bmax[b] = bm
    if c == 0 and f == 0 and 0 < q <= nb:
        # a fresh row starts below the q-th largest block maximum of its first
        # block (q: about 1.5x the block's expected share of the row's best
        # m), which is at most the block's q-th largest key
        v = np.sort(bmax)[nb - q]
        if v > 0:
            f = np.uint16(v - 1)
    for b in range(nb + (1 if t % W else 0)):
        if b < nb and bmax[b] <= f:
            continue
        for j in range(b * W, min(b * W + W, t)):
            key = _key_abs(row[j]) if absval else _key_signed(row[j])
            if key > f:
                bk[c] = key
                bi[c] = col0 + j
                c += 1
                if c == C:
                    f = _compact(bk, bi, c, m)
                    c = m
    return c, f


def _screen_impl(S, col0, absval, bk, bi, cnt, floor, m, q):
    for r in prange(S.shape[0]):
        c, f = _screen_row(S[r], col0, absval, bk[r], bi[r], cnt[r], floor[r], m, q)
        cnt[r] = c
        floor[r] = f


def screen_block(S, col0, bk, bi, cnt, floor, m, *, absval, q=None):
    """Merge the bfloat16 score block ``S`` (its bits as uint16, shape (n, t),
    column ``j`` = atom ``col0 + j``) into each row's buffer of candidate keys
    ``bk`` (uint16, (n, C) with ``C > m``) and atoms ``bi``, in place.

    A row appends every key above its ``floor``; a full buffer is cut back to
    its ``m`` largest keys and ``floor`` becomes the ``m``-th largest, so an
    atom outside the buffer never has a key above ``floor``. ``cnt`` holds the
    buffered counts (start at 0) and ``floor`` the floors (start at 0). A
    fresh row's floor starts just below the ``q``-th largest of its block's
    64-column maxima, at most its ``q``-th largest key (a higher floor costs
    nothing in exactness: it may only leave fewer than ``m`` atoms listed,
    which the certificate then sees).
    """
    q = int(m) if q is None else int(q)
    _parallel(_screen)(S, int(col0), bool(absval), bk, bi, cnt, floor, int(m), q)


def finish(bk, bi, cnt, floor, m):
    """Cut every buffer to at most ``m`` entries (``-1`` atoms fill the rest)."""
    _parallel(_finish)(bk, bi, cnt, floor, int(m))


def _finish_impl(bk, bi, cnt, floor, m):
    for r in prange(bk.shape[0]):
        c = cnt[r]
        if c > m:
            floor[r] = _compact(bk[r], bi[r], c, m)
            c = m
        for a in range(c, m):
            bi[r, a] = -1
            bk[r, a] = 0
        cnt[r] = c


def key_values(keys, *, absval):
    """The float32 values of bfloat16 keys (the inverse of the kernel's map;
    the signed key 0, below every number, maps to ``-inf``)."""
    k = np.asarray(keys, dtype=np.uint32)
    if absval:
        bits = k
    else:
        bits = np.where(k >= 0x8000, k ^ 0x8000, 0xFFFF - k)
    v = (bits.astype(np.uint32) << 16).view(np.float32)
    if not absval:
        v = np.where(k == 0, np.float32(-np.inf), v)
    return v


@njit(cache=True, nogil=True)
def _by_atom(hi, K):
    """The listed (row, slot) entries grouped by atom (a CSR over atoms of the
    flat slot numbers ``r * m + a``): one counting pass, no sort."""
    n, m = hi.shape
    ptr = np.zeros(K + 1, dtype=np.int64)
    for r in range(n):
        for a in range(m):
            if hi[r, a] >= 0:
                ptr[hi[r, a] + 1] += 1
    for j in range(K):
        ptr[j + 1] += ptr[j]
    fill = ptr[:-1].copy()
    ent = np.empty(ptr[K], dtype=np.int64)
    for r in range(n):
        for a in range(m):
            j = hi[r, a]
            if j >= 0:
                ent[fill[j]] = r * m + a
                fill[j] += 1
    return ptr, ent


def _scores_impl(X, D, ptr, ent, m, out):
    # atom-major: each listed atom is read from memory once per batch and
    # dotted with every row that lists it (rows stay in cache); row-major
    # rescoring read one scattered atom per (row, slot), bound by memory
    P = X.shape[1]
    for j in prange(ptr.shape[0] - 1):
        for e in range(ptr[j], ptr[j + 1]):
            r = ent[e] // m
            acc = np.float32(0.0)
            for p in range(P):
                acc += X[r, p] * D[j, p]
            out.flat[ent[e]] = acc


def _certify_impl(sc, hi, floor, eps, s, absval, K, out_v, out_i, ok):
    n, m = hi.shape
    for r in prange(n):
        key = np.full(m, -np.inf, dtype=np.float32)
        listed = 0
        nan = False
        for a in range(m):
            if hi[r, a] >= 0:
                v = abs(sc[r, a]) if absval else sc[r, a]
                nan |= v != v
                key[a] = v
                listed += 1
        out_v[r, :] = -np.inf
        out_i[r, :] = -1
        if nan or listed < s:  # a NaN, or too few listed atoms: not certified
            continue
        srt = np.argsort(-key)[:s]
        for a in range(s):
            out_v[r, a] = key[srt[a]]
            out_i[r, a] = hi[r, srt[a]]
        thr = out_v[r, s - 1]
        # every unlisted atom's bfloat16 score is at most the row's floor
        ok[r] = listed == K or floor[r] + eps[r] < thr


def rescore_certify(X, D, hi, floor, eps, s, *, absval):
    """Float32 top ``s`` of each row's shortlist and whether it is certified exact.

    ``hi`` (n, m) are the shortlisted atoms (``-1``: an empty slot); no
    unlisted atom's bfloat16 score exceeds ``floor[r]``, and ``eps[r]`` bounds
    a bfloat16 score's error on row ``r``. The whole shortlist is rescored in
    float32, atom by atom (each atom read once for all the rows that list
    it); a row is certified when its ``s``-th best exact score exceeds
    ``floor + eps``, so that no unlisted atom can reach its top ``s``. A NaN,
    or fewer than ``s`` listed atoms, fails the certificate.

    Returns ``(values, indices, ok)``: (n, s) float32 scores (``|<x, d>|``
    with ``absval``) sorted decreasingly, their atoms, and the (n,) certificate.
    """
    n = hi.shape[0]
    out_v = np.empty((n, s), dtype=np.float32)
    out_i = np.empty((n, s), dtype=np.int64)
    ok = np.zeros(n, dtype=np.bool_)
    if n:
        K = D.shape[0]
        ptr, ent = _by_atom(hi, K)
        sc = np.zeros(hi.shape, dtype=np.float32)
        _parallel(_scores)(X, D, ptr, ent, hi.shape[1], sc)
        _parallel(_certify)(sc, hi, floor.astype(np.float32), eps.astype(np.float32),
                            int(s), bool(absval), K, out_v, out_i, ok)
    return out_v, out_i, ok


_screen = _twins(_screen_impl, True)
_finish = _twins(_finish_impl, True)
# no "nnan": a NaN score must fail the certificate, not compare as a number
_scores = _twins(_scores_impl, {"reassoc", "contract", "arcp"})
_certify = _twins(_certify_impl, {"reassoc", "contract", "arcp"})
