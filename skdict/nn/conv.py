"""A differentiable convolutional sparse coding layer (unrolled FISTA)."""

from __future__ import annotations

import torch
from torch import nn

from ..operators.base import power_iteration
from ..operators.conv import ConvOperator

__all__ = ["ConvSparseCoding", "conv_sparse_coding"]


def _soft(u, t, positive):
    if positive:
        return torch.relu(u - t)
    return torch.relu(u - t) - torch.relu(-u - t)


def conv_sparse_coding(x, weight, alpha, n_iter, *, boundary="circular", positive=False,
                       L=None):
    """Codes of ``x`` ``(N, C, H, W)`` for the filters ``weight``
    ``(M, C, kh, kw)`` by ``n_iter`` FISTA steps on
    ``0.5 ||sum_m d_m * z_m - x||^2 + alpha ||z||_1``; returns the maps
    ``(N, M, Hm, Wm)`` (see :class:`skdict.operators.ConvOperator` for the map
    size). Differentiable in ``x``, ``weight`` and ``alpha``; ``L`` (a float,
    treated as a constant) is the step's Lipschitz constant, by power
    iteration on the convolution when None.
    """
    N, C, H, W = x.shape
    op = ConvOperator(weight, (C, H, W), boundary)
    if L is None:
        L = spectral_norm2(weight.detach(), (C, H, W), boundary)
    c = op.adjoint(x.reshape(N, -1))
    z = torch.zeros_like(c)
    y, t = z, 1.0
    thresh = alpha / L
    for _ in range(int(n_iter)):
        z_new = _soft(y - (op.normal(y) - c) / L, thresh, positive)
        t_new = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
        y = z_new + ((t - 1.0) / t_new) * (z_new - z)
        z, t = z_new, t_new
    return op.maps(z)


def spectral_norm2(weight, image_shape, boundary="circular", n_iter=200, tol=1e-7):
    """``||D||_2^2`` of the convolution with ``weight`` on images of
    ``image_shape`` ``(C, H, W)``, by power iteration on ``D^T D`` (x 1.01)."""
    op = ConvOperator(weight.detach(), tuple(image_shape), boundary)
    with torch.no_grad():
        return power_iteration(lambda v: op.normal(v[None])[0], size=op.n_atoms,
                               dtype=op.dtype, device=op.device, n_iter=n_iter, tol=tol)


class ConvSparseCoding(nn.Module):
    """Convolutional sparse coding as a layer: ``(N, C, H, W)`` images to
    ``(N, n_filters, Hm, Wm)`` code maps by ``n_iter`` unrolled FISTA steps.

    The step is ``1 / L`` with ``L = ||D||_2^2`` the true squared spectral norm
    of the convolution on the input's grid (power iteration on ``D^T D``, cached
    until the filters or the input size change), so the unrolled iterations are
    those of FISTA at every filter value. Gradients reach the input, the
    filters and ``alpha``.

    Parameters
    ----------
    in_channels : int
    n_filters : int
    kernel_size : int or tuple of int
    alpha : float, default=0.1
        L1 weight (a learnable parameter when ``learn_alpha``).
    n_iter : int, default=20
    boundary : {"circular", "zero"}, default="circular"
        ``"zero"`` gives maps of ``(H + kh - 1, W + kw - 1)``.
    positive : bool, default=False
    learn_alpha : bool, default=False

    Examples
    --------
    >>> import torch
    >>> from skdict.nn import ConvSparseCoding
    >>> layer = ConvSparseCoding(1, 4, 3, alpha=0.1, n_iter=5)
    >>> layer(torch.randn(2, 1, 16, 16)).shape
    torch.Size([2, 4, 16, 16])
    >>> layer.reconstruct(layer(torch.randn(2, 1, 16, 16))).shape
    torch.Size([2, 1, 16, 16])
    """

    def __init__(self, in_channels, n_filters, kernel_size, alpha=0.1, n_iter=20, *,
                 boundary="circular", positive=False, learn_alpha=False, generator=None):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if boundary not in ("circular", "zero"):
            raise ValueError(f"boundary must be 'circular' or 'zero', got {boundary!r}.")
        if alpha < 0 or n_iter < 1:
            raise ValueError(f"alpha must be >= 0 and n_iter >= 1, got {alpha}, {n_iter}.")
        w = torch.randn(n_filters, in_channels, kh, kw, generator=generator)
        w = w / w.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        self.weight = nn.Parameter(w)
        a = torch.tensor(float(alpha))
        if learn_alpha:
            self.alpha = nn.Parameter(a)
        else:
            self.register_buffer("alpha", a)
        self.n_iter = int(n_iter)
        self.boundary = boundary
        self.positive = positive
        self._L_key = None
        self._L = None

    def lipschitz(self, image_shape):
        """``||D||_2^2`` (x 1.01) for images of ``image_shape`` ``(C, H, W)``."""
        w = self.weight
        key = (tuple(image_shape), w._version, w.data_ptr(), w.device, w.dtype)
        if key != self._L_key:
            self._L = spectral_norm2(w, image_shape, self.boundary)
            self._L_key = key
        return self._L

    def forward(self, x):
        L = self.lipschitz(tuple(x.shape[1:]))
        return conv_sparse_coding(x, self.weight, self.alpha, self.n_iter, boundary=self.boundary,
                                  positive=self.positive, L=L)

    def reconstruct(self, z, image_shape=None):
        """Images from code maps ``z`` ``(N, M, Hm, Wm)``."""
        C = self.weight.shape[1]
        if image_shape is None:
            kh, kw = self.weight.shape[2:]
            H, W = z.shape[2:]
            image_shape = (C, H, W) if self.boundary == "circular" else (
                C, H - kh + 1, W - kw + 1)
        op = ConvOperator(self.weight, tuple(image_shape), self.boundary)
        return op.forward(z.reshape(z.shape[0], -1)).reshape(z.shape[0], *image_shape)
