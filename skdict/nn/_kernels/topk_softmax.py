"""Row-wise top-``k`` softmax on CPU: the exact ``k``-th largest score of each
row and the softmax over the entries at or above it, in one compiled kernel
(rows in parallel, each row's passes while it sits in cache).

Reference: ``skdict.nn.sparse_weights(s, "topk", k=k)`` (``torch.topk``, then a
softmax over the kept scores, ``-inf`` entries and fully masked rows giving 0).

Why not ``torch.topk`` / a quickselect: with a budget that is a large share of
the row (the ``k`` best of ``2 k`` preselected candidates) both move the row
around many times; a threshold is all the softmax needs. Here the threshold is
found by counting: each pass counts the entries at or above a guess (a compare
and an add, vectorised; the row stays in L1 between passes), the guesses
interpolate the counts between two bracketing values (regula falsi, Illinois
variant; a midpoint when the interpolation lands on a bracket), and the last
step reads the threshold off as the smallest entry of an exactly-``k`` bracket,
or walks down the distinct values below the upper bracket. The softmax then
takes the exponential of the kept entries only, with a polynomial ``exp`` for
float32 (the system ``expf`` is a scalar call and would dominate).

Rows this kernel does not decide (NaN or ``+inf`` scores, or ties at the
threshold, where the reference keeps an implementation-defined subset) are
flagged and left untouched for the caller to compute with the reference.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ...solvers._kernels.select import _parallel

__all__ = ["topk_softmax_rows"]

# remaining candidates below which the threshold is walked down value by value
_SMALL = 2
# rows per parallel task (one set of scratch rows each)
_ROWS_PER_TASK = 16

# float32 exp: exp(y) = 2^n * exp(r), n = round(y / ln 2), r = y - n ln 2 with
# ln 2 split in a short high part (n * _LN2_HI exact) and a correction, and a
# degree-7 Taylor polynomial on |r| <= ln2 / 2 (truncation error < 1e-8)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-87.0)  # 2^n stays a normal float32
# no 'nnan' / 'ninf': -inf marks masked scores and must compare as such
_FASTMATH = {"nsz", "arcp", "contract", "reassoc"}


def _make_kernel(ftype, itype, nbits, mant, bias, poly):
    """The row kernel for one float type (``itype``: the integer of its width).

    Each pass over a row is its own small function: LLVM vectorises them there,
    and did not once they were inlined into the parallel row loop.
    """
    sign_mask = itype(2 ** (nbits - 1) - 1)
    shift = itype(nbits - 1)  # typed: an int literal would widen the keys to int64
    # order-preserving integer keys: key(a) < key(b) iff a < b (non-NaN floats);
    # integer max / min reductions vectorise where float ones do not
    k_pinf = itype(np.array([np.inf], dtype=ftype).view(itype)[0])
    ninf_bits = np.array([-np.inf], dtype=ftype).view(itype)[0]
    k_ninf = itype(ninf_bits ^ ((ninf_bits >> (nbits - 1)) & sign_mask))
    k_min = itype(np.iinfo(itype).min)
    k_max = itype(np.iinfo(itype).max)
    f_ninf = ftype(-np.inf)
    f_lowest = ftype(np.finfo(ftype).min)
    small = _SMALL
    bias, mant, one_i = itype(bias), itype(mant), itype(1)
    per_task = _ROWS_PER_TASK
    one = ftype(1.0)
    f_half = ftype(0.5)
    c2, c3, c4, c5, c6, c7 = (ftype(1 / math.factorial(i)) for i in range(2, 8))
    jit = njit(nogil=True, fastmath=_FASTMATH)

    @njit(inline="always")
    def key_of(b):  # its own inverse
        # every step cast back: numba widens small-integer arithmetic to int64,
        # which halves the vector width (or stops the vectorisation)
        return itype(b ^ itype(itype(b >> shift) & sign_mask))

    @njit(inline="always")
    def pick(cond, a, b):  # a where cond else b, without a branch
        sel = itype(-itype(cond))
        return itype((a & sel) | (b & ~sel))

    @jit
    def key_range(xi):
        kmax, kmin = k_min, k_max
        for j in range(xi.shape[0]):
            kk = key_of(xi[j])
            kmax = itype(max(kmax, kk))
            kmin = itype(min(kmin, kk))
        return kmin, kmax

    @jit
    def finite_min_key(xi):
        m = k_max
        for j in range(xi.shape[0]):
            kk = key_of(xi[j])
            m = itype(min(m, pick(kk > k_ninf, kk, k_max)))
        return m

    @jit
    def count_ge(x, t):
        c = np.int32(0)  # an int64 count vectorises several times worse
        for j in range(x.shape[0]):
            c = np.int32(c + np.int32(x[j] >= t))
        return np.int64(c)

    @jit
    def min_key_ge(x, xi, lo):
        m = k_max
        for j in range(x.shape[0]):
            m = itype(min(m, pick(x[j] >= lo, key_of(xi[j]), k_max)))
        return m

    @jit
    def max_key_lt(x, xi, hi):
        m = k_min
        for j in range(x.shape[0]):
            m = itype(max(m, pick(x[j] < hi, key_of(xi[j]), k_min)))
        return m

    @jit
    def exp_poly(x, out, nb, fmax, t):
        # out = exp(x - fmax) * (x >= t), in two vectorised loops: the
        # polynomial with 2^n's bits into nb, then the product (out is never x:
        # with the weights written over the scores, LLVM's alias check would
        # send the loop down its scalar path)
        for j in range(x.shape[0]):
            xj = x[j]
            y = max(xj - fmax, _EXP_FLOOR)
            nn = math.floor(y * _LOG2E + f_half)
            rr = (y - nn * _LN2_HI) - nn * _LN2_LO
            p = one + rr * (one + rr * (c2 + rr * (c3 + rr * (
                c4 + rr * (c5 + rr * (c6 + rr * c7))))))
            out[j] = p * ftype(xj >= t)
            nb[j] = itype(itype(itype(nn) + bias) << mant)

    @jit
    def scale_by(out, f):
        total = ftype(0.0)
        for j in range(out.shape[0]):
            e = out[j] * f[j]
            out[j] = e
            total += e
        return total

    @jit
    def exp_libm(x, out, fmax, t):
        total = 0.0
        for j in range(x.shape[0]):
            xj = x[j]
            e = math.exp(max(xj - fmax, _EXP_FLOOR)) * ftype(xj >= t)
            out[j] = e
            total += e
        return total

    @jit
    def times(out, src, c):
        for j in range(out.shape[0]):
            out[j] = src[j] * c

    @jit
    def fill0(out):
        for j in range(out.shape[0]):
            out[j] = 0

    @jit
    def kth(x, xi, k, lo, c_lo, hi, fbuf, ibuf):
        """(k-th largest of x, number of entries >= it), given bracketing values
        with ``c_lo = #(x >= lo) >= k > #(x >= hi) = 0``."""
        c_hi = 0
        # regula falsi on the counts, Illinois variant (the retained end's
        # weight halves when the same end moves twice, so that one-sided
        # convergence does not stall)
        f_lo, f_hi = c_lo - k + 0.5, 0.5 - k
        side = 0
        while c_lo - c_hi > small and c_lo != k:
            g = ftype(lo + (hi - lo) * (f_lo / (f_lo - f_hi)))
            if not (lo < g < hi):
                g = ftype(lo + (hi - lo) * 0.5)
                if not (lo < g < hi):  # adjacent floats: [lo, hi) holds only lo
                    break
            c = count_ge(x, g)
            if c >= k:
                lo, c_lo, f_lo = g, c, c - k + 0.5
                if side == 1:
                    f_hi *= 0.5
                side = 1
            else:
                hi, c_hi, f_hi = g, c, c - k + 0.5
                if side == -1:
                    f_lo *= 0.5
                side = -1
        if c_lo == k:  # the smallest entry >= lo, exactly k at or above it
            ibuf[0] = key_of(min_key_ge(x, xi, lo))
            return fbuf[0], c_lo
        # walk down the distinct values below hi: the next largest, its count
        while True:
            ibuf[0] = key_of(max_key_lt(x, xi, hi))
            v = fbuf[0]
            c = count_ge(x, v)
            if c >= k:
                return v, c
            hi = v

    def rows_impl(S, W, k, thr, flag):
        n, M = S.shape
        n_tasks = (n + per_task - 1) // per_task
        for task in prange(n_tasks):
            nb = np.empty(M, dtype=itype)
            nbf = nb.view(ftype)
            pb = np.empty(M, dtype=ftype)
            fbuf = np.empty(2, dtype=ftype)
            ibuf = fbuf.view(itype)
            for r in range(task * per_task, min(n, (task + 1) * per_task)):
                x = S[r]
                xi = x.view(itype)
                kmin, kmax = key_range(xi)
                if kmax >= k_pinf or kmin < k_ninf:  # +inf or NaN
                    flag[r] = True
                    continue
                out = W[r]
                if kmax == k_ninf:  # fully masked
                    thr[r] = f_ninf
                    fill0(out)
                    continue
                nf = M
                if kmin == k_ninf:  # masked entries: the finite count and min
                    nf = count_ge(x, f_lowest)
                    kmin = finite_min_key(xi)
                if nf <= k:
                    t = f_lowest  # every finite entry
                else:
                    ibuf[0] = key_of(kmin)
                    lo = fbuf[0]
                    ibuf[1] = key_of(itype(kmax + one_i))  # just above the max
                    hi = fbuf[1]
                    t, cnt = kth(x, xi, k, lo, nf, hi, fbuf, ibuf)
                    if cnt > k:  # ties at the threshold
                        flag[r] = True
                        continue
                thr[r] = t
                ibuf[0] = key_of(kmax)
                fmax = fbuf[0]
                if poly:
                    exp_poly(x, pb, nb, fmax, t)
                    total = scale_by(pb, nbf)
                else:
                    total = exp_libm(x, pb, fmax, t)
                times(out, pb, ftype(1.0 / total))

    return rows_impl


def _twins(impl):
    return (njit(parallel=True, nogil=True, fastmath=_FASTMATH)(impl),
            njit(nogil=True, fastmath=_FASTMATH)(impl))


_KERNELS = {
    np.dtype(np.float32): _twins(_make_kernel(np.float32, np.int32, 32, 23, 127, True)),
    np.dtype(np.float64): _twins(_make_kernel(np.float64, np.int64, 64, 52, 1023, False)),
}


def topk_softmax_rows(S, k, out=None):
    """Softmax over the ``k`` largest entries of each row of ``S`` (others 0).

    Parameters
    ----------
    S : ndarray (n, m), float32 or float64, C-contiguous
        Scores; ``-inf`` marks masked entries. Rows with fewer than ``k`` finite
        entries keep all of them; fully masked rows give zeros.
    k : int, ``1 <= k <= m``
    out : ndarray like ``S``, optional
        Where the weights go; may be ``S`` itself (in place).

    Returns
    -------
    out : ndarray (n, m)
        The weights, except on flagged rows (left as they were).
    thr : ndarray (n,)
        The threshold of each unflagged row: the entries ``>= thr`` are kept
        (the ``k``-th largest; the lowest finite float where the row has at most
        ``k`` finite entries; ``-inf`` on fully masked rows).
    flag : bool ndarray (n,)
        Rows not computed: a NaN or ``+inf`` score, or more than ``k`` entries
        at or above the ``k``-th largest (ties), where the caller applies the
        reference.
    """
    S = np.asarray(S)
    if S.ndim != 2 or S.dtype not in _KERNELS or not S.flags.c_contiguous:
        raise ValueError("S must be a C-contiguous 2-D float32 or float64 array, got "
                         f"{S.dtype} of shape {S.shape}.")
    n, m = S.shape
    if not 1 <= int(k) <= m:
        raise ValueError(f"k={k} must be between 1 and the row length {m}.")
    if out is None:
        out = np.empty_like(S)
    elif out.shape != S.shape or out.dtype != S.dtype or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous array of the shape and dtype of S.")
    thr = np.empty(n, dtype=S.dtype)
    flag = np.zeros(n, dtype=np.bool_)
    if n:
        _parallel(_KERNELS[S.dtype])(S, out, int(k), thr, flag)
    return out, thr, flag
