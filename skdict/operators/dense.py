"""Dense dictionaries: atoms as the rows of a ``(K, P)`` matrix ``D``."""

from __future__ import annotations

import numpy as np
import torch

from .._backend import torch_dtype
from .base import Operator, power_iteration

__all__ = ["GramOperator", "DenseOperator", "as_operator"]


class GramOperator(Operator):
    """An operator known only through its Gram matrix ``G`` (``K x K``).

    For solvers in Gram form that are handed the correlations ``C = X D^T``
    directly: ``normal(a) = a @ G``, ``gram()``, ``lipschitz()``; it has no
    ``forward`` / ``adjoint``. ``L`` (optional) fixes the Lipschitz constant.
    """

    has_gram = True

    def __init__(self, G: torch.Tensor, L=None, *, gram64=None, n_features=None):
        self._G = G
        self._G64 = gram64
        self._lipschitz = None if L is None else float(L)
        self.n_atoms = G.shape[0]
        self.n_features = n_features
        self.dtype = G.dtype
        self.device = G.device

    def normal(self, a):
        return a @ self.gram()

    def gram(self):
        return self._G

    def gram64(self):
        if self._G64 is None:
            G = self.gram()
            self._G64 = G if G.dtype == torch.float64 else G.to(torch.float64)
        return self._G64

    def gram64_f32(self):
        """``gram64()`` rounded to float32, cached: the exact kernel's float32
        passes (rounding the K x K Gram on every call costs ~0.1 ms when it has
        left the cache, 7 % of a 1k-row encode)."""
        G32 = getattr(self, "_G64_f32", None)
        if G32 is None:
            G32 = self._G64_f32 = self.gram64().to(torch.float32)
        return G32

    def solve_normal(self, B, rho, x0=None):
        """``(G + rho I)^{-1} B`` per row, from the eigendecomposition of ``G``
        (computed once): one ``rho`` per row costs no new factorisation."""
        eig = getattr(self, "_eigh", None)
        if eig is None:
            eig = self._eigh = torch.linalg.eigh(self.gram64())
        lam, V = (t.to(B.dtype) for t in eig)
        rho = torch.as_tensor(rho, dtype=B.dtype, device=B.device)
        rho = rho.reshape(-1, 1) if rho.ndim else rho
        return ((B @ V) / (lam + rho)) @ V.T

    def lipschitz(self):
        if self._lipschitz is None:
            G = self.gram()
            # float32 Grams: the eigenvalue estimate in float64 (same step for both dtypes)
            self._lipschitz = power_iteration(G.double() if G.dtype == torch.float32 else G)
        return self._lipschitz


class DenseOperator(GramOperator):
    """The dictionary ``D`` (a ``(K, P)`` tensor, atoms as rows) as an operator.

    ``forward(a) = a @ D``, ``adjoint(x) = x @ D.T``, ``normal(a) = a @ G`` with
    ``G = D D^T`` computed on first use and cached, as are the float64 Gram
    (``gram64``, for the exact solver's face solves) and the Lipschitz constant
    (power iteration, only when a solver needs a step size). ``D`` must not be
    modified while the operator is in use (the caches would go stale).
    """

    def __init__(self, D: torch.Tensor):
        if D.ndim != 2:
            raise ValueError(f"D must be 2-D (n_atoms, n_features), got shape {tuple(D.shape)}.")
        self.D = D
        self._G = None
        self._G64 = None
        self._lipschitz = None
        self.n_atoms, self.n_features = D.shape
        self.dtype = D.dtype
        self.device = D.device

    def forward(self, a):
        return a @ self.D

    def adjoint(self, x):
        return x @ self.D.T

    def gram(self):
        if self._G is None:
            self._G = self.D @ self.D.T
        return self._G

    def gram64(self):
        if self._G64 is None:
            if self.D.dtype == torch.float64:
                self._G64 = self.gram()
            else:  # from D in float64, not the rounded float32 Gram (cheap: K x K)
                D64 = self.D.double()
                self._G64 = D64 @ D64.T
        return self._G64


def as_operator(components, device=None, dtype=None) -> Operator:
    """The dictionary ``components`` as an operator on ``device`` in ``dtype``.

    ``components``: an :class:`Operator` (returned as is), a torch tensor (moved
    and cast without a host round trip; no copy when already there) or an array
    of shape ``(n_atoms, n_features)``. ``device`` / ``dtype`` None keep the
    tensor's (float64 for arrays of other dtypes).
    """
    if isinstance(components, Operator):
        return components
    if isinstance(components, torch.Tensor):
        D = components.detach()
    else:
        arr = np.asarray(components)
        if dtype is None and arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
        D = torch.as_tensor(arr)
    D = D.to(device=device if device is not None else D.device,
             dtype=torch_dtype(dtype) if dtype is not None else D.dtype)
    return DenseOperator(D)
