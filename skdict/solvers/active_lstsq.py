"""Batched least squares restricted to a per-row active set of ``s`` atoms.

For each row ``x`` with active atoms ``D_S`` (``s x P``) this solves::

    min_a  0.5 * ||x - a @ D_S||^2 + alpha * ||a||_1     (a >= 0 if positive)

with ``alpha = 0`` and ``positive=False`` by a batched Cholesky solve of the
``s x s`` normal equations, and otherwise by cyclic coordinate descent on the
same ``s x s`` Gram system, warm-started from the clipped / shrunk
least-squares solution. Nothing of size ``(n, K)`` is formed: only the
gathered ``(n, s, P)`` atoms (in row chunks) and ``(n, s, s)`` Grams.
"""

from __future__ import annotations

import torch

from ._result import SolverResult

__all__ = ["active_gram", "active_lstsq"]


def active_gram(X: torch.Tensor, D: torch.Tensor, indices: torch.Tensor, *, chunk: int = 1024):
    """Per-row Gram ``G = D_S D_S^T`` (n, s, s) and right-hand side ``c = D_S x`` (n, s).

    On CPU a compiled loop reads the atoms in place
    (:func:`skdict.solvers._kernels.select.active_gram_rows`); elsewhere the
    atoms are gathered ``chunk`` rows at a time and multiplied in batch.
    """
    if (X.device.type == "cpu" and X.dtype == D.dtype
            and X.dtype in (torch.float32, torch.float64)):
        from ._kernels.select import active_gram_rows

        G, c = active_gram_rows(X.detach().contiguous().numpy(),
                                D.detach().contiguous().numpy(),
                                indices.contiguous().numpy())
        return torch.from_numpy(G), torch.from_numpy(c)
    return _active_gram_torch(X, D, indices, chunk)


def _active_gram_torch(X, D, indices, chunk):
    n, s = indices.shape
    G = torch.empty((n, s, s), dtype=X.dtype, device=X.device)
    c = torch.empty((n, s), dtype=X.dtype, device=X.device)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        Ds = D[indices[r0:r1]]  # (b, s, P)
        G[r0:r1] = Ds @ Ds.transpose(1, 2)
        c[r0:r1] = (Ds @ X[r0:r1, :, None])[..., 0]
    return G, c


def _spd_solve(G, c, ridge):
    if (G.device.type == "cpu" and G.dtype in (torch.float32, torch.float64)
            and c.dtype == G.dtype and not G.requires_grad and not c.requires_grad):
        from ._kernels.chol import ridge_cholesky_solve

        a, bad = ridge_cholesky_solve(G.contiguous().numpy(), c.contiguous().numpy(), ridge)
        a, bad = torch.from_numpy(a), torch.from_numpy(bad)
        if bool(bad.any()):  # the guarded torch path for the rows that failed
            a[bad] = _spd_solve_torch(G[bad], c[bad], ridge)
        return a
    return _spd_solve_torch(G, c, ridge)


def _spd_solve_torch(G, c, ridge):
    s = G.shape[-1]
    eye = torch.eye(s, dtype=G.dtype, device=G.device)
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(G.dtype).tiny)
    M = G + (ridge * scale)[:, None, None] * eye
    L, info = torch.linalg.cholesky_ex(M)
    bad = info != 0
    if bool(bad.any()):
        M2 = M[bad] + (1e3 * torch.finfo(G.dtype).eps * scale[bad] + 1e-30)[:, None, None] * eye
        L2, info2 = torch.linalg.cholesky_ex(M2)
        L[bad] = L2
        if bool((info2 != 0).any()):
            out = torch.cholesky_solve(c[..., None], L)[..., 0]
            rows = bad.nonzero(as_tuple=True)[0][info2 != 0]
            # non-finite systems stay NaN for the caller to report: LAPACK's
            # least squares fails on them with an internal assertion
            finite = torch.isfinite(G[rows]).flatten(1).all(1) & torch.isfinite(c[rows]).all(1)
            out[rows[~finite]] = float("nan")
            rows = rows[finite]
            out[rows] = torch.linalg.lstsq(
                G[rows].double(), c[rows, :, None].double()
            ).solution[..., 0].to(G.dtype)
            return out
    return torch.cholesky_solve(c[..., None], L)[..., 0]


def active_lstsq(
    X: torch.Tensor,
    D: torch.Tensor,
    indices: torch.Tensor,
    *,
    positive: bool = False,
    alpha: float = 0.0,
    ridge: float = 1e-7,
    max_iter: int = 200,
    tol: float = 1e-6,
    G: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
) -> SolverResult:
    """Codes on fixed active sets, batched over rows.

    Parameters
    ----------
    X : Tensor (n, P)
    D : Tensor (K, P)
    indices : LongTensor (n, s)
        Active atoms of each row (distinct within a row).
    positive : bool
        Constrain the codes to be non-negative (NNLS on the active set).
    alpha : float
        L1 weight on the active set (0: plain least squares).
    ridge : float
        Relative Tikhonov term (times the mean diagonal of each Gram) that keeps
        rank-deficient systems solvable; 1e-7 leaves well-posed solutions
        unchanged to float32 precision.
    max_iter, tol : int, float
        Coordinate-descent sweeps and the stopping tolerance on the largest
        coordinate change relative to the largest coordinate (constrained /
        L1 problems only), floored at ``50 * eps`` of the dtype.
    G, c : Tensors, optional
        Precomputed :func:`active_gram` output.

    Returns
    -------
    SolverResult
        ``codes`` is the ``(n, s)`` tensor of values aligned with ``indices``;
        ``history`` holds the largest relative change per sweep.
    """
    if G is None or c is None:
        G, c = active_gram(X, D, indices)
    a = _spd_solve(G, c, ridge)
    alpha = float(alpha)
    if not positive and alpha == 0.0:
        return SolverResult(a, 1, [], True)
    n, s = a.shape
    if alpha > 0:
        thr0 = alpha / G.diagonal(dim1=1, dim2=2).clamp_min(1e-30)
        a = torch.sign(a) * (a.abs() - thr0).clamp_min(0)
    if positive:
        a = a.clamp_min(0)
    diag = G.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(G.dtype).tiny)
    tol = max(float(tol), 50 * torch.finfo(a.dtype).eps)
    history = []
    converged = False
    n_iter = 0
    for _ in range(int(max_iter)):
        n_iter += 1
        delta = torch.zeros(n, dtype=a.dtype, device=a.device)
        for j in range(s):
            grad_j = c[:, j] - (G[:, j, :] * a).sum(1)
            z = a[:, j] + grad_j / diag[:, j]
            if alpha > 0:
                thr = alpha / diag[:, j]
                z = torch.sign(z) * (z.abs() - thr).clamp_min(0)
            if positive:
                z = z.clamp_min(0)
            delta = torch.maximum(delta, (z - a[:, j]).abs())
            a[:, j] = z
        rel = float((delta / a.abs().amax(1).clamp_min(1e-30)).max())
        history.append(rel)
        if rel <= tol:
            converged = True
            break
    return SolverResult(a, n_iter, history, converged)
