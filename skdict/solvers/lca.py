"""The Locally Competitive Algorithm (Rozell, Johnson, Baraniuk & Olshausen 2008)."""

from __future__ import annotations

import torch

from ..penalties import penalty_for
from ._result import SolverResult
from .ista import effective_tol
from .objectives import lasso_duality_gap
from .registry import register

__all__ = ["lca"]


def lca(
    C,
    op,
    alpha,
    *,
    xnorm2=None,
    tau=None,
    threshold="soft",
    positive=False,
    max_iter=1000,
    tol=1e-6,
    u0=None,
    check_every=10,
):
    """Discretised LCA dynamics, batched over rows, against a dictionary operator.

    Membrane potentials ``u`` follow Rozell et al.'s ODE with unit time steps::

        u <- u + (1 / tau) * (b - u - normal(a) + a),     a = T_alpha(u)

    where ``b = op.adjoint(x)`` (the rows of ``C``), ``normal(a) = a G`` for a
    dense dictionary and ``T_alpha`` the prox of the penalty at unit step: the
    soft threshold (lasso, :class:`~skdict.penalties.L1`) or the hard threshold
    (:class:`~skdict.penalties.L0`). For the soft threshold the fixed points are
    exactly the lasso solutions: at a fixed point ``u - a = alpha sign(a)`` on
    the support, so ``b - a G = alpha sign(a)`` (the KKT conditions).

    Parameters
    ----------
    C : Tensor (n, K)
        ``op.adjoint(X)``.
    op : Operator
        Only ``normal`` and ``lipschitz`` are used.
    alpha : float
        Threshold (the L1 weight for the soft threshold).
    xnorm2 : Tensor (n,), optional
        Squared norms of the rows of ``X``; with the soft threshold it enables the
        duality-gap stopping rule.
    tau : float, optional
        Time constant in units of the step. ``None`` uses ``tau = op.lipschitz()``
        (largest eigenvalue of ``G``), the fastest setting with a stable
        discretisation.
    threshold : {"soft", "hard"}
    positive : bool
        Non-negative (rectified) activations.
    max_iter : int
    tol : float
        Per row: relative duality gap (soft threshold with ``xnorm2``), else the
        relative change ``||du|| / ||u||`` of the potentials. Converged rows
        are frozen, so results do not depend on the rest of the batch.
    u0 : Tensor, optional
        Warm-start potentials.

    Returns
    -------
    SolverResult
        ``state`` holds the final potentials ``u``.
    """
    pen = penalty_for(threshold, alpha, positive)
    if tau is None:
        tau = op.lipschitz()
    eta = 1.0 / float(tau)
    use_gap = threshold == "soft" and xnorm2 is not None
    tol_eff = effective_tol(tol, C.dtype) if use_gap else float(tol)
    U = torch.zeros_like(C) if u0 is None else u0.clone()
    ia = torch.arange(C.shape[0], device=C.device)  # rows still iterating
    u, c = U.clone(), C
    a = pen.prox(u, 1.0)
    history = []
    it = 0
    for it in range(1, max_iter + 1):
        du = eta * (c - u - op.normal(a) + a)
        u = u + du
        a = pen.prox(u, 1.0)
        if it % check_every == 0 or it == max_iter:
            if not bool(torch.isfinite(u).all()):
                raise ValueError(
                    f"LCA diverged (non-finite potentials after {it} iterations) with "
                    f"tau={float(tau):.3g}: the dynamics are stable only for tau above half "
                    f"the largest eigenvalue of the Gram matrix ({float(op.lipschitz()):.3g}); "
                    "use tau=None (that eigenvalue) or a larger tau."
                )
            if use_gap:
                primal, gap = lasso_duality_gap(a, c, op.normal(a), xnorm2[ia], alpha, positive)
                crit = gap / primal.clamp_min(1e-300)
            else:
                crit = du.norm(dim=1) / u.norm(dim=1).clamp_min(1e-30)
            history.append(float(crit.max()) if crit.numel() else 0.0)
            U[ia] = u
            keep = crit > tol_eff
            ia, u, c, a = ia[keep], u[keep], c[keep], a[keep]
            if ia.numel() == 0:
                break
    U[ia] = u
    A = pen.prox(U, 1.0)
    return SolverResult(A, it, history, ia.numel() == 0, U)


@register("lca", requires=("operator",), kind="iterative")
def _encode(C, op, *, alpha, xnorm2, positive=False, max_iter=1000, tol=1e-5, tau=None,
            threshold="soft", init=None):
    return lca(C, op, alpha, xnorm2=xnorm2, tau=tau, threshold=threshold, positive=positive,
               max_iter=max_iter, tol=tol, u0=init)
