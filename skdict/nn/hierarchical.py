"""Hierarchical sparse predictive coding as a torch module."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..solvers.hierarchical import (
    bottom_up_inference,
    free_energy_terms,
    generate,
    joint_inference,
    prediction_errors,
    unrolled_inference,
)

__all__ = ["HierarchicalSparseCoding"]


class HierarchicalSparseCoding(nn.Module):
    """Hierarchical sparse predictive coding: dictionaries per level, top-down
    predictions, prediction errors and the free energy, as a module.

    The model of :class:`skdict.HierarchicalSparseCoder` (see there): per row,
    ``F = sum_l 0.5 * p_l * ||a_{l-1} - a_l D_l||^2 + alpha_l * ||a_l||_1`` with
    ``a_0 = x``; the same functions (:mod:`skdict.solvers.hierarchical`)
    compute it. Parameters are the dictionaries ``dictionaries[l]`` of shape
    ``(K_{l+1}, K_l)`` and, with ``learn_sigma=True``, the log-precisions.

    Training loop (predictive coding): infer the codes, then take a gradient
    step on the free energy with respect to the parameters and renormalise::

        codes = model.encode(x)                    # no graph: an inner solve
        loss = model.free_energy(x, codes).mean()  # differentiable in D (and p)
        loss.backward(); opt.step(); model.normalize_()

    ``encode(x, differentiable=True)`` instead unrolls ``n_unroll`` monotone
    FISTA steps under autograd, so the codes themselves carry gradients (to
    ``x``, the dictionaries and the precisions).

    Parameters
    ----------
    n_features : int
    n_components : sequence of int
        Atoms per level, bottom first.
    alpha : float or sequence of float, default=1.0
    sigma : float or sequence of float, default=1.0
        Initial (or fixed) standard deviation of each level's prediction error.
    learn_sigma : bool, default=False
        Make the log-precisions ``log(1 / sigma**2)`` parameters; the free energy
        then includes the Gaussian log-normaliser (see
        :func:`skdict.solvers.hierarchical.free_energy_terms`).
    inference : {"joint", "bottom_up"}, default="joint"
    positive : bool, default=False
    max_iter : int, default=1000
        Iterations of joint inference.
    tol : float, default=1e-4
        Relative duality gap at which joint inference stops.
    n_unroll : int, default=50
        Steps of ``encode(..., differentiable=True)``.
    device, dtype : optional
    generator : torch.Generator, optional
        Draws the initial (Gaussian, unit-norm) atoms.

    Examples
    --------
    >>> import torch
    >>> from skdict.nn import HierarchicalSparseCoding
    >>> g = torch.Generator().manual_seed(0)
    >>> model = HierarchicalSparseCoding(16, (24, 8), alpha=(0.5, 0.2), generator=g)
    >>> x = torch.randn(32, 16, generator=g)
    >>> codes = model.encode(x)
    >>> [tuple(a.shape) for a in codes]
    [(32, 24), (32, 8)]
    >>> loss = model.free_energy(x, codes).mean()
    >>> loss.backward()
    >>> model.dictionaries[0].grad.shape
    torch.Size([24, 16])
    """

    def __init__(self, n_features, n_components, *, alpha=1.0, sigma=1.0, learn_sigma=False,
                 inference="joint", positive=False, max_iter=1000, tol=1e-4, n_unroll=50,
                 device=None, dtype=None, generator=None):
        super().__init__()
        sizes = [int(k) for k in np.atleast_1d(n_components)]
        if not sizes or min(sizes) < 1:
            raise ValueError(
                f"n_components must list at least one level of >= 1 atoms, got {n_components!r}."
            )
        if inference not in ("joint", "bottom_up"):
            raise ValueError(f"inference must be 'joint' or 'bottom_up', got {inference!r}.")
        L = len(sizes)
        alpha = self._per_level(alpha, L, "alpha")
        sigma = self._per_level(sigma, L, "sigma")
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        dims = [int(n_features), *sizes]
        atoms = []
        for k, d in zip(sizes, dims[:-1], strict=True):
            D = torch.randn(k, d, generator=generator, dtype=factory["dtype"])
            atoms.append(nn.Parameter((D / D.norm(dim=1, keepdim=True)).to(device)))
        self.dictionaries = nn.ParameterList(atoms)
        log_p = torch.tensor([-2 * math.log(s) for s in sigma], **factory)
        if learn_sigma:
            self.log_precisions = nn.Parameter(log_p)
        else:
            self.register_buffer("log_precisions", log_p)
        self.register_buffer("alpha", torch.tensor(alpha, **factory))
        self.learn_sigma = bool(learn_sigma)
        self.inference = inference
        self.positive = bool(positive)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.n_unroll = int(n_unroll)

    @staticmethod
    def _per_level(value, L, name):
        vals = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]
        if len(vals) == 1:
            vals = vals * L
        if len(vals) != L or any(not math.isfinite(v) or v <= 0 for v in vals):
            raise ValueError(f"{name} must be > 0, a scalar or one value per level ({L}); "
                             f"got {value!r}.")
        return vals

    @classmethod
    def from_estimator(cls, estimator, **kwargs):
        """The module of a fitted :class:`skdict.HierarchicalSparseCoder` (its
        dictionaries, ``alpha``, ``sigma_``, inference rule and tolerances)."""
        comps = estimator.components_
        opts = {"alpha": estimator.alpha, "sigma": estimator.sigma_,
                "inference": estimator.inference, "positive": estimator.positive_code,
                "max_iter": estimator.transform_max_iter, "tol": estimator.inference_tol,
                "dtype": torch.float64 if comps[0].dtype == np.float64 else torch.float32}
        opts.update(kwargs)
        model = cls(comps[0].shape[1], [D.shape[0] for D in comps], **opts)
        with torch.no_grad():
            for P, D in zip(model.dictionaries, comps, strict=True):
                P.copy_(torch.as_tensor(D))
        return model

    @property
    def precisions(self):
        """``1 / sigma**2`` per level (a tensor, differentiable when learned)."""
        return self.log_precisions.exp()

    def _dicts(self):
        return list(self.dictionaries)

    def encode(self, x, *, differentiable=False):
        """Codes of every level (a list, bottom first).

        ``differentiable=False``: the inference of ``inference`` (joint: stopped
        on ``tol``), outside the autograd graph. ``differentiable=True``:
        ``n_unroll`` monotone FISTA steps from zero, inside it.
        """
        if differentiable:
            return unrolled_inference(x, self._dicts(), self.alpha.tolist(), self.precisions,
                                      n_iter=self.n_unroll, positive=self.positive)
        with torch.no_grad():
            dicts = [D.detach() for D in self._dicts()]
            alpha, p = self.alpha.tolist(), self.precisions.tolist()
            x = x.detach()
            if self.inference == "bottom_up":
                return bottom_up_inference(x, dicts, alpha, p, positive=self.positive).codes
            return joint_inference(x, dicts, alpha, p, positive=self.positive,
                                   max_iter=self.max_iter, tol=self.tol).codes

    def forward(self, x):
        """The top level's codes (a feature extractor), see :meth:`encode`."""
        return self.encode(x)[-1]

    def decode(self, top):
        """Top-down generation of the data from the top level's codes."""
        return generate(top, self._dicts())

    def predictions(self, codes):
        """Each level's prediction of the level below, ``a_l D_l``."""
        return [a @ D for a, D in zip(codes, self._dicts(), strict=True)]

    def prediction_errors(self, x, codes):
        """``a_{l-1} - a_l D_l`` per level (``a_0 = x``)."""
        return prediction_errors(x, codes, self._dicts())

    def free_energy(self, x, codes=None, *, per_level=False):
        """Free energy of each row (``per_level=True``: ``(n, L)`` terms), differentiable
        in ``x``, the codes and the parameters. ``codes=None`` infers them first
        (:meth:`encode`). With ``learn_sigma`` the log-normaliser is included."""
        if codes is None:
            codes = self.encode(x)
        terms = free_energy_terms(x, codes, self._dicts(), self.alpha, self.precisions,
                                  normalizer=self.learn_sigma)
        return terms if per_level else terms.sum(-1)

    @torch.no_grad()
    def normalize_(self):
        """Rescale every atom to unit norm, in place (after an optimiser step)."""
        for D in self.dictionaries:
            D.div_(D.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return self

    def extra_repr(self):
        sizes = [int(self.dictionaries[0].shape[1])] + [int(D.shape[0]) for D in self.dictionaries]
        return f"sizes={sizes}, inference={self.inference!r}, learn_sigma={self.learn_sigma}"
