"""The exact lasso's torch method: an active-set (feature-sign) method in compact
form, certified by the KKT conditions.

Every row keeps its support as a short list of atom indices and values (a
``(rows, m)`` block, ``m`` the largest support of the chunk, padded with a dummy
atom). One iteration, for the rows not yet certified:

1. rows sitting at the optimum of their current face compute their residual
   correlations ``r = c - a G`` with one embedding-bag gather over the support
   (``O(m K)`` per row instead of a dense ``O(K^2)`` product; ``c`` is folded
   into the same gather). A row whose off-support correlations satisfy
   ``|r_j| <= alpha`` is certified optimal and frozen. Otherwise the most
   positive and the most negative violators join the support, with the sign of
   their correlation (one, the largest, for ``positive``);
2. the *face solve*: with support ``S`` and signs ``s``, the minimiser of the
   lasso on that orthant face is ``z_S = G_SS^{-1} (c_S - alpha s_S)`` (batched
   Cholesky of the small padded ``G_SS`` blocks, always in float64);
3. an exact line search of the true (piecewise quadratic) lasso objective on the
   segment from the current point to ``z``, through the sign changes; the
   objective never increases. When ``z`` keeps its signs, the row moves to ``z``
   and is again at a face optimum; otherwise it lands on a point of another
   face and re-solves there before looking for new atoms. A row whose new atoms
   made no progress retries with a single atom, for which descent is guaranteed
   (Lee et al., 2007, "Efficient sparse coding algorithms").

Rows are processed in chunks and leave the working set once certified, so the
work tracks the hard rows only, every row's result is independent of the other
rows, and no Python loop runs over rows. For float32 data the residual search
runs in float64 as well (float32 residuals are too coarse to certify
coherent dictionaries); only the output is cast back.

It is also the reference the compiled homotopy (:mod:`skdict.solvers._kernels.lars`)
is tested against, and finishes the rows that kernel cannot certify.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .omp import _spd_solve

__all__ = ["lasso_active_set"]


def _line_search(val, d, g0, h, alpha, positive):
    """Minimiser ``t`` in [0, 1] of ``phi(t) = f(val + t d)`` (the lasso objective
    on the segment; ``g0``/``h`` are the slope and curvature of its smooth part)
    and the breakpoints ``tb`` where coordinates reach zero."""
    inf = torch.full_like(val, float("inf"))
    one = torch.ones_like(d)
    if positive:
        cross = d < 0
        tb = torch.where(cross, -val / torch.where(cross, d, one), inf)
        tmax = tb.amin(1).clamp(max=1.0)
        base = g0 + alpha * d.sum(1)
        return torch.minimum((-base / h).clamp_min(0), tmax), tb
    cross = (val * d) < 0
    tb = torch.where(cross, -val / torch.where(cross, d, one), inf)
    sig0 = torch.where(val != 0, torch.sign(val), torch.sign(d))
    base = g0 + alpha * (sig0 * d).sum(1)
    # phi' is piecewise linear and non-decreasing: base + t h + jumps 2 alpha |d_j|
    # at each crossing t_j; find the first segment where it turns non-negative
    ts, order = torch.sort(tb, dim=1)
    jump = torch.where(torch.isfinite(ts), (2 * alpha) * d.abs().gather(1, order), 0.0)
    zcol = torch.zeros_like(g0).unsqueeze(1)
    J = torch.cat([zcol, jump.cumsum(1)], 1)
    tsc = ts.clamp(max=1.0)
    left = torch.cat([zcol, tsc], 1)
    right = torch.cat([tsc, zcol + 1], 1)
    ok = (base[:, None] + J + right * h[:, None]) >= 0
    ok[:, -1] = True
    k = ok.to(torch.int8).argmax(1, keepdim=True)
    t = -(base + J.gather(1, k).squeeze(1)) / h
    t = torch.minimum(t, right.gather(1, k).squeeze(1))
    t = torch.maximum(t, left.gather(1, k).squeeze(1))
    return t, tb


def _compact_from_dense(a, K):
    """(idx, val) of the non-zeros of dense rows ``a`` (pads: index K, value 0)."""
    nz = a != 0
    m = int(nz.sum(1).max()) if a.shape[0] else 0
    order = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :m]
    val = a.gather(1, order)
    idx = torch.where(val != 0, order, K)
    return idx, val


def lasso_active_set(C, G, alpha, *, a0=None, positive=False, max_iter=200, tol=1e-7,
                     chunk_size=2048, gram64=None):
    """The batched torch active-set method (any device): ``(codes, n_iter, history,
    converged)``; parameters as :func:`skdict.solvers.lasso_exact`."""
    n, K = C.shape
    dtype, dev = C.dtype, C.device
    alpha = float(alpha)
    kkt_tol = max(float(tol), 100 * torch.finfo(dtype).eps)
    # extended Gram: a dummy atom K (unit diagonal, no correlation) pads supports
    Ge = torch.zeros(K + 1, K + 1, dtype=dtype, device=dev)
    Ge[:K, :K] = G
    Ge[K, K] = 1
    if gram64 is not None:
        Ge = Ge.double()
        Ge[:K, :K] = gram64.to(device=dev, dtype=torch.float64)
    G64 = Ge.double().reshape(-1)
    out = torch.zeros_like(C)
    history: list[int] = []
    n_iter = 0
    converged = True
    for s0 in range(0, n, max(1, int(chunk_size))):
        s1 = min(n, s0 + max(1, int(chunk_size)))
        init = None if a0 is None else a0[s0:s1]
        codes, it, ok, hist = _solve_chunk(
            C[s0:s1], Ge, G64, alpha, init, positive, max_iter, kkt_tol
        )
        out[s0:s1] = codes
        n_iter = max(n_iter, it)
        converged &= ok
        for i, h in enumerate(hist):
            if i < len(history):
                history[i] += h
            else:
                history.append(h)
    return out, n_iter, history, converged


def _solve_chunk(c, Ge, G64, alpha, a0, positive, max_iter, kkt_tol):
    nb, K = c.shape
    dtype, dev = c.dtype, c.device
    K1 = K + 1
    # embedding table: atoms (rows of the extended Gram) then the chunk's own
    # correlations, so that r = c - a G is a single gather with weights (-a, 1)
    c64 = torch.cat([c, c.new_zeros(nb, 1)], 1).double()
    table = torch.cat([Ge.double(), c64], 0)
    thr = alpha * (1 + kkt_tol)
    cmax = float(c.abs().max()) if nb else 0.0
    thr_abs = max(thr, 0.0) + 10 * torch.finfo(torch.float64).eps * cmax
    rows = torch.arange(nb, device=dev)
    if a0 is None:
        idx = torch.zeros(nb, 0, dtype=torch.long, device=dev)
        val = torch.zeros(nb, 0, dtype=torch.float64, device=dev)
    else:
        idx, val = _compact_from_dense(a0.to(dtype), K)
        val = val.double()
    # rows whose point is the optimum of its face (checked for new atoms)
    at_opt = torch.ones(nb, dtype=torch.bool, device=dev)
    if a0 is not None:
        at_opt = (idx == K).all(1)
    single = torch.zeros(nb, dtype=torch.bool, device=dev)
    out = torch.zeros(nb, K1, dtype=dtype, device=dev)
    history = []
    it = 0
    done_all = False
    for _ in range(max_iter):
        it += 1
        na, m = idx.shape
        # ---- 1. residual correlations and certificate for rows at a face optimum
        cand = torch.full((na, 2), K, dtype=torch.long, device=dev)
        certified = torch.zeros(na, dtype=torch.bool, device=dev)
        oi = at_opt.nonzero().squeeze(1)
        if oi.numel():
            bag = torch.cat([idx.index_select(0, oi), (K1 + rows.index_select(0, oi))[:, None]], 1)
            w = torch.cat([-val.index_select(0, oi), c64.new_ones(oi.numel(), 1)], 1)
            r = F.embedding_bag(bag, table, per_sample_weights=w, mode="sum")
            vmax, jmax = r.max(1)
            if positive:
                viol = vmax > thr_abs
                jn = torch.where(viol, jmax, K)[:, None]
                sn = torch.ones_like(jn, dtype=torch.float64)
            else:
                vmin, jmin = r.min(1)
                vp, vn = vmax > thr_abs, -vmin > thr_abs
                jn = torch.stack([torch.where(vp, jmax, K), torch.where(vn, jmin, K)], 1)
                sn = torch.stack([torch.ones_like(vmax), -torch.ones_like(vmax)], 1).double()
                # the single-atom retry keeps only the larger violation
                keep_p = vmax >= -vmin
                sgl = single.index_select(0, oi)
                jn[:, 1] = torch.where(sgl & keep_p, K, jn[:, 1])
                jn[:, 0] = torch.where(sgl & ~keep_p, K, jn[:, 0])
                viol = vp | vn
            # an atom already in the support is never added twice (rounding)
            if m:
                inS = (jn[:, :, None] == idx.index_select(0, oi)[:, None, :]).any(2)
                jn = torch.where(inS, K, jn)
            # certified: no violator, or only rounding-level ones already in S
            cert_o = ~viol | (jn == K).all(1)
            certified[oi] = cert_o
            if jn.shape[1] == 1:
                jn = torch.cat([jn, torch.full_like(jn, K)], 1)
                sn = torch.cat([sn, sn], 1)
            cand[oi] = jn
            sgn_new = torch.zeros(na, 2, dtype=torch.float64, device=dev)
            sgn_new[oi] = torch.where(jn == K, 0.0, sn)
        else:
            sgn_new = torch.zeros(na, 2, dtype=torch.float64, device=dev)
        if bool(certified.any()):
            ci = certified.nonzero().squeeze(1)
            if m:
                rr = rows.index_select(0, ci)[:, None].expand(-1, m)
                out.index_put_((rr, idx.index_select(0, ci)), val.index_select(0, ci).to(dtype))
            keep = (~certified).nonzero().squeeze(1)
            rows, idx, val, at_opt, single, cand, sgn_new = (
                t_.index_select(0, keep) for t_ in (rows, idx, val, at_opt, single, cand, sgn_new)
            )
            na = rows.numel()
        history.append(na)
        if na == 0:
            done_all = True
            break
        # ---- 2. face solve on support + new atoms (float64)
        idx2 = torch.cat([idx, cand], 1)
        val2 = torch.cat([val, val.new_zeros(na, 2)], 1)
        sg2 = torch.cat([torch.sign(val), sgn_new], 1)
        lin = (idx2 * K1).unsqueeze(2) + idx2.unsqueeze(1)
        Gss = G64.index_select(0, lin.reshape(-1)).reshape(lin.shape)
        cS = c64.index_select(0, rows).gather(1, idx2)
        pad = idx2 == K
        z = torch.where(pad, 0.0, _spd_solve(Gss, cS - alpha * sg2))
        # ---- 3. exact line search toward z
        d = z - val2
        h = (d * torch.bmm(Gss, d.unsqueeze(2)).squeeze(2)).sum(1)
        h = h.clamp_min(torch.finfo(torch.float64).tiny)
        g0 = ((torch.bmm(Gss, val2.unsqueeze(2)).squeeze(2) - cS) * d).sum(1)
        t, tb = _line_search(val2, d, g0, h, alpha, positive)
        # z is the face optimum with the expected signs: move there exactly
        consistent = ((torch.sign(z) == sg2) | pad).all(1) & ~(tb < 1).any(1)
        t = torch.where(consistent, 1.0, t)
        new = torch.where(tb == t[:, None], 0.0, val2 + t[:, None] * d)
        new = torch.where(consistent[:, None], z, new)
        had_add = (cand != K).any(1)
        stuck = (t <= 0) & had_add & ~consistent
        at_opt = consistent | stuck
        single = stuck
        # ---- compact the supports
        nz = new != 0
        mn = int(nz.sum(1).max())
        order = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :mn]
        val = new.gather(1, order)
        idx = torch.where(val != 0, idx2.gather(1, order), K)
    if not done_all and rows.numel() and idx.shape[1]:
        rr = rows[:, None].expand(-1, idx.shape[1])
        out.index_put_((rr, idx), val.to(dtype))
    return out[:, :K], it, done_all, history
