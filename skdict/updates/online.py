"""Online dictionary learning on dense sufficient statistics (Mairal, Bach, Ponce &
Sapiro 2010), pure torch.

The statistics ``A = sum a^T a / b`` (K x K) and ``B = sum a^T x / b`` (K x P) of the
minibatch codes are decayed by :func:`skdict.updates.atoms.forgetting_factor` and
updated by :func:`statistics_update`; :func:`bcd_update` then takes one pass of
block-coordinate descent over the atoms. On CPU both run as compiled loops
(:mod:`skdict.updates._kernels.bcd`); :func:`statistics_update_torch` and
:func:`bcd_update_torch` are the torch formulas they are tested against and the
path on other devices.
"""

from __future__ import annotations

import torch

__all__ = [
    "OnlineStats",
    "statistics_update",
    "statistics_update_torch",
    "bcd_update",
    "bcd_update_torch",
]


class OnlineStats:
    """A view of the dense statistics ``A`` (K x K) and ``B`` (K x P) for
    :func:`skdict.updates.atoms.resample_dead_atoms` (shares the tensors)."""

    def __init__(self, A, B):
        self.A, self.B = A, B

    def reset_atoms(self, atoms):
        """Forget every statistic of ``atoms`` (rows and columns of ``A``, rows of ``B``)."""
        self.A[atoms, :] = 0
        self.A[:, atoms] = 0
        self.B[atoms] = 0


def _compiled_ok(*tensors):
    t0 = tensors[0]
    return (t0.device.type == "cpu" and t0.dtype in (torch.float32, torch.float64)
            and all(t.dtype == t0.dtype and t.device == t0.device for t in tensors))


def statistics_update_torch(A, B, codes, X, beta):
    """In place: ``A <- beta A + codes^T codes / n``, ``B <- beta B + codes^T X / n``."""
    n = X.shape[0]
    A.mul_(beta).add_(codes.T @ codes, alpha=1.0 / n)
    B.mul_(beta).add_(codes.T @ X, alpha=1.0 / n)
    return A, B


def statistics_update(A, B, codes, X, beta):
    """:func:`statistics_update_torch`; on CPU one compiled loop over the non-zeros
    of the (sparse) codes only."""
    if _compiled_ok(A, B, codes, X) and A.is_contiguous() and B.is_contiguous():
        from ._kernels.bcd import sparse_stats_update

        sparse_stats_update(A.numpy(), B.numpy(), codes.detach().contiguous().numpy(),
                            X.detach().contiguous().numpy(), float(beta))
        return A, B
    return statistics_update_torch(A, B, codes, X, beta)


def _relative_eps(A, eps):
    """``eps`` times the largest ``A_jj`` (the smallest positive float when A is zero)."""
    top = float(A.diagonal().max()) if A.numel() else 0.0
    return max(float(eps) * top, torch.finfo(A.dtype).tiny)


def bcd_update_torch(D, A, B, n_passes=1, eps=1e-10):
    """Block-coordinate descent on the atoms, in place (torch loop over atoms).

    For each atom ``j`` with ``A_jj > eps * max(A_kk)`` (relative: the
    statistics scale with the square of the codes), in order:
    ``d_j <- d_j + (B_j - A_j D) / A_jj``, then ``d_j`` is rescaled to unit norm
    (left as is when the update vanishes). Atoms never used (``A_jj <= eps``) are
    left for dead-atom resampling. The sweep is sequential: each update sees the
    atoms updated before it.
    """
    diag = A.diagonal().clone()
    active = (diag > _relative_eps(A, eps)).nonzero().squeeze(1).tolist()
    for _ in range(int(n_passes)):
        for j in active:
            d = D[j] + (B[j] - A[j] @ D) / diag[j]
            nrm = d.norm()
            if float(nrm) > 1e-12:
                D[j] = d / nrm
    return D


def bcd_update(D, A, B, n_passes=1, eps=1e-10):
    """:func:`bcd_update_torch`; on CPU one compiled loop (a torch loop pays a few
    operator launches per atom, K of them per minibatch)."""
    if _compiled_ok(D, A, B) and D.is_contiguous():
        from ._kernels.bcd import bcd_sweep

        bcd_sweep(D.numpy(), A.contiguous().numpy(), B.contiguous().numpy(), int(n_passes),
                  _relative_eps(A, eps))
        return D
    return bcd_update_torch(D, A, B, n_passes, eps)
