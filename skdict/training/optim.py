"""Optimisers for gradient-trained estimators: torch.optim, fused where torch offers it."""

from __future__ import annotations

import torch

__all__ = ["make_optimizer", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name, params, lr, *, betas=(0.9, 0.999), eps=1e-8):
    """A ``torch.optim`` optimiser over ``params`` (an iterable of tensors).

    ``"adam"``: :class:`torch.optim.Adam` with ``fused=True`` (one kernel over
    all parameters) where torch supports it for these tensors, else the
    ``foreach`` implementation. ``"sgd"``: plain :class:`torch.optim.SGD`.
    """
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name != "adam":
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError, TypeError):  # device / dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)
