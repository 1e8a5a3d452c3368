"""Sparsity losses, a balanced-loss helper and a sparsity schedule.

* :func:`sparsity_loss` penalises the distance between a measured sparsity
  (fraction of active units, mean activation ...) and its target, with an
  ``"l2"``, ``"l1"``, ``"kl"`` (Bernoulli KL divergence, Ng's sparse
  autoencoder) or ``"huber"`` penalty.
* :func:`balanced_loss` sums named loss terms with weights that rescale each term
  to a target share of the total, so a sparsity term neither vanishes nor
  dominates the reconstruction term.
* :func:`fvu_loss` and :func:`auxk_loss` are the reconstruction terms of the
  sparse autoencoders (:class:`~skdict.KSparseAutoencoder`).
* :class:`AdaptiveSparsityScheduler` anneals a value (``k`` of a top-k
  autoencoder, Makhzani & Frey's k annealing, or a target sparsity) from
  ``initial`` to ``final`` over ``warmup_steps`` with a linear, cosine or step
  schedule, optionally advancing only while an accuracy criterion holds.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "sparsity_loss",
    "balanced_loss",
    "fvu_loss",
    "auxk_loss",
    "AdaptiveSparsityScheduler",
]

_KINDS = ("l2", "l1", "kl", "huber")


def _as_tensor(x, like=None):
    if isinstance(x, torch.Tensor):
        return x
    dtype = like.dtype if isinstance(like, torch.Tensor) else torch.float64
    device = like.device if isinstance(like, torch.Tensor) else None
    return torch.as_tensor(x, dtype=dtype, device=device)


def sparsity_loss(current, target, kind="l2", *, delta=1.0, eps=1e-8, reduction="mean"):
    """Penalty pulling a measured sparsity ``current`` toward ``target``.

    Parameters
    ----------
    current : float or torch.Tensor
        Measured sparsity, e.g. the mean activation of each latent over a batch
        (shape ``(n_latents,)``) or the fraction of active units.
    target : float or torch.Tensor
        The target (broadcast against ``current``). For ``"kl"`` both must lie in
        ``(0, 1)``; values are clamped to ``[eps, 1 - eps]``.
    kind : {"l2", "l1", "kl", "huber"}, default="l2"
        ``"l2"``: ``(c - t)**2``; ``"l1"``: ``|c - t|``; ``"kl"``: the Bernoulli
        KL divergence ``t log(t / c) + (1 - t) log((1 - t) / (1 - c))``;
        ``"huber"``: quadratic within ``delta`` of the target, linear beyond.
    delta : float, default=1.0
        Huber transition point.
    eps : float, default=1e-8
        Clamp for ``"kl"``.
    reduction : {"mean", "sum", "none"}, default="mean"

    Returns
    -------
    torch.Tensor
        Differentiable in ``current``.

    Examples
    --------
    >>> import torch
    >>> from skdict.losses import sparsity_loss
    >>> float(sparsity_loss(torch.tensor([0.1, 0.3]), 0.2, kind="l1"))
    0.1...
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    c = _as_tensor(current)
    t = _as_tensor(target, like=c)
    if kind == "l2":
        loss = (c - t) ** 2
    elif kind == "l1":
        loss = (c - t).abs()
    elif kind == "huber":
        if delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}.")
        loss = torch.nn.functional.huber_loss(
            c, t.expand_as(c) if t.dim() <= c.dim() else t, reduction="none", delta=delta
        )
    else:
        if bool(((t <= 0) | (t >= 1)).any()):
            raise ValueError("kind='kl' needs a target strictly between 0 and 1.")
        # eps is floored at the dtype's resolution (1 - 1e-8 is 1.0 in float32, where
        # log(1 - c) would be -inf); the clamp passes the gradient through, evaluated at
        # the clamped point, so a latent at exactly 0 or 1 is still pulled toward t
        e = max(float(eps), float(torch.finfo(c.dtype).eps) if c.is_floating_point() else eps)
        cc = c + (c.clamp(e, 1 - e) - c).detach()
        tt = t.clamp(e, 1 - e)
        loss = tt * torch.log(tt / cc) + (1 - tt) * torch.log((1 - tt) / (1 - cc))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def balanced_loss(losses, weights=None, *, shares=None, eps=1e-12):
    """Weighted sum of named losses, optionally balanced to target shares.

    Parameters
    ----------
    losses : dict of str to torch.Tensor
        Scalar loss terms.
    weights : dict of str to float, default=None
        Fixed weights (missing names weigh 1).
    shares : dict of str to float, default=None
        When given, each term is rescaled by a (gradient-free) factor so that its
        contribution to the total equals ``share * total_of_raw_terms``: terms of
        very different magnitudes then contribute comparably. Shares are
        normalised to sum to 1. Overrides ``weights``.
    eps : float
        Guard against division by zero.

    Returns
    -------
    total : torch.Tensor
    parts : dict of str to float
        The weighted value of each term (detached floats, for logging).

    Examples
    --------
    >>> import torch
    >>> from skdict.losses import balanced_loss
    >>> total, parts = balanced_loss({"mse": torch.tensor(4.0), "l1": torch.tensor(1.0)},
    ...                              shares={"mse": 0.5, "l1": 0.5})
    >>> round(parts["mse"], 6), round(parts["l1"], 6)
    (2.5, 2.5)
    """
    if not losses:
        raise ValueError("losses must contain at least one term.")
    names = list(losses)
    if shares is not None:
        unknown = set(shares) - set(names)
        if unknown:
            raise ValueError(f"shares name unknown losses: {sorted(unknown)}.")
        if any(float(s) < 0 for s in shares.values()):
            raise ValueError("shares must be non-negative.")
        tot_share = sum(float(shares.get(n, 0.0)) for n in names)
        if tot_share <= 0:
            raise ValueError("shares must have a positive sum.")
        raw_total = sum(float(losses[n].detach()) for n in names)
        w = {}
        for n in names:
            s = float(shares.get(n, 0.0)) / tot_share
            w[n] = s * raw_total / max(abs(float(losses[n].detach())), eps)
    else:
        weights = weights or {}
        unknown = set(weights) - set(names)
        if unknown:
            raise ValueError(f"weights name unknown losses: {sorted(unknown)}; the losses are "
                             f"{sorted(names)}.")
        w = {n: float(weights.get(n, 1.0)) for n in names}
    total = sum(w[n] * losses[n] for n in names)
    parts = {n: float(w[n] * losses[n].detach()) for n in names}
    return total, parts


def batch_variance(x):
    """``sum ||x_i - mean(x)||^2`` of a batch, detached, floored away from zero
    (the FVU denominator)."""
    with torch.no_grad():
        denom = ((x - x.mean(0)) ** 2).sum()
        # a tensor floor: no host synchronisation on the training path
        return torch.maximum(denom, 1e-12 * (x * x).sum() + 1e-30)


def fvu_loss(x, x_hat, denom=None):
    """Fraction of variance unexplained of a batch,
    ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (differentiable in ``x_hat``).

    Parameters
    ----------
    x, x_hat : torch.Tensor of shape (B, P)
    denom : torch.Tensor, default=None
        Precomputed :func:`batch_variance` of ``x``.

    Examples
    --------
    >>> import torch
    >>> from skdict.losses import fvu_loss
    >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> float(fvu_loss(x, torch.zeros_like(x)))
    1.0
    """
    if denom is None:
        denom = batch_variance(x)
    return ((x - x_hat) ** 2).sum() / denom


def auxk_loss(x, x_hat, pre, P, dead, k_aux):
    """AuxK loss (Gao et al. 2024): the FVU with which the dead latents' top
    ``k_aux`` pre-activations of each row reconstruct the residual ``x - x_hat``.

    Parameters
    ----------
    x, x_hat : torch.Tensor of shape (B, P)
        Batch and its reconstruction (the residual is detached).
    pre : torch.Tensor of shape (B, K)
        Detached pre-activations.
    P : dict of str to torch.Tensor
        ``W_enc`` (K, P), ``b_enc`` (K,), ``W_dec`` (K, P), ``b_dec`` (P,); the
        gradient reaches the encoder and decoder rows of the selected dead latents
        only (sparse kernels).
    dead : torch.Tensor of shape (K,), bool
    k_aux : int
        At most this many dead latents per row (fewer when fewer are dead).

    Returns
    -------
    torch.Tensor
        0-d loss; 0 when no latent is dead.
    """
    from .solvers.topk import select_topk, sparse_decode_pairs, sparse_encode

    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    with torch.no_grad():
        masked = pre.masked_fill(~dead[None, :], float("-inf"))
        pairs = select_topk(masked, min(int(k_aux), n_dead))
    vals = sparse_encode(x, P["W_enc"], P["b_enc"], pairs, pre, b_dec=P["b_dec"])
    e = (x - x_hat).detach()
    e_hat = sparse_decode_pairs(vals, P["W_dec"], pairs)
    e_den = ((e - e.mean(0)) ** 2).sum().clamp_min(1e-30)
    return ((e - e_hat) ** 2).sum() / e_den


class AdaptiveSparsityScheduler:
    """Anneal a sparsity parameter from ``initial`` to ``final``.

    Used by :class:`~skdict.KSparseAutoencoder` (``k_schedule``) to anneal ``k``
    from a large value down to the target (Makhzani & Frey 2013), which keeps
    more latents alive early in training; it can equally schedule a target
    sparsity or a penalty weight.

    Parameters
    ----------
    initial : float
        Value at step 0.
    final : float
        Value from ``warmup_steps`` on.
    warmup_steps : int
        Length of the annealing (>= 0; 0 means ``final`` from the start).
    schedule : {"linear", "cosine", "step"}, default="linear"
        ``"linear"`` interpolation, half-``"cosine"`` interpolation, or
        ``"step"``: ``n_steps`` equal plateaus between the two values.
    accuracy_threshold : float, default=None
        When set, the schedule only advances on steps whose reported accuracy
        (e.g. ``1 - FVU``, passed to :meth:`step`) is at least this value, so
        sparsity tightens only while reconstruction is good enough.
    n_steps : int, default=4
        Number of plateaus of the ``"step"`` schedule.
    integer : bool, default=None
        Round values to integers (default: when both ends are integers).

    Attributes
    ----------
    progress_ : int
        Steps counted so far toward ``warmup_steps``.

    Examples
    --------
    >>> from skdict.losses import AdaptiveSparsityScheduler
    >>> s = AdaptiveSparsityScheduler(128, 32, warmup_steps=4)
    >>> [s.step() for _ in range(6)]
    [104, 80, 56, 32, 32, 32]
    """

    def __init__(
        self,
        initial,
        final,
        warmup_steps,
        schedule="linear",
        accuracy_threshold=None,
        n_steps=4,
        integer=None,
    ):
        if schedule not in ("linear", "cosine", "step"):
            raise ValueError(
                f"schedule must be 'linear', 'cosine' or 'step', got {schedule!r}."
            )
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        if int(n_steps) < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}.")
        self.initial = initial
        self.final = final
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule
        self.accuracy_threshold = accuracy_threshold
        self.n_steps = int(n_steps)
        if integer is None:
            integer = isinstance(initial, numbers.Integral) and isinstance(
                final, numbers.Integral
            )
        self.integer = bool(integer)
        self.progress_ = 0

    def value_at(self, progress):
        """The scheduled value after ``progress`` counted steps."""
        if self.warmup_steps == 0 or progress >= self.warmup_steps:
            frac = 1.0
        else:
            frac = max(0.0, progress / self.warmup_steps)
        if self.schedule == "cosine":
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
        elif self.schedule == "step":
            frac = math.floor(frac * self.n_steps) / self.n_steps
        v = float(self.initial) + (float(self.final) - float(self.initial)) * frac
        return int(round(v)) if self.integer else v

    @property
    def value(self):
        """The current value."""
        return self.value_at(self.progress_)

    def step(self, accuracy=None):
        """Advance one step (unless ``accuracy`` is below the threshold) and
        return the new value."""
        if self.accuracy_threshold is None or (
            accuracy is not None and float(accuracy) >= self.accuracy_threshold
        ):
            self.progress_ += 1
        return self.value

    def reset(self):
        self.progress_ = 0
        return self
