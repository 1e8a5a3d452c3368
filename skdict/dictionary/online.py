"""Dense dictionary updates for lasso-type dictionary learning (pure torch).

* :func:`online_statistics_update` / :func:`bcd_update`: the online algorithm of
  Mairal, Bach, Ponce & Sapiro (2010): sufficient statistics ``A = sum a^T a``
  (K x K) and ``B = sum a^T x`` (K x P) with a forgetting factor, then one pass of
  block-coordinate descent over the atoms.
* :func:`sgd_update`: Olshausen & Field's (1996) Hebbian gradient step
  ``D += lr * a^T (x - a D) / batch``.
* :func:`normalize_atoms`, :func:`resample_atoms`, :func:`init_dictionary`.
"""

from __future__ import annotations

import torch

__all__ = [
    "normalize_atoms",
    "init_dictionary",
    "forgetting_factor",
    "online_statistics_update",
    "bcd_update",
    "sgd_update",
    "resample_atoms",
]


def normalize_atoms(D: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Scale every atom (row) to unit L2 norm; rows with ~zero norm are left as is."""
    eps = torch.finfo(D.dtype).tiny if eps is None else eps
    nrm = D.norm(dim=1, keepdim=True)
    return torch.where(nrm > eps, D / nrm.clamp_min(eps), D)


def init_dictionary(X: torch.Tensor, n_components: int, generator) -> torch.Tensor:
    """Unit-norm atoms drawn from the rows of ``X`` (with small Gaussian noise so
    repeated or zero rows still give distinct atoms); Gaussian atoms when ``X``
    has fewer rows than ``n_components``."""
    n, p = X.shape
    noise = torch.randn(n_components, p, generator=generator, dtype=X.dtype, device=X.device)
    if n >= n_components:
        idx = torch.randperm(n, generator=generator, device=X.device)[:n_components]
        D = X[idx].clone()
        scale = D.norm(dim=1, keepdim=True).clamp_min(1e-12)
        D = D / scale + 0.01 * noise / (p**0.5)
    else:
        D = noise
    return normalize_atoms(D)


def forgetting_factor(n_seen: int, batch_size: int, window: int | None = None) -> float:
    """Weight of the old statistics when a batch of ``batch_size`` rows arrives
    after ``n_seen`` rows (Mairal et al. 2010, Sec. 3.4).

    The statistics forget the first (poor) dictionaries faster than a plain
    running mean: with ``t = n_seen / batch_size`` steps so far,
    ``theta = t * b`` for ``t < b - 1`` and ``b**2 + t + 1 - b`` afterwards,
    and the factor is ``(theta + 1 - b) / (theta + 1)``. ``window`` caps
    ``theta`` (the rows remembered), so that old codes keep being forgotten.
    """
    b = max(int(batch_size), 1)
    t = n_seen // b
    theta = t * b if t < b - 1 else b * b + t + 1 - b
    if window is not None:
        theta = min(theta, max(int(window), b))
    return max(0.0, (theta + 1 - b) / (theta + 1))


def online_statistics_update(A, B, codes, X, beta):
    """``A <- beta A + a^T a / n``, ``B <- beta B + a^T X / n`` for a batch.

    On CPU the products run over the non-zeros of the (sparse) codes only, in one
    compiled loop (:func:`skdict.dictionary._bcd_kernel.sparse_stats_update`)."""
    n = X.shape[0]
    same = codes.dtype == X.dtype == A.dtype == B.dtype
    if (codes.device.type == "cpu" and same and A.is_contiguous() and B.is_contiguous()
            and A.dtype in (torch.float32, torch.float64)):
        from ._bcd_kernel import sparse_stats_update

        sparse_stats_update(A.numpy(), B.numpy(), codes.detach().contiguous().numpy(),
                            X.detach().contiguous().numpy(), float(beta))
        return A, B
    A.mul_(beta).add_(codes.T @ codes, alpha=1.0 / n)
    B.mul_(beta).add_(codes.T @ X, alpha=1.0 / n)
    return A, B


def bcd_update(D, A, B, n_passes: int = 1, eps: float = 1e-10):
    """Block-coordinate descent on the atoms with the statistics ``A``, ``B``.

    For each atom ``j`` with ``A_jj > eps``:
    ``d_j <- d_j + (B_j - A_j D) / A_jj``, then ``d_j`` is rescaled to unit norm.
    Atoms never used (``A_jj <= eps``) are left for :func:`resample_atoms`.
    Returns the updated dictionary (modified in place).

    The sweep is sequential over atoms (each update sees the previous ones). On
    CPU it runs as one compiled loop (:func:`_bcd_sweep`, skipping the zero
    entries of ``A``); on other devices as a torch loop over atoms.
    """
    if D.device.type == "cpu" and D.is_contiguous() and D.dtype in (torch.float32, torch.float64):
        from ._bcd_kernel import bcd_sweep

        bcd_sweep(D.numpy(), A.contiguous().numpy(), B.contiguous().numpy(), int(n_passes),
                  float(eps))
        return D
    K = D.shape[0]
    diag = A.diagonal().clone()
    active = (diag > eps).nonzero().squeeze(1).tolist()
    for _ in range(n_passes):
        for j in active:
            d = D[j] + (B[j] - A[j] @ D) / diag[j]
            nrm = d.norm()
            if float(nrm) > 1e-12:
                D[j] = d / nrm
    del K
    return D


def sgd_update(D, X, codes, lr: float):
    """Olshausen-Field step ``D += lr * a^T (X - a D) / n`` followed by unit-norm
    projection."""
    R = X - codes @ D
    D = D + lr * (codes.T @ R) / X.shape[0]
    return normalize_atoms(D)


def resample_atoms(D, dead, X, codes, generator):
    """Replace the atoms flagged in ``dead`` by normalised residuals of the rows of
    ``X`` that are worst reconstructed by ``codes @ D``.

    Returns ``(D, replaced_indices)``.
    """
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return D, idx
    R = X - codes @ D
    err = (R * R).sum(1)
    n_new = min(idx.numel(), X.shape[0])
    # sample among the worst half, weighted by error, without replacement
    probs = err.clamp_min(0) + 1e-12
    rows = torch.multinomial(probs, n_new, replacement=False, generator=generator)
    new = R[rows]
    nrm = new.norm(dim=1, keepdim=True)
    fallback = torch.randn(new.shape, generator=generator, dtype=D.dtype, device=D.device)
    new = torch.where(nrm > 1e-8, new, fallback)
    D[idx[:n_new]] = normalize_atoms(new)
    return D, idx[:n_new]
