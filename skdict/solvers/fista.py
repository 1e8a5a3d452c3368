"""FISTA with adaptive restart for batched lasso coding against a dictionary operator."""

from __future__ import annotations

import torch

from ..penalties import L1
from ._result import SolverResult
from .ista import effective_tol, relative_gap
from .registry import register

__all__ = ["fista"]


def fista(
    C,
    op,
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

    Same parameters as :func:`skdict.solvers.ista`, plus ``restart`` to reset a
    row's momentum when its update direction stops agreeing with the
    proximal-gradient step.
    """
    L = float(op.lipschitz() if L is None else L)
    pen = L1(alpha, positive)
    tol = effective_tol(tol, C.dtype)
    A = torch.zeros_like(C) if a0 is None else a0.clone()
    ia = torch.arange(C.shape[0], device=C.device)  # rows still iterating
    a, c = A.clone(), C
    y = a.clone()
    t = torch.ones(C.shape[0], 1, dtype=C.dtype, device=C.device)
    history = []
    it = 0
    for it in range(1, max_iter + 1):
        a_new = pen.prox(y - (op.normal(y) - c) / L, 1.0 / L)
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
            rel = relative_gap(a, c, op, xnorm2[ia], alpha, positive)
            history.append(float(rel.max()) if rel.numel() else 0.0)
            A[ia] = a
            keep = rel > tol
            ia, a, c, y, t = ia[keep], a[keep], c[keep], y[keep], t[keep]
            if ia.numel() == 0:
                break
    A[ia] = a
    return SolverResult(A, it, history, ia.numel() == 0)


@register("fista", requires=("operator",), kind="iterative")
def _encode(C, op, *, alpha, xnorm2, positive=False, max_iter=1000, tol=1e-5, init=None):
    return fista(C, op, alpha, xnorm2=xnorm2, a0=init, positive=positive, max_iter=max_iter,
                 tol=tol)
