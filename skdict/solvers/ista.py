"""ISTA and FISTA (with adaptive restart) for batched lasso coding in Gram form."""

from __future__ import annotations

import torch

from ._result import SolverResult
from .lipschitz import power_iteration
from .objectives import lasso_duality_gap
from .thresholds import soft_threshold

__all__ = ["ista", "fista", "effective_tol"]


def effective_tol(tol: float, dtype: torch.dtype) -> float:
    """The relative duality-gap tolerance a dtype can actually certify.

    Gaps are computed in float64 from quantities rounded to ``dtype``; in float32
    relative gaps below ~1e-6 are rounding noise, so the tolerance is floored at
    ``20 * eps(dtype)``.
    """
    return max(float(tol), 20 * torch.finfo(dtype).eps)


def _prep(C, G, xnorm2, L):
    if L is None:
        L = power_iteration(G)
    return float(L)


def _rel_gap(A, C, G, xnorm2, alpha, positive):
    """Per-row relative duality gap (gap / primal)."""
    primal, gap = lasso_duality_gap(A, C, A @ G, xnorm2, alpha, positive)
    return gap / primal.clamp_min(1e-300)


def ista(
    C,
    G,
    alpha,
    *,
    xnorm2,
    L=None,
    a0=None,
    positive=False,
    max_iter=1000,
    tol=1e-6,
    check_every=10,
):
    """Iterative shrinkage-thresholding for ``min_a 0.5||x - aD||^2 + alpha||a||_1``.

    Parameters
    ----------
    C : Tensor (n, K)
        Correlations ``X @ D.T``.
    G : Tensor (K, K)
        Gram matrix ``D @ D.T``.
    alpha : float
        L1 weight.
    xnorm2 : Tensor (n,) or None
        Squared row norms of ``X`` (for the duality gap). With None the solver
        runs exactly ``max_iter`` iterations.
    L : float, optional
        Lipschitz constant (largest eigenvalue of ``G``); power iteration if None.
    a0 : Tensor (n, K), optional
        Warm start.
    positive : bool
        Constrain codes to be non-negative.
    max_iter : int
    tol : float
        A row stops (and is frozen) once its relative duality gap is below
        ``tol`` (floored by :func:`effective_tol`), so each row's result does
        not depend on the other rows of the batch.
    check_every : int
        Evaluate the gap every this many iterations.

    Returns
    -------
    SolverResult
    """
    L = _prep(C, G, xnorm2, L)
    tol = effective_tol(tol, C.dtype)
    A = torch.zeros_like(C) if a0 is None else a0.clone()
    ia = torch.arange(C.shape[0], device=C.device)  # rows still iterating
    a, c = A, C
    history = []
    it = 0
    for it in range(1, max_iter + 1):
        a = soft_threshold(a - (a @ G - c) / L, alpha / L, positive)
        if xnorm2 is not None and (it % check_every == 0 or it == max_iter):
            rel = _rel_gap(a, c, G, xnorm2[ia], alpha, positive)
            history.append(float(rel.max()) if rel.numel() else 0.0)
            A[ia] = a
            keep = rel > tol
            ia, a, c = ia[keep], a[keep], c[keep]
            if ia.numel() == 0:
                break
    A[ia] = a
    return SolverResult(A, it, history, ia.numel() == 0)


def fista(
    C,
    G,
    alpha,
    *,
    xnorm2,
    L=None,
    a0=None,
    positive=False,
    max_iter=1000,
    tol=1e-6,
    restart=True,
    check_every=10,
):
    """FISTA (Beck & Teboulle 2009) with gradient-based adaptive restart
    (O'Donoghue & Candes 2015), per row.

    Same parameters as :func:`ista`, plus ``restart`` to reset a row's momentum
    when its update direction stops agreeing with the proximal-gradient step.
    """
    L = _prep(C, G, xnorm2, L)
    tol = effective_tol(tol, C.dtype)
    A = torch.zeros_like(C) if a0 is None else a0.clone()
    ia = torch.arange(C.shape[0], device=C.device)  # rows still iterating
    a, c = A.clone(), C
    y = a.clone()
    t = torch.ones(C.shape[0], 1, dtype=C.dtype, device=C.device)
    history = []
    it = 0
    for it in range(1, max_iter + 1):
        a_new = soft_threshold(y - (y @ G - c) / L, alpha / L, positive)
        t_new = 0.5 * (1 + torch.sqrt(1 + 4 * t * t))
        if restart:
            # restart rows where (y - a_new) . (a_new - a) > 0
            bad = ((y - a_new) * (a_new - a)).sum(1, keepdim=True) > 0
            t_new = torch.where(bad, torch.ones_like(t_new), t_new)
            beta = torch.where(bad, torch.zeros_like(t), (t - 1) / t_new)
        else:
            beta = (t - 1) / t_new
        y = a_new + beta * (a_new - a)
        a, t = a_new, t_new
        if xnorm2 is not None and (it % check_every == 0 or it == max_iter):
            rel = _rel_gap(a, c, G, xnorm2[ia], alpha, positive)
            history.append(float(rel.max()) if rel.numel() else 0.0)
            A[ia] = a
            keep = rel > tol
            ia, a, c, y, t = ia[keep], a[keep], c[keep], y[keep], t[keep]
            if ia.numel() == 0:
                break
    A[ia] = a
    return SolverResult(A, it, history, ia.numel() == 0)
