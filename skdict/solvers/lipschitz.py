"""Step sizes: the largest eigenvalue of a Gram matrix by power iteration."""

from __future__ import annotations

import torch

__all__ = ["power_iteration", "gram"]


def gram(D: torch.Tensor) -> torch.Tensor:
    """``D @ D.T`` for a dictionary with atoms as rows."""
    return D @ D.T


def power_iteration(G: torch.Tensor, n_iter: int = 100, tol: float = 1e-6, generator=None) -> float:
    """Largest eigenvalue of the symmetric PSD matrix ``G`` (the Lipschitz constant
    of the lasso's smooth part), by power iteration.

    Returns a slight over-estimate (x 1.01) so that ``1 / L`` is a safe step.
    """
    K = G.shape[0]
    if K == 0:
        return 1.0
    if generator is None:  # deterministic start: same G -> same L
        generator = torch.Generator(device=G.device).manual_seed(0)
    v = torch.randn(K, dtype=G.dtype, device=G.device, generator=generator)
    v = v / v.norm().clamp_min(torch.finfo(G.dtype).tiny)
    lam = 0.0
    for _ in range(n_iter):
        w = G @ v
        new = float(w @ v)
        nrm = w.norm()
        if float(nrm) == 0.0:
            return 1.0
        v = w / nrm
        if abs(new - lam) <= tol * max(abs(new), 1e-30):
            lam = new
            break
        lam = new
    lam = max(lam, float((G @ v).norm()))
    return 1.01 * lam if lam > 0 else 1.0
