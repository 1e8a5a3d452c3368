"""The protocol every sparse-autoencoder variant implements, and the registry.

A variant is one small class, in its own file, that says how an autoencoder with
encoder ``pre = (x - b_dec) @ W_enc.T + b_enc`` and decoder
``x_hat = z @ W_dec + b_dec`` turns pre-activations into codes:

* in training (:meth:`Encoder.forward`): which latents are active, their values,
  the reconstruction(s) whose fraction of variance unexplained is minimised, and
  a penalty;
* at inference (:meth:`Encoder.encode`): one of two batch-independent rules,
  ``"topk"`` (the ``k`` largest pre-activations of each row, ReLU) or
  ``"threshold"`` (``pre * (pre > threshold)`` with one threshold per latent;
  ReLU codes are the zero threshold);
* extra learned parameters (:meth:`Encoder.init_parameters`, e.g. JumpReLU's
  log-thresholds) and running buffers (:meth:`Encoder.init_buffers`, e.g.
  BatchTopK's threshold);
* its SAELens architecture: the name and extra tensors / config fields written
  by ``to_saelens`` and read back by ``from_saelens``.

Variants register themselves by name with :func:`register`;
``KSparseAutoencoder(sparsity=...)`` accepts exactly :func:`encoder_names`.
A variant is constructed from the estimator's parameters it names in
``params`` (a variant needing a new hyper-parameter also adds it to the
estimator).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..data.codes import Codes
from ..solvers.topk import sparse_decode_pairs, sparse_encode

__all__ = [
    "Encoder",
    "SelectingEncoder",
    "selected_output",
    "TrainOutput",
    "register",
    "get_encoder",
    "encoder_names",
    "encoder_options",
    "encoder_for_saelens",
    "unregister",
    "preactivations",
]

_REGISTRY: dict[str, type[Encoder]] = {}
# the registered names, one live set: the estimator's StrOptions hold it, so a
# variant registered after import is accepted too
_NAMES: set = set()


def register(cls):
    """Class decorator adding an :class:`Encoder` subclass to the registry."""
    if cls.name in _REGISTRY:
        raise ValueError(f"an encoder named {cls.name!r} is already registered.")
    _REGISTRY[cls.name] = cls
    _NAMES.add(cls.name)
    return cls


def unregister(name):
    """Remove the variant ``name`` from the registry."""
    _REGISTRY.pop(name)
    _NAMES.discard(name)


def encoder_options():
    """The live set of registered names (for ``StrOptions`` constraints)."""
    return _NAMES


def get_encoder(name) -> type[Encoder]:
    """The registered variant class called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown sparsity {name!r}; choose one of {sorted(_REGISTRY)}."
        ) from None


def encoder_names():
    """Names of the registered variants (the values of ``sparsity``)."""
    return tuple(_REGISTRY)


def encoder_for_saelens(architecture):
    """The variant that imports SAELens architecture ``architecture``."""
    for cls in _REGISTRY.values():
        if architecture in cls.saelens_imports:
            return cls
    supported = sorted({a for c in _REGISTRY.values() for a in c.saelens_imports})
    raise ValueError(
        f"SAELens architecture {architecture!r} is not supported; supported: {supported}."
    )


def preactivations(x, P, out=None):
    """``(x - b_dec) @ W_enc.T + b_enc`` for parameters ``P`` (into ``out`` if given)."""
    return torch.addmm(P["b_enc"], x - P["b_dec"], P["W_enc"].T, out=out)


@dataclass
class TrainOutput:
    """What a variant's training forward pass returns.

    Attributes
    ----------
    reconstructions : list of torch.Tensor
        Reconstructions whose FVUs are summed into the loss; the last one is the
        model's output ``x_hat`` (Matryoshka adds its prefix reconstructions).
    penalty : torch.Tensor
        0-d sparsity penalty added to the loss.
    fired : torch.Tensor
        ``(n_components,)`` bool, latents active on some row of the batch.
    l0 : torch.Tensor
        0-d, mean number of active latents per row.
    pairs : SparsePairs or None
        The selected (row, latent) pairs when the variant trains on the sparse
        kernels (used by the AuxK loss); None for dense variants.
    metrics : dict
        Extra per-step metrics (0-d tensors) for ``history_``.
    """

    reconstructions: list
    penalty: torch.Tensor
    fired: torch.Tensor
    l0: torch.Tensor
    pairs: object = None
    metrics: dict = field(default_factory=dict)


class Encoder(ABC):
    """Base of the sparse-autoencoder variants (see the module docstring).

    Attributes
    ----------
    name : str
        Registry key, the value of ``KSparseAutoencoder(sparsity=...)``.
    params : tuple of str
        Estimator parameters the variant is constructed from.
    sparse : bool
        Trains on the sparse kernels: the estimator computes the pre-activations
        once without gradient and passes them to :meth:`forward`.
    inference : {"topk", "threshold"}
        The batch-independent inference rule.
    auxk : bool
        Dead latents get the AuxK loss.
    saelens_architecture : str or None
        Architecture written by ``to_saelens``.
    saelens_imports : tuple of str
        SAELens architectures ``from_saelens`` maps to this variant.
    encoder_init_norm : float
        Norm of the encoder rows at initialisation (each along its decoder row).
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple] = ("k",)
    sparse: ClassVar[bool] = True
    inference: ClassVar[str] = "topk"
    auxk: ClassVar[bool] = True
    saelens_architecture: ClassVar[str | None] = None
    saelens_imports: ClassVar[tuple] = ()
    # small rows: pre-activations start small and the first steps set their scale
    encoder_init_norm: ClassVar[float] = 0.04

    def __init__(self, n_components, **params):
        self.n_components = int(n_components)
        for p in self.params:
            setattr(self, p, params[p])

    @classmethod
    def from_estimator(cls, est):
        return cls(est.n_components, **{p: getattr(est, p) for p in cls.params})

    def check_params(self):
        """Raise ValueError for parameter combinations the variant cannot train."""
        k = getattr(self, "k", None)
        if k is not None and k > self.n_components:
            raise ValueError(
                f"k={k} exceeds n_components={self.n_components}; choose "
                "k <= n_components."
            )

    # ------------------------------------------------------------ training
    def init_parameters(self, P, x0):
        """Extra learned tensors (name -> tensor), from the initial parameters ``P``
        and initialisation rows ``x0`` (already scaled)."""
        return {}

    def init_buffers(self, P):
        """Running, non-learned state (name -> tensor)."""
        return {}

    def from_threshold(self, P, threshold):
        """``(extra parameters, buffers)`` of a fitted model whose inference
        threshold is ``threshold`` (a ``(n_components,)`` tensor): how a model
        loaded without training state (e.g. from SAELens) resumes training."""
        return {}, self.init_buffers(P)

    @abstractmethod
    def forward(self, x, P, k, buffers, pre=None) -> TrainOutput:
        """Training forward pass on a batch ``x``; ``k`` is the current (possibly
        scheduled) ``k``; ``pre`` the detached pre-activations when ``sparse``.
        May update ``buffers`` in place."""

    # ------------------------------------------------------------ inference
    def inference_threshold(self, P, buffers):
        """``(n_components,)`` thresholds of the ``"threshold"`` rule."""
        return P["b_enc"].new_zeros(self.n_components)

    def encode(self, pre, threshold, k):
        """Inference codes of pre-activations ``pre`` (b, K) as :class:`Codes`."""
        if self.inference == "topk":
            vals, idx = torch.topk(pre, min(int(k), pre.shape[1]), dim=1, sorted=False)
            return Codes(indices=idx, values=torch.relu(vals))
        return Codes(dense=pre * (pre > threshold.clamp_min(0)))

    # ------------------------------------------------------------ SAELens
    def saelens_config(self):
        """Architecture-specific fields of SAELens' ``cfg.json``."""
        return {}

    def saelens_tensors(self, threshold):
        """Architecture-specific tensors of SAELens' weights file (numpy)."""
        return {}

    @classmethod
    def from_saelens(cls, cfg, tensors, d_sae):
        """``(params, threshold)`` from a SAELens config and tensors: estimator
        parameters to set and the ``(d_sae,)`` inference threshold (numpy or None)."""
        return {}, None


class SelectingEncoder(Encoder):
    """A variant that selects (row, latent) pairs from the detached
    pre-activations and trains on the sparse kernels of
    :mod:`skdict.solvers.topk`: only the selected pairs carry values and
    gradients."""

    sparse = True

    @abstractmethod
    def select(self, pre, k, buffers):
        """:class:`~skdict.solvers.topk.SparsePairs` selected from ``pre``."""

    def forward(self, x, P, k, buffers, pre=None):
        pairs = self.select(pre, k, buffers)
        vals = sparse_encode(x, P["W_enc"], P["b_enc"], pairs, pre, b_dec=P["b_dec"])
        x_hat = sparse_decode_pairs(vals, P["W_dec"], pairs) + P["b_dec"]
        out = selected_output(x, [x_hat], pairs, vals)
        self.after_step(out, vals, buffers)
        return out

    def after_step(self, out, vals, buffers):
        """Update running buffers from the step's selected values."""


def selected_output(x, reconstructions, pairs, vals):
    """:class:`TrainOutput` of a step on selected pairs with values ``vals``
    (no penalty; ``fired`` and ``l0`` count the positive values)."""
    with torch.no_grad():
        active = vals.detach() > 0
        fired = torch.zeros(pairs.n_cols, dtype=torch.bool, device=x.device)
        fired[pairs.col[active]] = True
        l0 = active.sum().to(x.dtype) / x.shape[0]
    return TrainOutput(reconstructions, x.new_zeros(()), fired, l0, pairs)
