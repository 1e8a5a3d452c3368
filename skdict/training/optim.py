"""Optimisers for gradient-trained estimators: torch.optim, fused where torch offers it."""

from __future__ import annotations

import math

import torch

__all__ = ["make_optimizer", "OPTIMIZERS", "lr_factor", "normalize_grads"]

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


def lr_factor(step, total, decay):
    """Multiplier of the learning rate at ``step`` (0-based) of a run of ``total``
    steps: 1, then over the last ``n = ceil(decay * total)`` steps a linear fall
    ``n / (n + 1), ..., 1 / (n + 1)`` (towards 0 without reaching it, so every
    step still moves). ``total=None`` (unknown length) or ``decay=0``: 1."""
    if total is None or decay <= 0:
        return 1.0
    total = int(total)
    n_decay = min(total, math.ceil(decay * total - 1e-9))  # 0.3 * 10 is 3, not 4
    left = total - int(step)  # steps left, this one included
    if left > n_decay:
        return 1.0
    return max(left, 1) / (n_decay + 1)


def normalize_grads(params):
    """Divide the gradient of each tensor of ``params`` by its norm (in place).

    Before an Adam step this makes the step independent of the gradient's
    overall size: Adam's second moment then averages gradients of one scale, so
    the large gradients of the first steps do not shrink the later steps (the
    role that clipping the gradient norm, always active, plays in SAELens'
    training). A zero gradient is left as it is.
    """
    for p in params:
        g = p.grad
        if g is not None:
            g.div_(torch.linalg.vector_norm(g).clamp_min(torch.finfo(g.dtype).tiny))
