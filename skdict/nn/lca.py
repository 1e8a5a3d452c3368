"""The Locally Competitive Algorithm unrolled as a differentiable layer."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..penalties import penalty_for
from .lista import lipschitz_constant

__all__ = ["LCALayer", "LCAOutput"]


class LCAOutput(NamedTuple):
    """What :class:`LCALayer` returns.

    Attributes
    ----------
    codes : torch.Tensor
        ``(n_rows, n_components)`` thresholded activations ``a``.
    reconstruction : torch.Tensor
        ``a @ D``, ``(n_rows, n_features)``.
    reconstruction_loss : torch.Tensor
        0-d, mean over rows of ``0.5 ||x - a D||^2``.
    sparsity_loss : torch.Tensor
        0-d, mean over rows of the penalty: ``alpha ||a||_1`` (soft threshold) or
        ``alpha**2 / 2 ||a||_0`` (hard threshold; no gradient).
    """

    codes: torch.Tensor
    reconstruction: torch.Tensor
    reconstruction_loss: torch.Tensor
    sparsity_loss: torch.Tensor

    @property
    def loss(self):
        """``reconstruction_loss + sparsity_loss``: the mean LCA energy."""
        return self.reconstruction_loss + self.sparsity_loss


class LCALayer(nn.Module):
    """LCA dynamics (Rozell et al. 2008) unrolled for ``n_iter`` steps, with a
    learnable unit-norm dictionary.

    For a batch ``x`` the potentials ``u`` (starting at 0) follow::

        u <- u + (1 / tau) * (x D^T - u - a (D D^T - I)),     a = T_alpha(u)

    where the rows of ``D`` are the atoms, normalised to unit length in every
    forward pass (``D = weight / ||weight||`` row-wise, so gradients move the
    atoms on the sphere); ``a (D D^T - I)`` is the lateral inhibition (an atom
    does not inhibit itself) and ``T_alpha`` the soft (or hard) threshold at
    ``alpha``. With the soft threshold the fixed points are the lasso codes of
    ``0.5 ||x - a D||^2 + alpha ||a||_1``. Gradients flow through all steps to
    the dictionary and to the input.

    Parameters
    ----------
    n_features : int
    n_components : int
    alpha : float, default=0.1
        Threshold (L1 weight for ``threshold="soft"``).
    n_iter : int, default=100
        Unrolled steps.
    tau : float, default=None
        Time constant in units of the step; None uses the largest eigenvalue of
        ``D D^T`` in each forward pass (the fastest stable choice, treated as a
        constant by autograd).
    threshold : {"soft", "hard"}, default="soft"
    positive : bool, default=False
        Non-negative (rectified) activations.
    dictionary : torch.Tensor or array-like of shape (n_components, n_features), \
default=None
        Initial atoms; None draws Gaussian atoms (with ``generator``).
    generator : torch.Generator, default=None
    dtype, device : optional

    Attributes
    ----------
    weight : torch.nn.Parameter of shape (n_components, n_features)
        Unnormalised atoms; :attr:`dictionary` is its row-normalised version.

    Examples
    --------
    >>> import torch
    >>> from skdict.nn import LCALayer
    >>> layer = LCALayer(16, 32, alpha=0.2, n_iter=50,
    ...                  generator=torch.Generator().manual_seed(0))
    >>> out = layer(torch.randn(8, 16))
    >>> out.codes.shape, out.loss.ndim
    (torch.Size([8, 32]), 0)
    >>> out.loss.backward()  # gradients reach layer.weight
    """

    def __init__(self, n_features, n_components, *, alpha=0.1, n_iter=100, tau=None,
                 threshold="soft", positive=False, dictionary=None, generator=None,
                 dtype=None, device=None):
        super().__init__()
        if int(n_iter) < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}.")
        if float(alpha) < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        if tau is not None and not float(tau) > 0:
            raise ValueError(f"tau must be > 0, got {tau}.")
        penalty_for(threshold, alpha, positive)  # validates the threshold name
        self.n_features, self.n_components = int(n_features), int(n_components)
        self.alpha = float(alpha)
        self.n_iter = int(n_iter)
        self.tau = None if tau is None else float(tau)
        self.threshold = threshold
        self.positive = bool(positive)
        if dictionary is None:
            W = torch.randn(self.n_components, self.n_features, generator=generator,
                            dtype=dtype or torch.get_default_dtype(), device=device)
        else:
            W = torch.as_tensor(dictionary).detach().clone()
            if W.shape != (self.n_components, self.n_features):
                raise ValueError(
                    f"dictionary must have shape (n_components, n_features) = "
                    f"{(self.n_components, self.n_features)}, got {tuple(W.shape)}."
                )
            W = W.to(dtype=dtype or (W.dtype if W.is_floating_point() else None),
                     device=device)
        if not bool((W.norm(dim=1) > 0).all()):
            raise ValueError("Every atom of the dictionary needs a non-zero norm.")
        self.weight = nn.Parameter(W)

    def extra_repr(self):
        return (f"n_features={self.n_features}, n_components={self.n_components}, "
                f"alpha={self.alpha:g}, n_iter={self.n_iter}, threshold={self.threshold!r}")

    @property
    def dictionary(self):
        """The unit-norm atoms ``(n_components, n_features)`` (differentiable)."""
        return self.weight / self.weight.norm(dim=1, keepdim=True)

    def forward(self, x):
        """Run the dynamics on ``x`` (``(n_rows, n_features)``); returns an
        :class:`LCAOutput`."""
        D = self.dictionary
        pen = penalty_for(self.threshold, self.alpha, self.positive)
        tau = self.tau if self.tau is not None else lipschitz_constant(D)
        eta = 1.0 / tau
        b = x @ D.T
        G = D @ D.T
        u = torch.zeros_like(b)
        a = pen.prox(u, 1.0)
        for _ in range(self.n_iter):
            u = u + eta * (b - u - (a @ G - a))
            a = pen.prox(u, 1.0)
        x_hat = a @ D
        r = x - x_hat
        recon = 0.5 * (r * r).sum(1).mean()
        sparsity = pen.value(a).mean()
        return LCAOutput(a, x_hat, recon, sparsity)
