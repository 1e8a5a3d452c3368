"""Sparsity penalties: proximal operators, values and the dual scaling of the
duality gap, as small objects with one vocabulary.

``prox(z, step)``
    ``argmin_a 0.5 ||a - z||^2 + step * penalty(a)`` per row.
``value(a)``
    the penalty of each row of ``a`` (``inf`` where a constraint is violated).
``dual_scale(corr)`` (L1 penalties only)
    the factor that scales a residual ``r`` into the dual feasible set, given its
    correlations ``corr = D r``: ``min(1, alpha / ||corr||_inf)`` (the positive
    part's maximum for the non-negative L1). The lasso duality gap is built on it.

The thresholding functions below are the building blocks (pure torch).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "L1",
    "NonNegativeL1",
    "L0",
    "TopK",
    "soft_threshold",
    "hard_threshold",
    "topk_threshold",
    "threshold",
    "penalty_for",
]


def soft_threshold(u: torch.Tensor, thresh, positive: bool = False) -> torch.Tensor:
    """Proximal operator of ``thresh * ||.||_1``: ``sign(u) * max(|u| - thresh, 0)``.

    With ``positive=True`` it is the prox of the L1 norm plus the non-negativity
    constraint: ``max(u - thresh, 0)``.
    """
    if positive:
        return torch.clamp(u - thresh, min=0)
    return torch.sign(u) * torch.clamp(u.abs() - thresh, min=0)


def hard_threshold(u: torch.Tensor, thresh, positive: bool = False) -> torch.Tensor:
    """Keep entries with ``|u| > thresh`` (``u > thresh`` if positive), zero others.

    This is the prox of the L0 penalty ``thresh**2 / 2 * ||a||_0`` at unit step.
    """
    if positive:
        return torch.where(u > thresh, u, torch.zeros_like(u))
    return torch.where(u.abs() > thresh, u, torch.zeros_like(u))


def topk_threshold(u: torch.Tensor, k: int, positive: bool = False) -> torch.Tensor:
    """Keep the ``k`` largest entries per row (by magnitude, or value if positive)."""
    k = min(int(k), u.shape[-1])
    if positive:
        vals, idx = torch.topk(torch.clamp(u, min=0), k, dim=-1)
        out = torch.zeros_like(u)
        return out.scatter_(-1, idx, vals)
    _, idx = torch.topk(u.abs(), k, dim=-1)
    out = torch.zeros_like(u)
    return out.scatter_(-1, idx, torch.gather(u, -1, idx))


def threshold(u: torch.Tensor, thresh, kind: str = "soft", positive: bool = False):
    """:func:`soft_threshold` or :func:`hard_threshold` by name."""
    return penalty_for(kind, thresh, positive).prox(u, 1.0)


class L1:
    """``alpha * ||a||_1`` (with ``positive``: plus the constraint ``a >= 0``)."""

    def __init__(self, alpha, positive: bool = False):
        self.alpha = float(alpha)
        self.positive = bool(positive)

    def prox(self, z, step):
        return soft_threshold(z, self.alpha * step, self.positive)

    def value(self, a):
        v = self.alpha * a.abs().sum(-1)
        if self.positive:
            v = torch.where((a < 0).any(-1), torch.full_like(v, math.inf), v)
        return v

    def dual_norm(self, corr):
        """``||corr||_inf`` per row (the largest positive part if ``positive``)."""
        if self.positive:
            return corr.max(-1).values.clamp_min(0)
        return corr.abs().max(-1).values

    def dual_scale(self, corr):
        m = self.dual_norm(corr)
        return torch.where(m > self.alpha, self.alpha / m.clamp_min(1e-300), torch.ones_like(m))


class NonNegativeL1(L1):
    """``alpha * ||a||_1`` subject to ``a >= 0``."""

    def __init__(self, alpha):
        super().__init__(alpha, positive=True)


class L0:
    """``alpha**2 / 2 * ||a||_0``, parametrised by its unit-step threshold ``alpha``:
    the prox at step ``s`` keeps the entries above ``alpha * sqrt(s)`` (LCA's hard
    threshold at ``s = 1``)."""

    def __init__(self, alpha, positive: bool = False):
        self.alpha = float(alpha)
        self.positive = bool(positive)

    def prox(self, z, step):
        return hard_threshold(z, self.alpha * math.sqrt(step), self.positive)

    def value(self, a):
        v = 0.5 * self.alpha**2 * (a != 0).sum(-1).to(a.dtype)
        if self.positive:
            v = torch.where((a < 0).any(-1), torch.full_like(v, math.inf), v)
        return v


class TopK:
    """The constraint ``||a||_0 <= k``: the prox keeps each row's ``k`` largest
    entries (by magnitude, by value if ``positive``), whatever the step."""

    def __init__(self, k: int, positive: bool = False):
        self.k = int(k)
        self.positive = bool(positive)

    def prox(self, z, step):
        return topk_threshold(z, self.k, self.positive)

    def value(self, a):
        bad = (a != 0).sum(-1) > self.k
        if self.positive:
            bad = bad | (a < 0).any(-1)
        zero = torch.zeros(a.shape[:-1], dtype=a.dtype, device=a.device)
        return torch.where(bad, torch.full_like(zero, math.inf), zero)


def penalty_for(kind: str, alpha, positive: bool = False):
    """The penalty of a threshold name: ``"soft"`` -> :class:`L1`, ``"hard"`` -> :class:`L0`."""
    if kind == "soft":
        return L1(alpha, positive)
    if kind == "hard":
        return L0(alpha, positive)
    raise ValueError(f"threshold must be 'soft' or 'hard', got {kind!r}.")
