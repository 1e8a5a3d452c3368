"""An exact batched lasso solver: support identification, then exact solves on
the support with a KKT certificate.

Each iteration, for every row not yet certified:

1. a proximal-gradient step (monotone descent; adds atoms that violate the KKT
   conditions and drops atoms pushed to zero);
2. the *face solve*: with support ``S`` and signs ``s`` of that point, the
   minimiser of the lasso restricted to the orthant face is
   ``z_S = G_SS^{-1} (c_S - alpha s_S)`` (one small Cholesky per row, batched
   and padded to the largest support in the batch);
3. a line search from the prox point toward ``z``, stopping where the first
   coordinate would change sign (that coordinate leaves the support). On the
   face the objective is a convex quadratic, so this step never increases it;
4. when no sign changed, ``z`` is the exact minimiser over its face and the row
   is certified optimal as soon as every off-support atom satisfies
   ``|c_j - (z G)_j| <= alpha`` (``<=`` for ``positive``).

Rows are removed from the working set once certified, so the cost tracks the
hard rows only. A few FISTA iterations first give a good support estimate.
"""

from __future__ import annotations

import torch

from ._result import SolverResult
from .ista import fista
from .lipschitz import power_iteration
from .omp import _spd_solve
from .thresholds import soft_threshold

__all__ = ["lasso_exact"]


def lasso_exact(
    C,
    G,
    alpha,
    *,
    xnorm2=None,
    L=None,
    a0=None,
    positive=False,
    max_iter=200,
    tol=1e-7,
    warm_iter=25,
):
    """Exact lasso codes ``argmin_a 0.5 ||x - a D||^2 + alpha ||a||_1``, batched.

    Parameters
    ----------
    C : Tensor (n, K)
        ``X @ D.T``.
    G : Tensor (K, K)
        ``D @ D.T``.
    alpha : float
    xnorm2 : Tensor (n,), optional
        Unused by the certificate (kept for a uniform solver signature).
    L : float, optional
        Largest eigenvalue of ``G``.
    a0 : Tensor (n, K), optional
        Warm start (e.g. the previous codes in dictionary learning); skips the
        FISTA warm-up.
    positive : bool
        Non-negative lasso.
    max_iter : int
        Maximum active-set iterations.
    tol : float
        Relative slack on the off-support KKT condition, floored at
        ``100 * eps(dtype)``.
    warm_iter : int
        FISTA iterations before the active-set phase when ``a0`` is None.

    Returns
    -------
    SolverResult
        ``history[i]`` is the number of rows not yet certified after iteration i;
        ``converged`` is True when every row is certified.
    """
    n, K = C.shape
    dtype = C.dtype
    if L is None:
        L = power_iteration(G)
    L = float(L)
    kkt_tol = max(float(tol), 100 * torch.finfo(dtype).eps)
    if a0 is not None:
        A = a0.clone()
    elif warm_iter > 0:
        A = fista(C, G, alpha, xnorm2=None, L=L, positive=positive, max_iter=warm_iter).codes
    else:
        A = torch.zeros_like(C)
    done = torch.zeros(n, dtype=torch.bool, device=C.device)
    # rows whose last face solve was blocked by a sign change re-solve on their
    # reduced support directly; the others take a proximal-gradient step first
    need_pg = torch.ones(n, dtype=torch.bool, device=C.device)
    history = []
    zero = torch.zeros((), dtype=dtype, device=C.device)
    it = 0
    for it in range(1, max_iter + 1):
        ia = (~done).nonzero().squeeze(1)
        if ia.numel() == 0:
            it -= 1
            break
        a = A[ia]
        c = C[ia]
        pg = need_pg[ia]
        a_pg = a.clone()
        if bool(pg.any()):
            pi = pg.nonzero().squeeze(1)
            ap_ = a[pi]
            a_pg[pi] = soft_threshold(ap_ - (ap_ @ G - c[pi]) / L, alpha / L, positive)
        S = a_pg != 0
        cnt = S.sum(1)
        m = int(cnt.max())
        na = ia.numel()
        if m > 0:
            order = torch.argsort((~S).to(torch.int8), dim=1, stable=True)[:, :m]
            valid = torch.arange(m, device=C.device)[None, :] < cnt[:, None]
            ap = a_pg.gather(1, order)
            sgn = torch.ones_like(ap) if positive else torch.sign(ap)
            sgn = torch.where(valid, sgn, zero)
            Gss = G[order[:, :, None], order[:, None, :]]
            vm = valid[:, :, None] & valid[:, None, :]
            eye = torch.eye(m, dtype=dtype, device=C.device)
            Gss = torch.where(vm, Gss, eye.expand_as(Gss))
            rhs = torch.where(valid, c.gather(1, order) - alpha * sgn, zero)
            z = torch.where(valid, _spd_solve(Gss, rhs), zero)
            viol = valid & (z * sgn <= 0)
            denom = torch.where(viol, ap - z, torch.ones_like(ap))
            tj = torch.where(viol, ap / denom, torch.full_like(ap, float("inf")))
            tstar = tj.min(1).values.clamp(max=1.0)
            new = ap + tstar[:, None] * (z - ap)
            block = viol & (tj <= tstar[:, None] * (1 + 1e-9))
            new = torch.where(block | ~valid, zero, new)
            a_new = torch.zeros(na, K, dtype=dtype, device=C.device).scatter_(1, order, new)
            full = ~viol.any(1)
        else:
            a_new = torch.zeros_like(a)
            full = torch.ones(na, dtype=torch.bool, device=C.device)
        if bool(full.any()):
            fi = full.nonzero().squeeze(1)
            r = c[fi] - a_new[fi] @ G
            off = a_new[fi] == 0
            if positive:
                v = r.masked_fill(~off, -float("inf")).amax(1)
            else:
                v = r.abs().masked_fill(~off, 0).amax(1)
            ok = v <= alpha * (1 + kkt_tol)
            done[ia[fi[ok]]] = True
        A[ia] = a_new
        need_pg[ia] = full
        history.append(int((~done).sum()))
    converged = bool(done.all())
    return SolverResult(A, it, history, converged)
