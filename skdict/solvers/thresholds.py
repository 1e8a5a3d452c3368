"""Thresholding (proximal) operators, as pure torch functions."""

from __future__ import annotations

import torch

__all__ = [
    "soft_threshold",
    "hard_threshold",
    "topk_threshold",
    "threshold",
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

    This is the LCA threshold of the L0 penalty ``thresh**2 / 2 * ||a||_0``.
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
    """Dispatch to :func:`soft_threshold` or :func:`hard_threshold` by name."""
    if kind == "soft":
        return soft_threshold(u, thresh, positive)
    if kind == "hard":
        return hard_threshold(u, thresh, positive)
    raise ValueError(f"threshold must be 'soft' or 'hard', got {kind!r}.")
