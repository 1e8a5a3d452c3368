"""The exact lasso: the compiled homotopy on CPU, the torch active-set method
elsewhere, both certified by the KKT conditions.

:func:`lasso_exact` dispatches between the per-row LARS-lasso path
(:mod:`skdict.solvers._kernels.lars`, CPU tensors) and the batched active-set
method (:mod:`skdict.solvers.active_set`, any device, also the homotopy's
fallback for the rows it cannot certify). :func:`lasso_exact_compact` returns the
homotopy's fixed-width supports directly, without dense codes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..operators import GramOperator
from ._result import SolverResult
from .active_set import _compact_from_dense, lasso_active_set
from .fista import fista
from .registry import register

__all__ = ["lasso_exact", "lasso_exact_compact"]


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
    warm_iter=0,
    chunk_size=2048,
    gram64=None,
    method="auto",
    n_features=None,
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
        ``||x||^2`` of each row. When given, the result's ``objective`` holds each
        row's objective ``0.5 ||x - a D||^2 + alpha ||a||_1`` (the homotopy gets it
        from its certificate at no extra cost; the active-set path from ``a G``).
    L : float, optional
        Largest eigenvalue of ``G``; only used by the optional FISTA warm-up.
    a0 : Tensor (n, K), optional
        Warm start (e.g. the previous codes in dictionary learning): its support
        and values are the starting point of the active-set iterations.
    positive : bool
        Non-negative lasso.
    max_iter : int
        Maximum active-set iterations per chunk.
    tol : float
        Relative slack on the off-support KKT condition ``|c_j - (a G)_j| <=
        alpha (1 + tol)``, floored at ``100 * eps(dtype)``.
    warm_iter : int
        FISTA iterations used as a warm start when ``a0`` is None (0: start
        from zero, the fastest in practice).
    chunk_size : int
        Rows solved together (bounds the working memory; results do not depend
        on it).
    gram64 : Tensor (K, K), optional
        ``D @ D.T`` computed in float64, used instead of ``G`` by the residuals
        and face solves (which always run in float64). For float32 data it avoids
        the rounding of ``G`` making near-singular supports indefinite.
    method : {"auto", "homotopy", "active_set"}
        ``"homotopy"``: the compiled per-row LARS-lasso path
        (:mod:`skdict.solvers._kernels.lars`, CPU tensors only, parallel over rows
        with ``torch.get_num_threads()`` threads); rows whose final KKT check
        fails are finished by the active-set method, warm-started from the path's
        codes. ``"active_set"``: the batched torch method below (any device).
        ``"auto"``: homotopy for CPU tensors, active set otherwise. Both give the
        same optimum; warm starts ``a0`` are used by the active-set method only.
    n_features : int, optional
        The dictionary's number of features, when known: it bounds the rank of
        ``G`` and so the supports, and sizes the homotopy's buffers.

    Returns
    -------
    SolverResult
        ``history[i]`` is the number of rows not yet certified at iteration i
        (summed over chunks); ``converged`` is True when every row is certified.
    """
    dev = C.device
    alpha = float(alpha)
    if method not in ("auto", "homotopy", "active_set"):
        raise ValueError(f"method must be 'auto', 'homotopy' or 'active_set', got {method!r}.")
    if method == "homotopy" or (method == "auto" and dev.type == "cpu"):
        res, fpart = _lasso_homotopy(C, G, alpha, positive, gram64, max_iter, tol, chunk_size,
                                     n_features)
        if xnorm2 is not None:
            res = res._replace(objective=0.5 * xnorm2.to(fpart.dtype) + fpart)
        return res
    if a0 is None and warm_iter > 0:
        a0 = fista(C, GramOperator(G, L), alpha, xnorm2=None, positive=positive,
                   max_iter=warm_iter).codes
    codes, n_iter, history, converged = lasso_active_set(
        C, G, alpha, a0=a0, positive=positive, max_iter=max_iter, tol=tol,
        chunk_size=chunk_size, gram64=gram64)
    objective = None
    if xnorm2 is not None:
        objective = 0.5 * xnorm2 + _objective_part(codes, C, gram64 if gram64 is not None else G,
                                                   alpha)
    return SolverResult(codes, n_iter, history, converged, objective=objective)


def _objective_part(a, C, G, alpha):
    """``0.5 ||x - a D||^2 + alpha ||a||_1 - 0.5 ||x||^2`` of each row, from ``C`` and ``G``."""
    a64 = a.to(torch.float64)
    aG = a64 @ G.to(device=a.device, dtype=torch.float64)
    part = -(a64 * C.to(torch.float64)).sum(1) + 0.5 * (aG * a64).sum(1) + alpha * a64.abs().sum(1)
    return part.to(a.dtype)


def lasso_exact_compact(C, G, alpha, *, positive=False, tol=1e-7, gram64=None, max_iter=200,
                        chunk_size=2048, n_features=None, return_objective=False,
                        dictionary=None, gram_f32=None):
    """Exact lasso codes of CPU rows as fixed-width ``(indices, values)``.

    The compiled homotopy (:mod:`skdict.solvers._kernels.lars`) solves every row;
    the rows whose KKT check fails are finished by the active-set method. Each
    row's non-zeros come first, in increasing atom order, then padding of index 0
    and value 0 (no zero before a non-zero), so that
    ``torch.zeros(n, K).scatter_add_(1, indices, values)`` gives the dense codes
    and the non-zeros give the CSR row directly (no dense ``(n, K)`` block is
    formed).

    ``n_features`` (the dictionary's, when known) bounds the rank of ``G`` and
    hence every support; it sizes the kernel's buffers (default ``min(K, 1024)``).
    With ``dictionary`` (K, P), ``C`` holds the rows ``X`` (n, P) and the kernel
    computes their correlations ``X D^T`` chunk by chunk (no ``(n, K)`` matrix).
    ``gram_f32``: the float64 Gram rounded to float32 (the kernel's passes), when
    the caller keeps it; computed per call otherwise.

    Returns
    -------
    indices : LongTensor (n, w), values : Tensor (n, w), steps : int, converged : bool,
    n_uncertified : int
    fpart : Tensor (n,)
        Only with ``return_objective=True``: each row's objective minus
        ``0.5 ||x||^2``.
    """
    from ._kernels.lars import lars_lasso_rows

    if C.device.type != "cpu":
        raise ValueError(f"the homotopy kernel (method='homotopy') runs on CPU tensors only; "
                         f"got a tensor on {C.device}.")
    n, K = C.shape[0], G.shape[0]
    kkt_tol = max(float(tol), 100 * torch.finfo(C.dtype).eps)
    G64 = (gram64 if gram64 is not None else G).detach().to(torch.float64).numpy()
    idx, val, steps, ok, fpart = lars_lasso_rows(
        C.detach().numpy(), G64, float(alpha), positive=positive, kkt_tol=kkt_tol,
        n_threads=torch.get_num_threads(), rank_bound=n_features, return_objective=True,
        dictionary=None if dictionary is None else dictionary.detach().numpy(),
        gram_pass=None if gram_f32 is None else gram_f32.detach().numpy(),
    )
    idx, val = torch.from_numpy(idx), torch.from_numpy(val)
    fpart = torch.from_numpy(fpart).to(C.dtype)
    n_steps = int(steps.max()) if n else 0
    bad = np.flatnonzero(~ok)
    converged = True
    if bad.size:
        bi = torch.from_numpy(bad)
        Cb = C[bi] if dictionary is None else C[bi] @ dictionary.T
        a0 = torch.zeros(bad.size, K, dtype=C.dtype).scatter_add_(1, idx[bi], val[bi])
        res = lasso_exact(Cb, G, alpha, a0=a0, positive=positive, max_iter=max_iter, tol=tol,
                          chunk_size=chunk_size, gram64=gram64, method="active_set")
        fi, fv = _compact_from_dense(res.codes, K)
        fi = torch.where(fi == K, 0, fi)
        w = max(idx.shape[1], fi.shape[1])
        idx = F.pad(idx, (0, w - idx.shape[1]))
        val = F.pad(val, (0, w - val.shape[1]))
        idx[bi] = F.pad(fi, (0, w - fi.shape[1]))
        val[bi] = F.pad(fv, (0, w - fv.shape[1]))
        converged = res.converged
        n_steps += res.n_iter
        if return_objective:
            fpart[bi] = _objective_part(res.codes, Cb, gram64 if gram64 is not None else G,
                                        float(alpha))
    if return_objective:
        return idx, val, n_steps, converged, int(bad.size), fpart
    return idx, val, n_steps, converged, int(bad.size)


def _lasso_homotopy(C, G, alpha, positive, gram64, max_iter, tol, chunk_size, n_features):
    """CPU path of :func:`lasso_exact` (dense codes from the compact ones), and each
    row's objective minus ``0.5 ||x||^2``."""
    idx, val, n_iter, converged, n_bad, fpart = lasso_exact_compact(
        C, G, alpha, positive=positive, tol=tol, gram64=gram64, max_iter=max_iter,
        chunk_size=chunk_size, n_features=n_features, return_objective=True,
    )
    out = torch.zeros(C.shape, dtype=C.dtype).scatter_add_(1, idx, val)
    return SolverResult(out, n_iter, [n_bad], converged), fpart


@register("exact", requires=("gram",), kind="exact")
def _encode(C, op, *, alpha, xnorm2, positive=False, init=None, objective=False):
    # the objective costs an extra K x K product on the active-set path: only on request
    return lasso_exact(C, op.gram(), alpha, xnorm2=xnorm2 if objective else None, a0=init,
                       positive=positive, gram64=op.gram64(), n_features=op.n_features)
