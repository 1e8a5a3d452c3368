"""The Locally Competitive Algorithm (Rozell, Johnson, Baraniuk & Olshausen 2008)."""

from __future__ import annotations

import torch

from ._result import SolverResult
from .ista import effective_tol
from .lipschitz import power_iteration
from .objectives import lasso_duality_gap
from .thresholds import threshold as _threshold

__all__ = ["lca"]


def lca(
    C,
    G,
    alpha,
    *,
    xnorm2=None,
    tau=None,
    threshold="soft",
    positive=False,
    max_iter=1000,
    tol=1e-6,
    u0=None,
    L=None,
    check_every=10,
):
    """Discretised LCA dynamics, batched over rows.

    Membrane potentials ``u`` follow Rozell et al.'s ODE with unit time steps::

        u <- u + (1 / tau) * (b - u - a (G - I)),     a = T_alpha(u)

    where ``b = D x`` (the rows of ``C``), ``G = D D^T`` and ``T_alpha`` the
    soft (lasso) or hard (L0) threshold. For the soft threshold the fixed points
    are exactly the lasso solutions: at a fixed point ``u - a = alpha sign(a)``
    on the support, so ``b - a G = alpha sign(a)`` (the KKT conditions).

    Parameters
    ----------
    C, G : Tensors
        ``X @ D.T`` and ``D @ D.T``.
    alpha : float
        Threshold (the L1 weight for the soft threshold).
    xnorm2 : Tensor (n,), optional
        Squared norms of the rows of ``X``; with the soft threshold it enables the
        duality-gap stopping rule.
    tau : float, optional
        Time constant in units of the step. ``None`` uses ``tau = L`` (largest
        eigenvalue of ``G``), the fastest setting with a stable discretisation.
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
    if tau is None:
        tau = L if L is not None else power_iteration(G)
    eta = 1.0 / float(tau)
    use_gap = threshold == "soft" and xnorm2 is not None
    tol_eff = effective_tol(tol, C.dtype) if use_gap else float(tol)
    U = torch.zeros_like(C) if u0 is None else u0.clone()
    ia = torch.arange(C.shape[0], device=C.device)  # rows still iterating
    u, c = U.clone(), C
    a = _threshold(u, alpha, threshold, positive)
    history = []
    it = 0
    for it in range(1, max_iter + 1):
        du = eta * (c - u - a @ G + a)
        u = u + du
        a = _threshold(u, alpha, threshold, positive)
        if it % check_every == 0 or it == max_iter:
            if use_gap:
                primal, gap = lasso_duality_gap(a, c, a @ G, xnorm2[ia], alpha, positive)
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
    A = _threshold(U, alpha, threshold, positive)
    return SolverResult(A, it, history, ia.numel() == 0, U)
