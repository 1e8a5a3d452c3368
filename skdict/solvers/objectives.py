"""Lasso objective and duality gap in Gram form (no need for X or D).

With ``C = X @ D.T`` (correlations, ``op.adjoint(X)``), ``AG = A @ G``
(``op.normal(A)``) and ``xnorm2 = ||x||^2`` per row, the per-row lasso objective
``0.5 ||x - a D||^2 + alpha ||a||_1`` is ``0.5 (xnorm2 - 2 a.c + a G a) +
alpha ||a||_1``.
"""

from __future__ import annotations

from ..penalties import L1

__all__ = ["lasso_objective", "lasso_duality_gap", "lasso_objective_dense"]


def lasso_objective(A, C, AG, xnorm2, alpha):
    """Per-row primal objective from the Gram quantities (``AG = A @ G``)."""
    quad = xnorm2 - 2 * (A * C).sum(1) + (A * AG).sum(1)
    return 0.5 * quad.clamp_min(0) + alpha * A.abs().sum(1)


def lasso_objective_dense(X, A, D, alpha):
    """Per-row primal objective computed from the residual ``X - A @ D``."""
    R = X - A @ D
    return 0.5 * (R * R).sum(1) + alpha * A.abs().sum(1)


def lasso_duality_gap(A, C, AG, xnorm2, alpha, positive=False):
    """Per-row (primal, gap) of the lasso at ``A``.

    The dual point is the residual ``r = x - a D`` scaled into the dual feasible
    set ``{theta: ||D theta||_inf <= alpha}`` (``max(D theta) <= alpha`` when
    ``positive``) by :meth:`skdict.penalties.L1.dual_scale`. Computed in float64
    for accuracy.
    """
    pen = L1(alpha, positive)
    A = A.double()
    C = C.double()
    AG = AG.double()
    xnorm2 = xnorm2.double()
    ac = (A * C).sum(1)
    rr = (xnorm2 - 2 * ac + (A * AG).sum(1)).clamp_min(0)  # ||r||^2
    primal = 0.5 * rr + pen.alpha * A.abs().sum(1)
    scale = pen.dual_scale(C - AG)  # C - AG = D r
    xr = xnorm2 - ac  # <x, r>
    # dual(theta) = 0.5 ||x||^2 - 0.5 ||x - theta||^2, theta = scale * r
    dual = scale * xr - 0.5 * scale**2 * rr
    gap = (primal - dual).clamp_min(0)
    return primal, gap
