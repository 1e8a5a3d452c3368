"""Batched Orthogonal Matching Pursuit in Gram form (Rubinstein et al. 2008)."""

from __future__ import annotations

import torch

from ._result import SolverResult
from .registry import register

__all__ = ["omp"]


def _spd_solve(M, b):
    """Solve batched SPD systems, adding a tiny ridge to rank-deficient ones."""
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()):
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        scale = M.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)
        ridge = 1e3 * torch.finfo(M.dtype).eps * scale
        L, info = torch.linalg.cholesky_ex(M + ridge[:, None, None] * eye)
        if bool((info != 0).any()):
            return torch.linalg.lstsq(M, b.unsqueeze(-1)).solution.squeeze(-1)
    return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)


def omp(C, G, n_nonzero_coefs, *, xnorm2=None, tol=None, positive=False):
    """Greedy selection of up to ``n_nonzero_coefs`` atoms per row with a least
    squares refit on the selected atoms after every step.

    Parameters
    ----------
    C : Tensor (n, K)
        ``X @ D.T``.
    G : Tensor (K, K)
        ``D @ D.T``.
    n_nonzero_coefs : int
        Maximum number of atoms per row.
    xnorm2 : Tensor (n,), optional
        Squared row norms; needed for ``tol``.
    tol : float, optional
        Stop a row once its squared residual norm is at most ``tol`` (as in
        scikit-learn's ``orthogonal_mp_gram``).
    positive : bool
        Select only atoms with positive correlation and clip the refit at zero
        (a greedy heuristic, not NNLS).

    Returns
    -------
    SolverResult
        ``history`` holds the mean squared residual norm after each step when
        ``xnorm2`` is given.
    """
    n, K = C.shape
    s = min(int(n_nonzero_coefs), K)
    idx = torch.zeros(n, s, dtype=torch.long, device=C.device)
    active = torch.ones(n, dtype=torch.bool, device=C.device)
    count = torch.zeros(n, dtype=torch.long, device=C.device)
    coef = torch.zeros(n, 0, dtype=C.dtype, device=C.device)
    R = C.clone()
    chosen = torch.zeros(n, K, dtype=torch.bool, device=C.device)
    history = []
    rows = torch.arange(n, device=C.device)
    t = 0
    for t in range(s):
        score = R.clone() if positive else R.abs()
        score = score.masked_fill(chosen, -float("inf"))
        j = score.argmax(1)
        best = score.gather(1, j[:, None]).squeeze(1)
        # rows with no useful atom left stop here
        active = active & (best > 0 if positive else best > 0) & torch.isfinite(best)
        if not bool(active.any()):
            break
        idx[:, t] = torch.where(active, j, idx[:, t - 1] if t > 0 else j)
        chosen[rows[active], j[active]] = True
        count = count + active.long()
        sel = idx[:, : t + 1]
        valid = torch.arange(t + 1, device=C.device)[None, :] < count[:, None]
        Gss = G[sel[:, :, None], sel[:, None, :]]
        eye = torch.eye(t + 1, dtype=C.dtype, device=C.device)
        vm = valid[:, :, None] & valid[:, None, :]
        Gss = torch.where(vm, Gss, eye.expand_as(Gss))
        rhs = torch.where(valid, C.gather(1, sel), torch.zeros((), dtype=C.dtype, device=C.device))
        new_coef = _spd_solve(Gss, rhs)
        if positive:
            new_coef = new_coef.clamp_min(0)
        new_coef = torch.where(valid, new_coef, torch.zeros_like(new_coef))
        # keep old coefficients for rows that stopped
        old = torch.cat([coef, torch.zeros(n, 1, dtype=C.dtype, device=C.device)], 1)
        coef = torch.where(active[:, None], new_coef, old)
        R = C - torch.bmm(coef[:, None, :], G[sel]).squeeze(1)
        if xnorm2 is not None:
            res2 = (xnorm2 - (coef * C.gather(1, sel)).sum(1)).clamp_min(0)
            history.append(float(res2.mean()))
            if tol is not None:
                active = active & (res2 > tol)
                if not bool(active.any()):
                    t += 1
                    break
    else:
        t = s
    A = torch.zeros_like(C)
    if coef.shape[1]:
        sel = idx[:, : coef.shape[1]]
        valid = torch.arange(coef.shape[1], device=C.device)[None, :] < count[:, None]
        A.scatter_add_(1, sel, torch.where(valid, coef, torch.zeros_like(coef)))
    return SolverResult(A, int(t), history, True)


@register("omp", requires=("gram",), kind="greedy", problem="l0")
def _encode(C, op, *, xnorm2, n_nonzero_coefs=None, positive=False):
    # scikit-learn's default: a tenth of the features
    k = n_nonzero_coefs if n_nonzero_coefs is not None else max(1, op.n_features // 10)
    return omp(C, op.gram(), k, xnorm2=xnorm2, positive=positive)
