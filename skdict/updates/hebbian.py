"""Olshausen & Field's (1996) Hebbian dictionary update (pure torch)."""

from __future__ import annotations

from .atoms import project_unit_norm

__all__ = ["hebbian_update"]


def hebbian_update(D, X, codes, lr):
    """One stochastic gradient step on ``0.5 ||X - codes D||^2 / n``:
    ``D + lr * codes^T (X - codes D) / n``, projected to unit-norm atoms.

    Returns a new tensor (``D`` is left untouched).
    """
    R = X - codes @ D
    return project_unit_norm(D + (lr / X.shape[0]) * (codes.T @ R), inplace=True)
