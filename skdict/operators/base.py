"""The dictionary-operator protocol every solver is written against.

A sparse-coding problem ``min_a 0.5 ||x - forward(a)||^2 + penalty(a)`` only
needs a few things of its dictionary, so solvers ask for those and nothing more:

``forward(a)``
    codes ``(n, n_atoms)`` -> signals ``(n, n_features)`` (the synthesis ``a @ D``
    for a dense dictionary, a sum of convolutions for a convolutional one).
``adjoint(x)``
    signals -> correlations ``(n, n_atoms)``, the adjoint of ``forward``
    (``x @ D.T``); ``<forward(a), x> == <a, adjoint(x)>``.
``normal(a)``
    ``adjoint(forward(a))``: the gradient of the smooth part is
    ``normal(a) - adjoint(x)``. Dense operators apply a cached Gram matrix.
``lipschitz()``
    the largest eigenvalue of ``normal`` (a safe over-estimate), the step size
    ``1 / L`` of proximal-gradient methods; computed once, when first asked.
``gram()`` (optional, ``has_gram``)
    the explicit ``(n_atoms, n_atoms)`` matrix of ``normal``; solvers that index
    into it (the exact homotopy / active set, OMP) declare ``requires=("gram",)``
    in the registry and refuse operators without one.

Attributes ``n_atoms``, ``n_features``, ``dtype`` and ``device`` describe the
shapes and where the tensors live. Codes are always flat ``(n, n_atoms)`` rows: an
operator with structured codes (channels x positions) reshapes internally.
"""

from __future__ import annotations

import torch

__all__ = ["Operator", "conjugate_gradient", "power_iteration"]


def power_iteration(G, n_iter: int = 100, tol: float = 1e-6, generator=None, *, size=None,
                    dtype=None, device=None) -> float:
    """Largest eigenvalue of a symmetric PSD map, by power iteration.

    ``G`` is a ``(K, K)`` tensor or a callable applying the map to a ``(K,)``
    vector (then give ``size``, and ``dtype`` / ``device`` of the vectors).
    Returns a slight over-estimate (x 1.01) so that ``1 / L`` is a safe step.
    """
    if isinstance(G, torch.Tensor):
        K, dtype, device = G.shape[0], G.dtype, G.device
        matvec = G.__matmul__
    else:
        K, matvec = int(size), G
    if K == 0:
        return 1.0
    if generator is None:  # deterministic start: same map -> same L
        generator = torch.Generator(device=device).manual_seed(0)
    v = torch.randn(K, dtype=dtype, device=device, generator=generator)
    v = v / v.norm().clamp_min(torch.finfo(dtype).tiny)
    lam = 0.0
    for _ in range(n_iter):
        w = matvec(v)
        new = float(w @ v)
        nrm = w.norm()
        if float(nrm) == 0.0:
            return 1.0
        v = w / nrm
        if abs(new - lam) <= tol * max(abs(new), 1e-30):
            lam = new
            break
        lam = new
    lam = max(lam, float(matvec(v).norm()))
    return 1.01 * lam if lam > 0 else 1.0


def conjugate_gradient(apply, B, rho, *, x0=None, precondition=None, tol=None, max_iter=200):
    """Solve ``apply(x, rho) = B`` row by row for a symmetric positive definite
    map (``normal + rho I``), by (preconditioned) conjugate gradients.

    ``rho`` is a float or one value per row; ``apply(V, rho)`` and
    ``precondition(V, rho)`` act on ``(n, K)`` rows. Each row has its own step
    sizes and stops on its own relative residual (``tol``: ``1e3 * eps`` of the
    dtype by default), so rows do not depend on each other.
    """
    if tol is None:
        tol = 1e3 * torch.finfo(B.dtype).eps
    rho = torch.as_tensor(rho, dtype=B.dtype, device=B.device)
    rho = rho.reshape(-1, 1) if rho.ndim else rho.expand(B.shape[0]).reshape(-1, 1)
    X = torch.zeros_like(B) if x0 is None else x0.clone()
    R = B - apply(X, rho) if x0 is not None else B.clone()
    bnorm = B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)
    ia = torch.arange(B.shape[0], device=B.device)
    keep = R.norm(dim=1) > tol * bnorm
    ia, r, x, rh = ia[keep], R[keep], X[keep], rho[keep]
    if ia.numel() == 0:
        return X
    z = precondition(r, rh) if precondition is not None else r
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    for _ in range(max_iter):
        q = apply(p, rh)
        step = rz / (p * q).sum(1, keepdim=True).clamp_min(torch.finfo(B.dtype).tiny)
        x = x + step * p
        r = r - step * q
        done = r.norm(dim=1) <= tol * bnorm[ia]
        if bool(done.any()):
            X[ia[done]] = x[done]
            keep = ~done
            ia, r, x, p, rz, rh = ia[keep], r[keep], x[keep], p[keep], rz[keep], rh[keep]
            if ia.numel() == 0:
                return X
        z = precondition(r, rh) if precondition is not None else r
        rz_new = (r * z).sum(1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(torch.finfo(B.dtype).tiny)) * p
        rz = rz_new
    X[ia] = x
    return X


class Operator:
    """Base class of dictionary operators (see the module docstring).

    Subclasses implement ``forward`` and ``adjoint`` and set ``n_atoms``,
    ``n_features``, ``dtype`` and ``device``; ``normal`` and ``lipschitz`` have
    matrix-free defaults (``adjoint(forward(a))`` and power iteration on it).
    Operators with an explicit Gram set ``has_gram = True`` and override
    ``gram``.
    """

    has_gram = False
    n_atoms: int
    n_features: int
    dtype: torch.dtype
    device: torch.device

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} has no forward (synthesis) map.")

    def adjoint(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} has no adjoint (analysis) map.")

    def normal(self, a: torch.Tensor) -> torch.Tensor:
        """``adjoint(forward(a))``."""
        return self.adjoint(self.forward(a))

    def gram(self) -> torch.Tensor:
        raise TypeError(
            f"{type(self).__name__} has no explicit Gram matrix; use a solver that needs "
            "only the operator (see skdict.solvers.registry.solver_names(requires='operator'))."
        )

    def gram64(self) -> torch.Tensor:
        """The Gram matrix in float64 (face solves of the exact solver)."""
        return self.gram().to(torch.float64)

    def solve_normal(self, B, rho, x0=None):
        """``(normal + rho I)^{-1} B`` per row (``rho``: a float or one value per
        row), the linear solve of ADMM; conjugate gradients unless the operator
        has a direct method."""
        return conjugate_gradient(lambda v, r: self.normal(v) + r * v, B, rho, x0=x0)

    def lipschitz(self) -> float:
        """Largest eigenvalue of ``normal`` (x 1.01), cached after the first call."""
        L = getattr(self, "_lipschitz", None)
        if L is None:
            L = power_iteration(lambda v: self.normal(v[None])[0], size=self.n_atoms,
                                dtype=self.dtype, device=self.device)
            self._lipschitz = L
        return L
