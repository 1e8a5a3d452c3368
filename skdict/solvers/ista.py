"""ISTA for batched lasso coding against a dictionary operator."""

from __future__ import annotations

import torch

from ..penalties import L1
from ._result import SolverResult
from .objectives import lasso_duality_gap
from .registry import register

__all__ = ["ista", "effective_tol", "relative_gap"]


def effective_tol(tol: float, dtype: torch.dtype) -> float:
    """The relative duality-gap tolerance a dtype can actually certify.

    Gaps are computed in float64 from quantities rounded to ``dtype``; in float32
    relative gaps below ~1e-6 are rounding noise, so the tolerance is floored at
    ``20 * eps(dtype)``.
    """
    return max(float(tol), 20 * torch.finfo(dtype).eps)


def relative_gap(A, C, op, xnorm2, alpha, positive):
    """Per-row relative duality gap (gap / primal) of the lasso at ``A``."""
    primal, gap = lasso_duality_gap(A, C, op.normal(A), xnorm2, alpha, positive)
    return gap / primal.clamp_min(1e-300)


def ista(
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
    check_every=10,
):
    """Iterative shrinkage-thresholding for ``min_a 0.5||x - forward(a)||^2 + alpha||a||_1``.

    Parameters
    ----------
    C : Tensor (n, K)
        Correlations ``op.adjoint(X)`` (``X @ D.T`` for a dense dictionary).
    op : Operator
        The dictionary operator (:mod:`skdict.operators`); only ``normal`` and
        ``lipschitz`` are used.
    alpha : float
        L1 weight.
    xnorm2 : Tensor (n,) or None
        Squared row norms of ``X`` (for the duality gap). With None the solver
        runs exactly ``max_iter`` iterations.
    L : float, optional
        Lipschitz constant; ``op.lipschitz()`` if None.
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
    L = float(op.lipschitz() if L is None else L)
    pen = L1(alpha, positive)
    tol = effective_tol(tol, C.dtype)
    A = torch.zeros_like(C) if a0 is None else a0.clone()
    ia = torch.arange(C.shape[0], device=C.device)  # rows still iterating
    a, c = A, C
    history = []
    it = 0
    for it in range(1, max_iter + 1):
        a = pen.prox(a - (op.normal(a) - c) / L, 1.0 / L)
        if xnorm2 is not None and (it % check_every == 0 or it == max_iter):
            rel = relative_gap(a, c, op, xnorm2[ia], alpha, positive)
            history.append(float(rel.max()) if rel.numel() else 0.0)
            A[ia] = a
            keep = rel > tol
            ia, a, c = ia[keep], a[keep], c[keep]
            if ia.numel() == 0:
                break
    A[ia] = a
    return SolverResult(A, it, history, ia.numel() == 0)


@register("ista", requires=("operator",), kind="iterative")
def _encode(C, op, *, alpha, xnorm2, positive=False, max_iter=1000, tol=1e-5, init=None):
    return ista(C, op, alpha, xnorm2=xnorm2, a0=init, positive=positive, max_iter=max_iter,
                tol=tol)
