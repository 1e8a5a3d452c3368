"""Maps from scores to (sparse) points of the probability simplex.

Pure torch functions, differentiable by autograd wherever the map is (almost
everywhere for all of them). A score of ``-inf`` marks a masked entry: it always
gets weight zero. A row whose entries are all ``-inf`` maps to all zeros (no
``NaN``), in the forward and the backward pass.

* :func:`sparsemax` -- the Euclidean projection onto the simplex (exact,
  sort-based, Held, Wolfe & Crowder 1974; Martins & Astudillo 2016).
* :func:`topk_softmax` -- softmax over the kept entries (for example the top-k
  scores gathered by the caller).
* :func:`threshold_weights` -- the adaptive soft threshold
  ``max(s - alpha * mean|s|, 0)``, renormalised to sum to one.
"""

from __future__ import annotations

import torch

__all__ = [
    "sparsemax",
    "sparsemax_threshold",
    "topk_softmax",
    "threshold_weights",
    "adaptive_lambda",
]


def _safe_rows(z):
    """Replace rows that are entirely masked by zeros; return (z, any_row)."""
    finite = torch.isfinite(z)
    any_row = finite.any(-1, keepdim=True)
    return torch.where(any_row, z, torch.zeros_like(z)), any_row


def sparsemax_threshold(z: torch.Tensor) -> torch.Tensor:
    """The threshold ``tau`` with ``sum(max(z - tau, 0)) == 1`` along the last dim.

    Sort-based and exact: with ``z`` sorted decreasingly, the support size is the
    largest ``k`` with ``1 + k z_(k) > sum_{j<=k} z_(j)`` and
    ``tau = (sum_{j<=k} z_(j) - 1) / k``. Returns a tensor of shape
    ``z.shape[:-1] + (1,)``. Rows that are entirely ``-inf`` give ``tau = 0`` on
    the zero row they are replaced by.
    """
    z, _ = _safe_rows(z)
    zs, _ = torch.sort(z, dim=-1, descending=True)
    cs = torch.cumsum(zs, dim=-1)
    n = z.shape[-1]
    ks = torch.arange(1, n + 1, device=z.device, dtype=z.dtype)
    cond = (1 + ks * zs) > cs
    k = cond.sum(-1, keepdim=True).clamp(min=1)
    tau = (cs.gather(-1, k - 1) - 1) / k.to(z.dtype)
    return tau


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of ``z`` onto the probability simplex along ``dim``.

    ``sparsemax(z) = argmin_{p >= 0, sum p = 1} ||p - z||^2 = max(z - tau, 0)``
    with ``tau`` from :func:`sparsemax_threshold`. The output is sparse: entries
    below ``tau`` are exactly zero; when the gap between the two largest scores
    is at least 1 the result is one-hot. Differentiable almost everywhere (the
    Jacobian is ``diag(s) - s s^T / |S|`` with ``s`` the support indicator).

    Parameters
    ----------
    z : Tensor
        Scores; ``-inf`` entries are masked (weight 0).
    dim : int, default=-1

    Returns
    -------
    Tensor of the shape of ``z``, non-negative, summing to one along ``dim``
    (zero for rows that are entirely ``-inf``).

    Examples
    --------
    >>> import torch
    >>> from skdict.solvers.simplex import sparsemax
    >>> sparsemax(torch.tensor([1.0, 0.8, -1.0]))
    tensor([0.6000, 0.4000, 0.0000])
    """
    z = z.movedim(dim, -1)
    zz, any_row = _safe_rows(z)
    tau = sparsemax_threshold(zz)
    p = torch.clamp(zz - tau, min=0)
    p = torch.where(any_row, p, torch.zeros_like(p))
    return p.movedim(-1, dim)


def topk_softmax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim`` with ``-inf`` entries (and all-``-inf`` rows) giving 0.

    Applied to the top-k scores of each row this is the top-k attention weight:
    the softmax renormalised over the kept tokens.
    """
    z = z.movedim(dim, -1)
    zz, any_row = _safe_rows(z)
    p = torch.softmax(zz, dim=-1)
    p = torch.where(any_row, p, torch.zeros_like(p))
    return p.movedim(-1, dim)


def adaptive_lambda(scores: torch.Tensor, alpha) -> torch.Tensor:
    """The seed's adaptive threshold ``alpha * mean|s|`` over the finite entries.

    Returns shape ``scores.shape[:-1] + (1,)``; masked (``-inf``) entries are not
    counted in the mean.
    """
    finite = torch.isfinite(scores)
    cnt = finite.sum(-1, keepdim=True).clamp(min=1).to(scores.dtype)
    absz = torch.where(finite, scores.abs(), torch.zeros_like(scores))
    return alpha * absz.sum(-1, keepdim=True) / cnt


def threshold_weights(
    z: torch.Tensor, alpha=1.0, *, lam=None, empty: str = "argmax"
) -> torch.Tensor:
    """Soft-threshold the scores at ``lam`` and renormalise to sum to one.

    ``w = max(z - lam, 0) / sum(max(z - lam, 0))`` along the last dim, with
    ``lam = alpha * mean|z|`` (:func:`adaptive_lambda`) unless given (the caller
    passes ``lam`` computed over the full row when ``z`` holds only candidate
    scores, e.g. the top-k of a longer row).

    Rows where no score exceeds ``lam`` are handled explicitly by ``empty``:

    * ``"argmax"`` (default): all the weight goes to the best score of the row
      (the threshold never leaves a query without any token);
    * ``"zero"``: the row stays all zeros.

    Rows that are entirely ``-inf`` (nothing allowed) are always all zeros.
    Differentiable almost everywhere in ``z`` (and through ``lam``).
    """
    if empty not in ("argmax", "zero"):
        raise ValueError(f"empty must be 'argmax' or 'zero', got {empty!r}.")
    zz, any_row = _safe_rows(z)
    if lam is None:
        lam = adaptive_lambda(z, alpha)
        lam = torch.where(any_row, lam, torch.zeros_like(lam))
    u = torch.clamp(zz - lam, min=0)
    u = torch.where(torch.isfinite(zz), u, torch.zeros_like(u))
    s = u.sum(-1, keepdim=True)
    has = s > 0
    w = u / torch.where(has, s, torch.ones_like(s))
    if empty == "argmax":
        onehot = torch.zeros_like(zz).scatter_(
            -1, zz.argmax(-1, keepdim=True), 1.0
        )
        w = torch.where(has, w, onehot)
    return torch.where(any_row, w, torch.zeros_like(w))
