"""Compiled CPU kernel: the lasso homotopy (LARS-lasso) row by row, in Gram form.

This is the one place where skdict leaves torch for the numerics. The exact lasso
on a CPU is latency-bound: each row needs a handful of ``O(m K)`` steps on a tiny
active set, and a torch formulation pays a fixed per-operator cost (dispatch,
allocation, OpenMP fork/join) tens of times per step that dwarfs the arithmetic.
A compiled per-row loop, parallel over rows, does the same steps with no
overhead. The GPU path stays the batched torch solver (:func:`lasso_exact`).

The path follows Efron et al. (2004) with the lasso modification: starting from
``a = 0`` and ``lambda = max |c|``, the active set moves along the equiangular
direction ``w = G_AA^{-1} s_A`` until an inactive correlation reaches the common
level (the atom joins), an active coefficient reaches zero (the atom leaves), or
the level reaches ``alpha`` (stop). ``G_AA`` is kept as a Cholesky factor,
bordered when an atom joins (``O(m^2)``) and downdated by Givens rotations when
one leaves (``O(m^2)``, where refactoring would cost ``O(m^3)``: at supports of
~50 atoms a path has dozens of drops). At the end the
coefficients are re-solved from ``G_AA a_A = c_A - alpha s_A`` (removing the
drift of the incremental updates) and the KKT conditions are checked: on the
path's own correlations when the largest inactive one clears ``alpha`` by more
than a conservative bound on their error (the polish's change times ``max |G|`` plus
the rounding drift of the updates), else on a freshly computed float64 residual
(one pass over ``K`` instead of ``m + 2``). Rows that fail are reported so that
the caller can finish them with another solver.

Cost per step (``m`` active atoms, ``K`` atoms): one triangular solve (``z =
L^{-1} s_A`` is kept current as atoms join, so only ``L^T w = z`` is solved), about
``m / 4 + 2`` vectorised passes over ``K`` for ``u = G[:, A] w`` (the first applies
the previous move to the correlations, the middle ones add four columns each, the
last flags the inactive atoms that could join before the level reaches
``alpha``: ``|c_k - (cmax - alpha) u_k| > alpha``), a bit scan that lists the
flagged atoms, and exact step lengths for them only (about 4% of the atoms on
natural-image dictionaries at large alpha) instead of a branchy scan of every
atom. At small alpha most atoms pass that test; when more than ``_WINDOW_MIN``
do, one more vectorised pass brackets their join times in the working dtype
(rounding bounded, :func:`_join_window`) and only the atoms whose lower bound
is below the smallest upper bound (usually one or two) get the exact test: the
same atom joins as with the exact test of every flagged atom (the tests compare
the two through ``window_min``). The drop test is one
vectorised pass over the active set, and the triangular solves go four rows at
a time.
The path's length-``K`` passes (correlations, ``u``, step lengths) run in
float32 for float32 and float64 inputs alike: the path only has to find the
support, the coefficients come from a float64 face solve, and every row is
certified against float64 KKT conditions (inactive atoms within ``alpha``,
active atoms at ``alpha s_a`` with matching signs). Float32 ``G`` (256 KB for
256 atoms) stays in L2 where float64 ``G`` does not: the passes take half the
cycles. Rows the float32 path cannot certify (near-ties ordered wrongly by
float32 rounding; many only with nearly collinear atoms) are solved again with
float64 passes when there are many of them, else left to the caller's fallback.

Rows are handed to the threads in chunks from an atomic counter (rows differ
in cost). Given the dictionary, each thread also forms its chunk's correlations
``X D^T`` (register-tiled dot products) instead of reading a precomputed ``C``.

Reference: the batched torch active-set method (:mod:`skdict.solvers.active_set`)
reaches the same certified optimum; tests/test_speed_paths.py compares the two.
"""

from __future__ import annotations

import threading
from types import FunctionType

import numpy as np
import torch

try:  # numba is a hard dependency; keep import errors explicit
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic, overload
except ImportError as exc:  # pragma: no cover - exercised only without numba
    raise ImportError(
        "skdict's CPU exact lasso kernel needs numba; install it with `pip install numba`."
    ) from exc

__all__ = ["lars_lasso_rows", "numba"]


@intrinsic
def _cttz(typingctx, x):
    """Count of trailing zero bits of an int64 (LLVM's cttz; x != 0)."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [i64, ir.IntType(1)])
        fn = builder.module.declare_intrinsic("llvm.cttz.i64", fnty=fnty)
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return sig, codegen


@intrinsic
def _popcnt(typingctx, x):
    """Number of set bits of an int64 (LLVM's ctpop)."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = builder.module.declare_intrinsic("llvm.ctpop.i64", fnty=ir.FunctionType(i64, [i64]))
        return builder.call(fn, [args[0]])

    return sig, codegen


@intrinsic
def _mask32(typingctx, arr, j):
    """Bit ``i`` set where ``arr[32 j + i] != 0``, for a uint8 array (one vector
    compare and a byte mask: ``vpmovmskb`` on AVX2), as int64."""
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(a.data, [builder.mul(args[1], ir.Constant(ir.IntType(64), 32))])
        vty = ir.VectorType(ir.IntType(8), 32)
        v = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)
        bits = builder.bitcast(builder.icmp_unsigned("!=", v, ir.Constant(vty, None)),
                               ir.IntType(32))
        return builder.zext(bits, ir.IntType(64))

    return sig, codegen


@intrinsic
def _fetch_add(typingctx, arr, v):
    """Atomically add ``v`` to ``arr[0]`` (an int64 array); returns the old value."""
    sig = types.int64(arr, types.int64)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", a.data, args[1], "monotonic")

    return sig, codegen


def _int_view(a):
    """``a`` (float32 or float64) viewed as integers of its width."""


@overload(_int_view)
def _int_view_impl(a):
    if a.dtype == types.float32:
        return lambda a: a.view(np.int32)
    return lambda a: a.view(np.int64)


@njit(cache=True, nogil=True, fastmath=True)
def _forward(Lc, dinv, m, rhs, out, start):
    """``out = L^{-1} rhs`` (leading ``m x m`` block; ``rhs`` may be ``out``),
    given ``out[:start]`` (the rows above ``start`` of ``L`` and ``rhs``
    unchanged since).

    Four rows at a time: their four dot products with the solved entries in one
    pass, then the 4 x 4 triangle (a quarter of the dependent reductions)."""
    i = start
    while i + 3 < m:
        s0 = rhs[i]
        s1 = rhs[i + 1]
        s2 = rhs[i + 2]
        s3 = rhs[i + 3]
        r0 = Lc[i]
        r1 = Lc[i + 1]
        r2 = Lc[i + 2]
        r3 = Lc[i + 3]
        for j in range(i):
            oj = out[j]
            s0 -= r0[j] * oj
            s1 -= r1[j] * oj
            s2 -= r2[j] * oj
            s3 -= r3[j] * oj
        o0 = s0 * dinv[i]
        o1 = (s1 - r1[i] * o0) * dinv[i + 1]
        o2 = (s2 - r2[i] * o0 - r2[i + 1] * o1) * dinv[i + 2]
        o3 = (s3 - r3[i] * o0 - r3[i + 1] * o1 - r3[i + 2] * o2) * dinv[i + 3]
        out[i] = o0
        out[i + 1] = o1
        out[i + 2] = o2
        out[i + 3] = o3
        i += 4
    while i < m:
        s = rhs[i]
        for j in range(i):
            s -= Lc[i, j] * out[j]
        out[i] = s * dinv[i]
        i += 1


@njit(cache=True, nogil=True, fastmath=True)
def _backward(Lc, dinv, m, rhs, out):
    """``out = L^{-T} rhs`` (leading ``m x m`` block; ``rhs`` may be ``out``).

    Column-oriented: each solved entry updates the ones above it with a row of
    ``L`` (contiguous, independent updates) rather than each entry summing a
    column of ``L`` (strided, one dependency chain); four rows at a time (the
    4 x 4 triangle, then one pass of four-row updates)."""
    for i in range(m):
        out[i] = rhs[i]
    i = m - 1
    while i >= 3:
        r3 = Lc[i]
        r2 = Lc[i - 1]
        r1 = Lc[i - 2]
        r0 = Lc[i - 3]
        o3 = out[i] * dinv[i]
        o2 = (out[i - 1] - r3[i - 1] * o3) * dinv[i - 1]
        o1 = (out[i - 2] - r3[i - 2] * o3 - r2[i - 2] * o2) * dinv[i - 2]
        o0 = (out[i - 3] - r3[i - 3] * o3 - r2[i - 3] * o2 - r1[i - 3] * o1) * dinv[i - 3]
        out[i] = o3
        out[i - 1] = o2
        out[i - 2] = o1
        out[i - 3] = o0
        for j in range(i - 3):
            out[j] -= (r3[j] * o3 + r2[j] * o2) + (r1[j] * o1 + r0[j] * o0)
        i -= 4
    while i >= 0:
        oi = out[i] * dinv[i]
        out[i] = oi
        for j in range(i):
            out[j] -= Lc[i, j] * oi
        i -= 1


@njit(cache=True, nogil=True, fastmath=True)
def _chol_append(Lc, dinv, m, G, act, k):
    """Border the factor of ``G[act[:m]][:, act[:m]]`` with atom ``k``.

    Returns False (and leaves the factor unchanged) when ``k`` is numerically
    in the span of the active atoms."""
    gk = G[k]
    row = Lc[m]  # (not part of the factor until m grows)
    for i in range(m):
        row[i] = gk[act[i]]
    _forward(Lc, dinv, m, row, row, 0)
    d = gk[k]
    for i in range(m):
        d -= row[i] * row[i]
    if d <= 1e-10 * gk[k] or d <= 0.0:
        return False
    Lc[m, m] = np.sqrt(d)
    dinv[m] = 1.0 / Lc[m, m]
    return True


@njit(cache=True, nogil=True, fastmath=True)
def _chol_delete(Lc, dinv, m, who):
    """Remove atom ``who`` from the factor of the ``m`` active atoms in ``O(m^2)``:
    drop its row, then restore the triangle with Givens rotations of the columns
    ``(j, j + 1)``, ``j >= who`` (``L Q`` with ``Q`` orthogonal has the same
    ``L L^T``). False when a diagonal would vanish."""
    for i in range(who, m - 1):
        for j in range(i + 2):
            Lc[i, j] = Lc[i + 1, j]
    for j in range(who, m - 1):
        a = Lc[j, j]
        b = Lc[j, j + 1]
        r = np.sqrt(a * a + b * b)
        if not r > 0.0:
            return False
        c = a / r
        s = b / r
        Lc[j, j] = r
        dinv[j] = 1.0 / r
        for i in range(j + 1, m - 1):
            x = Lc[i, j]
            y = Lc[i, j + 1]
            Lc[i, j] = c * x + s * y
            Lc[i, j + 1] = c * y - s * x
    return True


@njit(cache=True, nogil=True, fastmath=True)
def _first_atom(corr, skip, positive, exclude):
    """The unskipped atom of largest (signed if ``positive``) correlation."""
    cmax = 0.0
    j0 = -1
    for k in range(corr.shape[0]):
        v = corr[k] if positive else abs(corr[k])
        if v > cmax and skip[k] == 0 and k != exclude:
            cmax = v
            j0 = k
    return j0, cmax


@njit(cache=True, nogil=True, fastmath=True)
def _start_path(j, corr, G, act, sgn, beta, Lc, dinv, z, skip):
    """Make atom ``j`` the only active one: sign of its correlation, zero
    coefficient, the 1 x 1 factor and ``z = L^{-1} s``."""
    act[0] = j
    sgn[0] = 1.0 if corr[j] > 0 else -1.0
    beta[0] = 0.0
    Lc[0, 0] = np.sqrt(G[j, j])
    dinv[0] = 1.0 / Lc[0, 0]
    z[0] = sgn[0] * dinv[0]
    skip[j] = 1


@njit(cache=True, nogil=True, fastmath=True)
def _flag_words(flag, words):
    """The non-zero 32-flag masks of ``flag`` (padded to a multiple of 32) with
    their block in the high bits, listed branch-free; returns (masks, flags)."""
    nw = 0
    nf = 0
    for j in range(flag.shape[0] // 32):
        msk = _mask32(flag, j)
        words[nw] = msk | (j << 32)
        nw += msk != 0
        nf += _popcnt(msk)
    return nw, nf


@njit(cache=True, nogil=True, fastmath=True)
def _list_flags(words, nw, cand):
    """The flagged atoms in index order (one bit scan each); returns their count."""
    nc = 0
    for q in range(nw):
        first = (words[q] >> 32) * 32  # the block's first atom
        msk = words[q] & 0xFFFFFFFF
        while msk != 0:
            cand[nc] = first + _cttz(msk)
            nc += 1
            msk &= msk - 1
    return nc


@njit(cache=True, nogil=True, fastmath=True)
def _first_join(cand, nc, corr, u, cmax, g0, positive, tcand):
    """The exact (float64) join times ``t = (cmax -/+ c_k) / (1 -/+ u_k)`` of the
    candidates and the first of them to join before ``g0``: (gamma, event, who)
    with event 1 for a join, 0 (and gamma = g0) for none."""
    for i in range(nc):
        k = cand[i]
        uk = u[k]
        ck = corr[k]
        dp = 1.0 - uk
        t = max(cmax - ck, 0.0) / dp if dp > 1e-12 else np.inf
        if not positive:
            dm = 1.0 + uk
            tm = max(cmax + ck, 0.0) / dm if dm > 1e-12 else np.inf
            t = min(t, tm)
        tcand[i] = t
    gamma = g0
    event = 0
    who = -1
    for i in range(nc):
        if tcand[i] < gamma:
            gamma = tcand[i]
            event = 1
            who = cand[i]
    return gamma, event, who


@njit(cache=True, nogil=True)
def _min_bits(bits, n):
    """The smallest of ``bits[:n]``: on the bit patterns of positive floats, which
    order as the floats do (an integer minimum vectorises where a float one does
    not)."""
    m = bits[0]
    for k in range(n):
        v = bits[k]
        m = v if v < m else m
    return m


@njit(cache=True, nogil=True, error_model="numpy",
      fastmath={"nnan", "ninf", "nsz", "arcp", "contract", "afn"})
def _first_drop(beta, w, m, gamma, tt):
    """The first active atom whose coefficient reaches zero before ``gamma``:
    (its step, its position), or (gamma, -1). The steps ``-beta_i / w_i``
    (positive where ``beta_i w_i < 0``) in one vectorised pass, their minimum
    on the bits (:func:`_min_bits`), then the first position that has it."""
    for i in range(m):
        b = beta[i]
        wi = w[i]
        tt[i] = -b / wi if b * wi < 0.0 else 1e300
    bits = tt.view(np.int64)
    mb = _min_bits(bits, m)
    for i in range(m):
        if bits[i] == mb:
            if tt[i] < gamma:
                return tt[i], i
            break
    return gamma, -1


# flagged atoms above which a step brackets the join times before the exact test
_WINDOW_MIN = 24


# no reassociation: ``(chi - c) + clo`` relies on the exact (Sterbenz) difference
@njit(cache=True, nogil=True, error_model="numpy",
      fastmath={"nnan", "ninf", "nsz", "arcp", "contract", "afn"})
def _join_window(corr, u, flag, tlo, thi, positive, sc):
    """Bounds on the join times of the flagged atoms in the working dtype:
    ``tlo[k]`` at most, and the returned value at least, the smallest exact
    (float64) join time, so that the atoms with ``tlo[k]`` above it cannot join
    first. ``sc[3:13]``: cmax split as ``chi + clo`` (working dtype, ``|cmax -
    chi - clo| <= 2^-48 cmax``), an absolute slack ``eta``, the relative
    factors ``1 -/+ 1e-5``, a large sentinel, the denominator floors below and
    above float64's ``1e-12``, 0 and 1; ``sc[13]`` is scratch.

    Error bound: with ``chi - c`` exact (Sterbenz) for ``c`` near ``chi`` and
    correctly rounded otherwise, the numerators are within ``4 ulp`` relative
    plus ``2^-48 cmax`` absolute, the quotients within ``7 ulp`` (float32:
    ``4e-7``, 25 times below ``1e-5``) plus ``2^-48 cmax / d`` (30 times below
    ``eta / d``). Denominators near 0 (``u`` near 1) are exact differences, so the
    float64 test ``d > 1e-12`` sees the same ``d``; the floors on either side
    only make the bounds looser. The upper bounds go to ``thi`` and their
    minimum is taken on the bits (:func:`_min_bits`)."""
    chi = sc[3]
    clo = sc[4]
    eta = sc[5]
    flo = sc[6]
    fhi = sc[7]
    big = sc[8]
    dlo = sc[9]
    dhi = sc[10]
    zero = sc[11]
    one = sc[12]
    for k in range(corr.shape[0]):
        ck = corr[k]
        uk = u[k]
        d = one - uk
        r = one / (d if d > dlo else one)
        t = max((chi - ck) + clo, zero) * r
        e = eta * r
        lo = t * flo - e if d > dlo else big
        hi = t * fhi + e if d > dhi else big
        if not positive:
            d = one + uk
            r = one / (d if d > dlo else one)
            t = max((chi + ck) + clo, zero) * r
            e = eta * r
            lo2 = t * flo - e if d > dlo else big
            hi2 = t * fhi + e if d > dhi else big
            lo = lo2 if lo2 < lo else lo
            hi = hi2 if hi2 < hi else hi
        tlo[k] = lo
        thi[k] = hi if flag[k] != 0 else big  # > 0: t >= 0, e > 0
    _int_view(sc)[13] = _min_bits(_int_view(thi), thi.shape[0])
    return sc[13]


@njit(cache=True, nogil=True, fastmath=True)
def _lars_one(c_in, G, Gw, alpha, positive, max_steps, kkt_tol, gmax, eps_w, window_min, corr, u,
              skip, act, sgn, beta, w, wf, rhs, Lc, dinv, z, flag, words, cand, tcand, res, sc,
              flag2, words2, tlo, thi, tdrop):
    """Solve one row; returns (n_active, n_steps, ok, a.r_A) with ``r_A`` the
    residual correlations of the active atoms (for the objective).

    ``skip[k]`` is 1 for active atoms, 2 for atoms found numerically dependent on
    the active set, 3 for the atom dropped in the previous step; only ``skip == 0``
    atoms may join. Of the passes over ``K`` that accumulate ``u = G[:, A] w``, the
    first also applies the previous move to the correlations (``corr -= gamma u``)
    and the last flags the ``skip == 0`` atoms that could join before the level
    reaches ``alpha``: ``|c_k - (cmax - alpha) u_k| > alpha`` (one pass when
    ``m == 1``). Only flagged atoms get the exact step-length test: a few percent
    at large alpha; when more than ``window_min`` are flagged (small alpha: most
    of them), only those that a bracket of all their join times in the working
    dtype (:func:`_join_window`) cannot rule out."""
    K = c_in.shape[0]
    mmax = Lc.shape[0]
    for k in range(K):
        corr[k] = c_in[k]
        skip[k] = 0
        u[k] = 0.0
    j0, cmax = _first_atom(corr, skip, positive, -1)
    if cmax <= alpha or j0 < 0:
        return 0, 0, True, 0.0
    cmax0 = cmax
    # constants of the join-time bracket (:func:`_join_window`) in the working dtype
    sc[6] = 1.0 - 1e-5
    sc[7] = 1.0 + 1e-5
    sc[8] = 1e38
    sc[9] = 0.5e-12
    sc[10] = 2e-12
    sc[11] = 0.0
    sc[12] = 1.0
    pathw = 0.0  # sum over steps of gamma ||w||_1 (for the drift bound)
    mtop = 1
    _start_path(j0, corr, G, act, sgn, beta, Lc, dinv, z, skip)
    m = 1
    steps = 0
    gprev = 0.0  # pending move of the correlations along the previous u
    last_drop = -1
    while steps < max_steps:
        steps += 1
        # equiangular direction in code space: G_AA w = s_A, i.e. L^T w = z with
        # z = L^{-1} s_A kept up to date as atoms join (one triangular solve a step)
        _backward(Lc, dinv, m, z, w)
        for i in range(m):
            wf[i] = w[i]
        if last_drop >= 0:
            skip[last_drop] = 3  # not re-added in the step right after it left
        g0 = cmax - alpha
        # the pass scalars in the working dtype (float32 loops stay float32); the
        # bound is widened by a relative 1e-5 so that rounding cannot hide a joiner
        sc[0] = gprev
        sc[1] = g0
        sc[2] = alpha * (1.0 - 1e-5)
        gp = sc[0]
        g0w = sc[1]
        base = sc[2]
        # pass 1: pending move, first column of u (and the flags when m == 1)
        wi = wf[0]
        gi = Gw[act[0]]
        if m == 1:
            for k in range(K):
                ck = corr[k] - gp * u[k]
                uk = wi * gi[k]
                corr[k] = ck
                u[k] = uk
                d = ck - g0w * uk
                flag[k] = ((d if positive else abs(d)) > base) & (skip[k] == 0)
        else:
            for k in range(K):
                corr[k] -= gp * u[k]
                u[k] = wi * gi[k]
            i = 1
            while i + 3 < m - 1:  # four columns a pass: a quarter of the traffic on u
                w0 = wf[i]
                w1 = wf[i + 1]
                w2 = wf[i + 2]
                w3 = wf[i + 3]
                h0 = Gw[act[i]]
                h1 = Gw[act[i + 1]]
                h2 = Gw[act[i + 2]]
                h3 = Gw[act[i + 3]]
                for k in range(K):
                    u[k] += (w0 * h0[k] + w1 * h1[k]) + (w2 * h2[k] + w3 * h3[k])
                i += 4
            if i + 1 < m - 1:
                wi = wf[i]
                wj = wf[i + 1]
                gi = Gw[act[i]]
                gj = Gw[act[i + 1]]
                for k in range(K):
                    u[k] += wi * gi[k] + wj * gj[k]
                i += 2
            if i < m - 1:
                wi = wf[i]
                gi = Gw[act[i]]
                for k in range(K):
                    u[k] += wi * gi[k]
            wi = wf[m - 1]
            gi = Gw[act[m - 1]]
            for k in range(K):
                uk = u[k] + wi * gi[k]
                u[k] = uk
                d = corr[k] - g0w * uk
                flag[k] = ((d if positive else abs(d)) > base) & (skip[k] == 0)
        # the flagged atoms, in index order (bit masks of 32 flags). At small
        # alpha most atoms pass the flag test; then the join times of all of them
        # are bracketed in the working dtype (vectorised) and only the atoms whose
        # lower bound is below the smallest upper bound (a few) get the exact test
        nw, nf = _flag_words(flag, words)
        window = nf > window_min
        if window:
            sc[3] = cmax
            sc[4] = cmax - sc[3]  # cmax = sc[3] + sc[4] to ~2^-48 cmax
            sc[5] = max(1e-13 * cmax, 1e-30)
            thr = _join_window(corr, u, flag, tlo, thi, positive, sc)
            for k in range(K):
                flag2[k] = (tlo[k] <= thr) & (flag[k] != 0)
            nw2, _ = _flag_words(flag2, words2)
            nc = _list_flags(words2, nw2, cand)
        else:
            nc = _list_flags(words, nw, cand)
        # event: 0 stop, 1 add, 2 drop
        gamma, event, who = _first_join(cand, nc, corr, u, cmax, g0, positive, tcand)
        if window and event == 0:  # (not expected: the bracket is conservative)
            nc = _list_flags(words, nw, cand)
            gamma, event, who = _first_join(cand, nc, corr, u, cmax, g0, positive, tcand)
        if last_drop >= 0:
            skip[last_drop] = 0
            last_drop = -1
        if m >= 16:  # (vectorised: pays on long active sets only)
            gd, i_d = _first_drop(beta, w, m, gamma, tdrop)
            if i_d >= 0:
                gamma = gd
                event = 2
                who = i_d
        else:
            for i in range(m):
                if beta[i] * w[i] < 0.0:
                    t = -beta[i] / w[i]
                    if t < gamma:
                        gamma = t
                        event = 2
                        who = i
        # move
        wl1 = 0.0
        for i in range(m):
            beta[i] += gamma * w[i]
            wl1 += abs(w[i])
        pathw += gamma * wl1
        cmax -= gamma
        gprev = gamma
        if event == 0:
            break
        if event == 2:
            k = act[who]
            if m > 1 and not _chol_delete(Lc, dinv, m, who):
                return m - 1, steps, False, 0.0
            for i in range(who, m - 1):
                act[i] = act[i + 1]
                sgn[i] = sgn[i + 1]
                beta[i] = beta[i + 1]
            m -= 1
            skip[k] = 0
            last_drop = k
            if m == 0:
                # the path restarts from zero at this level
                for kk in range(K):
                    corr[kk] -= gprev * u[kk]
                    u[kk] = 0.0
                gprev = 0.0
                jn, cmax_new = _first_atom(corr, skip, positive, k)
                if jn < 0 or cmax_new <= alpha:
                    break
                _start_path(jn, corr, G, act, sgn, beta, Lc, dinv, z, skip)
                cmax = cmax_new
                m = 1
            else:  # the rows of L and s above the dropped one are unchanged
                _forward(Lc, dinv, m, sgn, z, who)
            continue
        # event == 1: atom `who` joins with the sign of its (moved) correlation
        if m >= mmax or not _chol_append(Lc, dinv, m, G, act, who):
            skip[who] = 2
            continue
        act[m] = who
        sgn[m] = 1.0 if corr[who] - gamma * u[who] > 0 else -1.0
        beta[m] = 0.0
        s = sgn[m]
        for j in range(m):
            s -= Lc[m, j] * z[j]
        z[m] = s * dinv[m]
        skip[who] = 1
        m += 1
        mtop = max(mtop, m)
    # polish: the exact face solution G_AA a = c_A - alpha s_A (kept if signs agree)
    agree = True
    dl1 = 0.0
    if m > 0:
        for i in range(m):
            rhs[i] = c_in[act[i]] - alpha * sgn[i]
        _forward(Lc, dinv, m, rhs, w, 0)  # (L L^T) w = rhs
        _backward(Lc, dinv, m, w, w)
        for i in range(m):
            if w[i] * sgn[i] <= 0.0:
                agree = False
                break
        if agree:
            for i in range(m):
                dl1 += abs(w[i] - beta[i])
                beta[i] = w[i]
    thr = alpha * (1.0 + kkt_tol)
    # KKT certificate without a fresh residual: |r_k - corr_k| is at most the
    # polish's change times max |G| plus the rounding drift of the incremental
    # updates (bounded from the path: steps, cmax, sum gamma ||w||_1); the
    # inactive path correlations (after the pending move) must stay below
    # thr minus that bound (a count of violations: a vectorised pass)
    drift = 4.0 * eps_w * (steps * cmax0 + (mtop + 2) * gmax * pathw)
    lim = thr - dl1 * gmax - drift
    if agree and lim > 0.0:
        sc[0] = gprev
        sc[1] = lim * (1.0 - 1e-6)  # rounded into the working dtype, conservatively
        gp = sc[0]
        limw = sc[1]
        nviol = 0
        for k in range(K):
            ck = corr[k] - gp * u[k]
            nviol += ((ck if positive else abs(ck)) > limw) & (skip[k] != 1)
        if nviol == 0:
            l1 = 0.0
            for i in range(m):
                l1 += abs(beta[i])
            return m, steps, True, alpha * l1  # r_A = alpha s_A on the face
    # otherwise: a fresh residual r = c - G_A a_A (float64)
    for k in range(K):
        res[k] = c_in[k]
    for i in range(m):
        bi = beta[i]
        gi = G[act[i]]
        for k in range(K):
            res[k] -= bi * gi[k]
    worst = 0.0
    for k in range(K):
        v = res[k] if positive else abs(res[k])
        v = v if skip[k] != 1 else 0.0
        worst = max(worst, v)
    # the active atoms: r_a = alpha s_a with beta_a of sign s_a (holds by
    # construction after the polish; checked because an unpolished path can end
    # on a wrong support, e.g. nearly collinear atoms with coefficients of
    # opposite sign that float32 passes ordered wrongly)
    ar = 0.0
    dev = 0.0
    for i in range(m):
        ri = res[act[i]]
        ar += beta[i] * ri
        dev = max(dev, abs(ri - alpha * sgn[i]))
        if beta[i] * sgn[i] < 0.0:
            dev = np.inf
    return m, steps, worst <= thr and dev <= alpha * kkt_tol, ar


@njit(cache=True, nogil=True, fastmath=True)
def _corr_rows(X, D, r0, r1, out):
    """``out[r - r0] = D @ X[r]`` for rows ``r0 <= r < r1`` (``X`` finite), in
    register tiles of 4 rows x 2 atoms, each a dot product over the features
    (vectorised): as fast as MKL's GEMM on one core for patch-sized problems,
    and the correlations of a chunk stay in the worker's cache."""
    K, P = D.shape
    zero = X[r0, 0] - X[r0, 0]
    r = r0
    while r + 4 <= r1:
        x0 = X[r]
        x1 = X[r + 1]
        x2 = X[r + 2]
        x3 = X[r + 3]
        o = r - r0
        for k in range(0, K - 1, 2):
            d0 = D[k]
            d1 = D[k + 1]
            a00 = zero
            a01 = zero
            a10 = zero
            a11 = zero
            a20 = zero
            a21 = zero
            a30 = zero
            a31 = zero
            for f in range(P):
                e0 = d0[f]
                e1 = d1[f]
                a00 += x0[f] * e0
                a01 += x0[f] * e1
                a10 += x1[f] * e0
                a11 += x1[f] * e1
                a20 += x2[f] * e0
                a21 += x2[f] * e1
                a30 += x3[f] * e0
                a31 += x3[f] * e1
            out[o, k] = a00
            out[o, k + 1] = a01
            out[o + 1, k] = a10
            out[o + 1, k + 1] = a11
            out[o + 2, k] = a20
            out[o + 2, k + 1] = a21
            out[o + 3, k] = a30
            out[o + 3, k + 1] = a31
        r += 4
    for q in range(r0, r1):  # an odd last atom of the tiled rows; the rows left over
        for k in range(K - K % 2 if q < r else 0, K):
            a = zero
            for f in range(P):
                a += X[q, f] * D[k, f]
            out[q - r0, k] = a


@njit(cache=True, parallel=True, nogil=True)
def _lars_batch(C, Dx, G, Gw, alpha, positive, max_steps, kkt_tol, gmax, eps_w, window_min,
                max_active, idx_out, val_out, nnz, n_steps, ok, fpart, n_workers, chunk, counter):
    n = C.shape[0]
    fused = Dx.shape[0] > 0  # C holds the rows X: correlations computed per chunk
    K = G.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    # one workspace per worker; the workers take chunks of rows from a shared
    # atomic counter (rows differ in cost, and on a shared machine a core can
    # stall: a static split would leave the other waiting)
    for _ in prange(n_workers):
        corr = np.empty(K, dtype=Gw.dtype)
        u = np.empty(K, dtype=Gw.dtype)
        wf = np.empty(max_active, dtype=Gw.dtype)
        skip = np.empty(K, dtype=np.uint8)
        flag = np.zeros(((K + 31) // 32) * 32, dtype=np.uint8)  # zero padding
        cand = np.empty(K, dtype=np.int64)
        words = np.empty(flag.shape[0] // 32, dtype=np.int64)
        tcand = np.empty(K)
        act = np.empty(max_active, dtype=np.int64)
        sgn = np.empty(max_active)
        beta = np.empty(max_active)
        w = np.empty(max_active)
        rhs = np.empty(max_active)
        Lc = np.empty((max_active, max_active))
        dinv = np.empty(max_active)
        z = np.empty(max_active)
        res = np.empty(K)
        c_row = np.empty(K)
        sc = np.empty(14, dtype=Gw.dtype)
        flag2 = np.zeros_like(flag)
        words2 = np.empty_like(words)
        tlo = np.empty(K, dtype=Gw.dtype)
        thi = np.empty(K, dtype=Gw.dtype)
        tdrop = np.empty(max_active)
        cbuf = np.empty((chunk if fused else 0, K), dtype=C.dtype)
        while True:
            q = _fetch_add(counter, 1)
            if q >= n_chunks:
                break
            r0 = q * chunk
            r1 = min(n, r0 + chunk)
            if fused:
                _corr_rows(C, Dx, r0, r1, cbuf)
            for r in range(r0, r1):
                if fused:
                    for k in range(K):
                        c_row[k] = cbuf[r - r0, k]
                else:
                    for k in range(K):
                        c_row[k] = C[r, k]
                m, s, good, ar = _lars_one(c_row, G, Gw, alpha, positive, max_steps, kkt_tol,
                                           gmax, eps_w, window_min, corr, u, skip, act, sgn, beta,
                                           w, wf, rhs, Lc, dinv, z, flag, words, cand, tcand, res,
                                           sc, flag2, words2, tlo, thi, tdrop)
                n_steps[r] = s
                ok[r] = good
                # objective minus 0.5 ||x||^2: -a.c + 0.5 a G a + alpha |a|_1, with
                # a G a = a.(c - r) (r from the certificate)
                ac = 0.0
                l1 = 0.0
                for i in range(m):
                    ac += beta[i] * c_row[act[i]]
                    l1 += abs(beta[i])
                fpart[r] = -0.5 * (ac + ar) + alpha * l1
                # the support in increasing atom order (insertion sort: m is small)
                for i in range(1, m):
                    a_i = act[i]
                    b_i = beta[i]
                    j = i - 1
                    while j >= 0 and act[j] > a_i:
                        act[j + 1] = act[j]
                        beta[j + 1] = beta[j]
                        j -= 1
                    act[j + 1] = a_i
                    beta[j + 1] = b_i
                # the non-zeros first (an exact zero, possible on an unpolished path
                # after a zero-length step, is overwritten), then the padding
                c = 0
                for i in range(m):
                    idx_out[r, c] = act[i]
                    val_out[r, c] = beta[i]
                    c += val_out[r, c] != 0
                nnz[r] = c
                for i in range(c, idx_out.shape[1]):
                    idx_out[r, i] = 0
                    val_out[r, i] = 0.0


def _renamed(fn, name):
    """``fn`` under another name. numba names a function's cache files after its
    qualified name and first line, and its index does not record ``parallel``:
    two compilations of one function share the entries, so whichever compiled
    first (e.g. the serial one) was loaded for the other."""
    g = FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    g.__qualname__ = name
    return g


# the same row loop without the thread pool: for one thread, and for calls from
# worker threads (Dask, joblib threading) whose pools already use the cores
_lars_batch_serial = njit(cache=True, nogil=True)(_renamed(_lars_batch.py_func,
                                                           "_lars_batch_serial"))


# uncertified rows of a call from which the float32-pass kernel retries them
# with float64 passes (fewer: left to the caller's fallback)
_RETRY_MIN_ROWS = 64


def lars_lasso_rows(
    C, G, alpha, positive=False, max_steps=None, kkt_tol=1e-6, n_threads=None, rank_bound=None,
    return_objective=False, fresh_certificate=False, pass_dtype=np.float32, dictionary=None,
    window_min=None, gram_pass=None,
):
    """Exact lasso codes of every row of ``C`` (numpy in, numpy out).

    Parameters
    ----------
    C : ndarray of shape (n, K), float32 or float64
        Correlations ``X D^T``; or, with ``dictionary``, the rows ``X`` (n, P).
    G : ndarray of shape (K, K), float64
        Gram matrix ``D D^T``.
    alpha : float
    positive : bool
    max_steps : int, optional
        Homotopy steps per row (default ``8 K``).
    kkt_tol : float
        Relative slack of the KKT certificate ``|c - a G| <= alpha (1 + kkt_tol)``.
    n_threads : int, optional
        Threads for the row loop (default: numba's setting).
    rank_bound : int, optional
        An upper bound on the rank of ``G`` (the number of features); sizes the
        per-thread Cholesky workspace (default ``min(K, 1024)``; a row whose
        support would outgrow it is reported as not certified).
    fresh_certificate : bool
        Always check the KKT conditions on a freshly computed residual
        ``c - G_A a_A`` (float64). By default that pass is skipped for rows whose
        largest inactive path correlation clears ``alpha`` by more than the polish's
        change times ``max |G|`` plus a bound on the rounding drift of the
        incremental updates (nearly all rows); the result is the same either way.
    pass_dtype : {np.float32, np.float64}
        Precision of the path's length-``K`` passes (the correlations ``c`` and
        ``u = G[:, A] w``, the step lengths). The path only has to find the
        support: the coefficients come from the float64 face solve and every row
        is certified against the float64 KKT conditions, so float32 passes (half
        the memory traffic: ``G`` in float32 stays in L2) give the same codes as
        float64 ones up to the certificate's tolerance. Rows that the float32 path
        cannot certify (a near-tie that float32 rounding ordered wrongly) are
        solved again with float64 passes when there are at least
        ``_RETRY_MIN_ROWS`` of them (a dictionary with nearly collinear atoms);
        the odd one is left uncertified for the caller's fallback (the active-set
        method in :func:`~skdict.solvers.exact.lasso_exact_compact`): the
        float64-pass kernel takes ~8 s to compile, which a fit should not pay in
        the middle of its run for one row in ten thousand.
    dictionary : ndarray of shape (K, P), optional
        The atoms, of ``C``'s dtype, when ``C`` holds the (finite) rows ``X``:
        each worker computes the correlations of its chunk of rows itself (in
        its cache, in parallel, with no ``(n, K)`` matrix in memory).
    window_min : int, optional
        Flagged atoms above which a step brackets their join times before the
        exact test (default ``_WINDOW_MIN``; 0: every step, ``K``: never). The
        codes do not depend on it; tests compare the two ways.
    gram_pass : ndarray of shape (K, K), optional
        ``G`` rounded to ``pass_dtype``, when the caller keeps it (computed per
        call otherwise).

    Returns
    -------
    indices : int64 ndarray (n, w), values : ndarray (n, w) of C's dtype
        Each row's non-zeros in increasing atom order, then padding of index 0
        and value 0 (``w`` is the largest support; no zero comes before a
        non-zero in a row).
    steps : int64 ndarray (n,)
        Homotopy steps of each row (of the float64 retry for retried rows).
    ok : bool ndarray (n,)
        Whether the row passed the KKT check.
    fpart : float64 ndarray (n,)
        Only with ``return_objective=True``: each row's objective minus
        ``0.5 ||x||^2``, i.e. ``-a.c + 0.5 a G a + alpha ||a||_1`` (from the
        certificate's residual, no extra pass).
    """
    C = np.ascontiguousarray(C)
    G = np.ascontiguousarray(G, dtype=np.float64)
    pass_dtype = np.dtype(pass_dtype)
    if pass_dtype not in (np.float32, np.float64):
        raise ValueError(f"pass_dtype must be float32 or float64, got {pass_dtype}.")
    n, K = C.shape[0], G.shape[0]
    if dictionary is None:
        Dx = C[:0, :0]  # (an empty dictionary: C holds the correlations)
        if C.shape[1] != K:
            raise ValueError(f"C has {C.shape[1]} columns but G is {K} x {K}.")
    else:
        Dx = np.ascontiguousarray(dictionary, dtype=C.dtype)
        if Dx.shape != (K, C.shape[1]) or K == 0:
            raise ValueError(f"dictionary must have shape (K, n_features) = ({K}, {C.shape[1]}), "
                             f"got {Dx.shape}.")
    max_active = int(min(K, 1024 if rank_bound is None else rank_bound)) + 1
    max_steps = 8 * K if max_steps is None else int(max_steps)
    nt = numba.get_num_threads() if n_threads is None else int(n_threads)
    window_min = _WINDOW_MIN if window_min is None else int(window_min)
    opts = (float(alpha), bool(positive), max_steps, float(kkt_tol), window_min, max_active, nt,
            fresh_certificate)
    if gram_pass is None:
        Gw = G.astype(pass_dtype, copy=False)
    else:
        Gw = np.ascontiguousarray(gram_pass)
        if Gw.dtype != pass_dtype or Gw.shape != G.shape:
            raise ValueError(f"gram_pass must be G in {pass_dtype} ({K} x {K}), got "
                             f"{Gw.dtype} {Gw.shape}.")
    idx, val, nnz, steps, ok, fpart = _run(C, Dx, G, Gw, *opts)
    bad = np.flatnonzero(~ok)
    if pass_dtype != np.float64 and bad.size >= _RETRY_MIN_ROWS:
        i2, v2, nnz2, s2, ok2, f2 = _run(np.ascontiguousarray(C[bad]), Dx, G, G, *opts)
        w2 = i2.shape[1]
        idx[bad] = 0
        val[bad] = 0
        idx[bad, :w2] = i2
        val[bad, :w2] = v2
        nnz[bad], steps[bad], ok[bad], fpart[bad] = nnz2, s2, ok2, f2
    w = int(nnz.max()) if n else 0
    if return_objective:
        return idx[:, :w], val[:, :w], steps, ok, fpart
    return idx[:, :w], val[:, :w], steps, ok


def _run(C, Dx, G, Gw, alpha, positive, max_steps, kkt_tol, window_min, max_active, nt,
         fresh_certificate):
    """One kernel call: every row of ``C`` with passes in ``Gw``'s dtype."""
    n, K = C.shape[0], G.shape[0]
    idx = np.empty((n, max_active), dtype=np.int64)  # the kernel writes the padding
    val = np.empty((n, max_active), dtype=C.dtype)
    nnz = np.zeros(n, dtype=np.int64)
    steps = np.zeros(n, dtype=np.int64)
    ok = np.ones(n, dtype=np.bool_)
    fpart = np.zeros(n)
    if n:
        gmax = float(np.abs(np.diag(G)).max()) if K else 0.0  # max |G_ij| (G is a Gram)
        eps_w = np.inf if fresh_certificate else float(np.finfo(Gw.dtype).eps)
        args = (C, Dx, G, Gw, alpha, positive, max_steps, kkt_tol, gmax, eps_w, window_min,
                max_active, idx, val, nnz, steps, ok, fpart)
        nt = max(1, min(nt, numba.config.NUMBA_NUM_THREADS, n))
        # rows per chunk: ~1/16 of a thread's share, 16 to 64 rows (the fused
        # correlations of a chunk, chunk x K, stay within ~256 KB)
        cap = max(4, min(64, (1 << 18) // max(1, K * C.itemsize)))
        counter = np.zeros(1, dtype=np.int64)
        if nt == 1 or threading.current_thread() is not threading.main_thread():
            _lars_batch_serial(*args, 1, cap, counter)
        else:
            prev = numba.get_num_threads()
            # numba's "omp" layer shares torch's OpenMP runtime: setting its thread
            # count also sets torch's, so a caller's torch.set_num_threads is put back
            torch_threads = torch.get_num_threads()
            try:
                numba.set_num_threads(nt)
                _lars_batch(*args, nt, max(min(16, cap), min(cap, n // (16 * nt))), counter)
            finally:
                numba.set_num_threads(prev)
                if torch.get_num_threads() != torch_threads:
                    torch.set_num_threads(torch_threads)
    return idx, val, nnz, steps, ok, fpart
