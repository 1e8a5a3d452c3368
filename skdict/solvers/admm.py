"""ADMM for batched lasso coding: the operator's own linear solve, relaxation and
residual balancing.

The splitting ``min 0.5 ||x - D a||^2 + alpha ||b||_1  s.t.  a = b`` (Boyd et al.
2011, Sec. 6.4) alternates a linear solve with ``D^T D + rho I``, a soft
threshold and a dual ascent step. For a convolutional dictionary the solve is
exact and cheap in the DFT domain (:meth:`skdict.operators.ConvOperator.solve_normal`,
the per-frequency Sherman-Morrison solve of Wohlberg 2016, "Efficient
algorithms for convolutional sparse representations"), which makes this the
CBPDN algorithm; a dense dictionary solves through its Gram matrix's
eigendecomposition, any other operator by conjugate gradients.
"""

from __future__ import annotations

import torch

from ._result import SolverResult
from .ista import effective_tol, relative_gap
from .registry import register

__all__ = ["admm"]


def admm(
    C,
    op,
    alpha,
    *,
    xnorm2,
    rho=None,
    a0=None,
    positive=False,
    max_iter=1000,
    tol=1e-6,
    relax=1.8,
    balance_every=10,
    check_every=10,
):
    """ADMM for ``min_a 0.5 ||x - forward(a)||^2 + alpha ||a||_1``, per row.

    Parameters
    ----------
    C : Tensor (n, K)
        Correlations ``op.adjoint(X)``.
    op : Operator
        Uses ``solve_normal`` (``(normal + rho I)^{-1}``) and ``normal``.
    alpha : float
    xnorm2 : Tensor (n,) or None
        Squared row norms of ``X`` for the duality gap; None runs ``max_iter``
        iterations.
    rho : float, optional
        Initial penalty; default ``50 * alpha + 1`` (sporco's ``ConvBPDN``
        default for images in [0, 1]). Residual balancing adapts it per row.
    a0 : Tensor (n, K), optional
        Warm start of the split (sparse) variable.
    positive : bool
    max_iter : int
    tol : float
        A row stops once the relative duality gap of its sparse iterate is
        below ``tol`` (floored by :func:`~skdict.solvers.ista.effective_tol`).
    relax : float, default=1.8
        Over-relaxation ``a_r = relax * a + (1 - relax) * b`` (1 turns it off).
    balance_every : int, default=10
        Every this many iterations, each row's ``rho`` is scaled by
        ``sqrt(r / s)`` (capped to [0.1, 10]) when its relative primal residual
        ``r`` and dual residual ``s`` differ by more than a factor 1.2 (the
        scaled dual variable is rescaled with it); 0 keeps ``rho`` fixed.
    check_every : int, default=10
        Evaluate the duality gap every this many iterations.

    Returns
    -------
    SolverResult
        ``codes`` is the sparse split variable; ``state`` is each row's final
        ``rho``.
    """
    tol = effective_tol(tol, C.dtype)
    n = C.shape[0]
    rho0 = 50.0 * float(alpha) + 1.0 if rho is None else float(rho)
    A = torch.zeros_like(C) if a0 is None else a0.clone()
    RHO = torch.full((n,), rho0, dtype=C.dtype, device=C.device)
    ia = torch.arange(n, device=C.device)
    c, y = C, A.clone()
    u = torch.zeros_like(C)
    x = None
    r = RHO.clone()
    tiny = torch.finfo(C.dtype).tiny
    history = []
    it = 0
    for it in range(1, max_iter + 1):
        rc = r[:, None]
        x = op.solve_normal(torch.sub(y, u).mul_(rc).add_(c), r, x0=x)
        # u + a_r, with the over-relaxed a_r = relax * x + (1 - relax) * y
        v = u.add_(x if relax == 1.0 else torch.lerp(y, x, relax))
        y_old = y
        y = _shrink(v, alpha / rc, positive)
        u = v.sub_(y)  # u + a_r - y
        if balance_every and it % balance_every == 0:
            xn, yn = x.norm(dim=1), y.norm(dim=1)
            rp = (x - y).norm(dim=1) / torch.maximum(xn, yn).clamp_min(tiny)
            rd = (y - y_old).norm(dim=1) / u.norm(dim=1).clamp_min(tiny)
            ratio = rp / rd.clamp_min(tiny)
            f = torch.where((ratio > 1.2) | (ratio < 1 / 1.2), ratio.sqrt().clamp(0.1, 10.0),
                            torch.ones_like(ratio))
            f = torch.where(torch.isfinite(f) & (rd > 0), f, torch.ones_like(f))
            r = r * f
            u = u / f[:, None]
        if xnorm2 is not None and (it % check_every == 0 or it == max_iter):
            rel = relative_gap(y, c, op, xnorm2[ia], alpha, positive)
            history.append(float(rel.max()) if rel.numel() else 0.0)
            A[ia] = y
            RHO[ia] = r
            keep = rel > tol
            if not bool(keep.all()):
                ia, c, y, u, x, r = ia[keep], c[keep], y[keep], u[keep], x[keep], r[keep]
                if ia.numel() == 0:
                    break
    A[ia] = y
    RHO[ia] = r
    return SolverResult(A, it, history, ia.numel() == 0, state=RHO)


def _shrink(v, t, positive):
    """Soft threshold with a per-row threshold ``t`` ``(n, 1)`` (two passes)."""
    if positive:
        return torch.clamp(v - t, min=0)
    return v - torch.clamp(v, min=-t, max=t)


@register("admm", requires=("operator",), kind="iterative")
def _encode(C, op, *, alpha, xnorm2, positive=False, max_iter=1000, tol=1e-5, init=None):
    return admm(C, op, alpha, xnorm2=xnorm2, a0=init, positive=positive, max_iter=max_iter,
                tol=tol)
