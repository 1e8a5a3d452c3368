"""Convolutional dictionaries: a bank of filters applied by FFT convolution.

Signals are images of shape ``(C, H, W)`` (``C = 1`` and ``H = 1`` for 1-D
signals), flattened in C order; codes are ``M`` maps of shape ``(Hm, Wm)``,
flattened in (filter, row, col) order, so that the solvers see the flat
``(n, n_atoms)`` rows of :mod:`skdict.operators.base`. The synthesis is::

    x_c = sum_m d_{m,c} * z_m

``boundary="circular"``: ``*`` is the circular convolution on the image grid
(``Hm, Wm = H, W``, as sporco). ``boundary="zero"``: ``*`` is the linear
convolution keeping its ``"valid"`` part (``scipy.signal.convolve(z, d,
"valid")``), with maps of size ``(H + kh - 1, W + kw - 1)``: every pixel sees
every filter tap and there is no wrap-around; the maps extend ``kh - 1`` /
``kw - 1`` beyond the top / left edges, so edge structure has codes of its own.

Both are computed on the map grid with ``torch.fft.rfft2``: the filters' DFTs
are computed once per operator. In the DFT domain the normal map
``D^H D + rho I`` is block-diagonal (one ``M x M`` rank-``C`` block per
frequency), which :meth:`ConvOperator.solve_normal` inverts by the
Sherman-Morrison formula (Woodbury with a ``C x C`` solve for ``C > 1``),
the per-frequency solve of Wohlberg (2016).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._backend import torch_dtype
from .base import Operator, conjugate_gradient, power_iteration

__all__ = ["ConvOperator", "as_conv_filters", "conv_operator"]

_BOUNDARIES = ("circular", "zero")


def as_conv_filters(filters, image_shape):
    """The filters as a ``(M, C, kh, kw)`` array and the image as ``(C, H, W)``.

    ``image_shape`` is ``(T,)`` (1-D signals: filters ``(M, k)``), ``(H, W)``
    (filters ``(M, kh, kw)``) or ``(C, H, W)`` (filters ``(M, C, kh, kw)``).
    Raises ValueError when the filters do not fit the image.
    """
    image_shape = tuple(int(s) for s in image_shape)
    nd = len(image_shape)
    if nd not in (1, 2, 3):
        raise ValueError(
            f"image_shape must be (T,), (H, W) or (C, H, W), got {image_shape!r}."
        )
    shape = tuple(filters.shape)
    want = {1: "(n_filters, k)", 2: "(n_filters, kh, kw)", 3: "(n_filters, C, kh, kw)"}[nd]
    if len(shape) != nd + 1:
        raise ValueError(
            f"filters of shape {shape} do not match image_shape={image_shape}: "
            f"expected {want}."
        )
    if nd == 3 and shape[1] != image_shape[0]:
        raise ValueError(
            f"filters have {shape[1]} channels but image_shape={image_shape} has "
            f"{image_shape[0]}; filters must be {want}."
        )
    if nd == 1:
        f4 = filters.reshape(shape[0], 1, 1, shape[1])
        img = (1, 1, image_shape[0])
    elif nd == 2:
        f4 = filters.reshape(shape[0], 1, shape[1], shape[2])
        img = (1, *image_shape)
    else:
        f4, img = filters, image_shape
    if f4.shape[2] > img[1] or f4.shape[3] > img[2]:
        raise ValueError(
            f"filters of spatial size {tuple(shape[-nd if nd < 3 else -2:])} are larger "
            f"than the image {image_shape[-min(nd, 2):]} ({math.prod(image_shape)} "
            "feature(s) per row); use smaller filters or larger images."
        )
    return f4, img


class ConvOperator(Operator):
    """A filter bank as a dictionary operator (see the module docstring).

    Parameters
    ----------
    filters : Tensor of shape (M, C, kh, kw)
        The filters (``as_conv_filters`` maps the 1-D / 2-D shapes to this).
    image_shape : tuple (C, H, W)
    boundary : {"circular", "zero"}, default="circular"

    Attributes
    ----------
    map_shape : tuple (Hm, Wm)
    n_atoms : int
        ``M * Hm * Wm``.
    n_features : int
        ``C * H * W``.
    """

    def __init__(self, filters, image_shape, boundary="circular"):
        if boundary not in _BOUNDARIES:
            raise ValueError(f"boundary must be one of {_BOUNDARIES}, got {boundary!r}.")
        if filters.ndim != 4:
            raise ValueError(f"filters must be (M, C, kh, kw), got shape {tuple(filters.shape)}.")
        C, H, W = (int(s) for s in image_shape)
        M, Cf, kh, kw = filters.shape
        if Cf != C or kh > H or kw > W:
            raise ValueError(
                f"filters of shape {tuple(filters.shape)} do not fit images of shape "
                f"{(C, H, W)}."
            )
        self.filters = filters
        self.boundary = boundary
        self.image_shape = (C, H, W)
        self.kernel_shape = (kh, kw)
        self.n_filters, self.n_channels = M, C
        self.map_shape = (H, W) if boundary == "circular" else (H + kh - 1, W + kw - 1)
        self.n_atoms = M * self.map_shape[0] * self.map_shape[1]
        self.n_features = C * H * W
        self.dtype = filters.dtype
        self.device = filters.device
        self._lipschitz = None
        # (M, C, Hm, Wm // 2 + 1): differentiable in the filters (the nn layer)
        self.Dhat = torch.fft.rfft2(filters, s=self.map_shape)
        self._P = None  # D D^H per frequency
        if boundary == "zero":
            self._circ = None

    # ---------------------------------------------------------------- shapes
    def maps(self, a):
        """Flat codes ``(n, n_atoms)`` -> maps ``(n, M, Hm, Wm)``."""
        return a.reshape(a.shape[0], self.n_filters, *self.map_shape)

    def images(self, x):
        """Flat signals ``(n, n_features)`` -> images ``(n, C, H, W)``."""
        return x.reshape(x.shape[0], *self.image_shape)

    def _rfft(self, t):
        return torch.fft.rfft2(t)

    def _irfft(self, t):
        return torch.fft.irfft2(t, s=self.map_shape)

    # ---------------------------------------------------------------- DFT domain
    def _synth_hat(self, zh):
        """``(n, M, F)`` code DFTs -> ``(n, C, F)`` signal DFTs."""
        if self.n_channels == 1:
            return (zh * self.Dhat[:, 0]).sum(1, keepdim=True)
        return torch.einsum("nmhw,mchw->nchw", zh, self.Dhat)

    def _analysis_hat(self, xh):
        """``(n, C, F)`` signal DFTs -> ``(n, M, F)`` correlation DFTs."""
        if self.n_channels == 1:
            return xh * self.Dhat[:, 0].conj()
        return torch.einsum("nchw,mchw->nmhw", xh, self.Dhat.conj())

    def _crop(self, y):
        if self.boundary == "circular":
            return y
        kh, kw = self.kernel_shape
        return y[..., kh - 1:, kw - 1:]

    def _embed(self, x):
        if self.boundary == "circular":
            return x
        kh, kw = self.kernel_shape
        return torch.nn.functional.pad(x, (kw - 1, 0, kh - 1, 0))

    # ---------------------------------------------------------------- protocol
    def forward(self, a):
        y = self._irfft(self._synth_hat(self._rfft(self.maps(a))))
        return self._crop(y).reshape(a.shape[0], -1)

    def adjoint(self, x):
        xh = self._rfft(self._embed(self.images(x)))
        return self._irfft(self._analysis_hat(xh)).reshape(x.shape[0], -1)

    def normal(self, a):
        if self.boundary == "zero":
            return self.adjoint(self.forward(a))
        zh = self._rfft(self.maps(a))
        return self._irfft(self._analysis_hat(self._synth_hat(zh))).reshape(a.shape[0], -1)

    def gram_hat(self):
        """``D(f) D(f)^H`` per frequency: ``(F1, F2)`` real for one channel, else
        ``(F1, F2, C, C)`` complex."""
        if self._P is None:
            Dh = self.Dhat.detach()
            if self.n_channels == 1:
                self._P = (Dh[:, 0].abs() ** 2).sum(0)
            else:
                self._P = torch.einsum("mchw,mdhw->hwcd", Dh, Dh.conj())
        return self._P

    def lipschitz(self):
        """Largest eigenvalue of ``normal`` (x 1.01).

        Circular: exactly ``max_f ||D(f)||_2^2`` from the per-frequency blocks
        (the eigenvalues of a circulant-block operator). Zero boundary: power
        iteration on ``normal`` (:func:`power_iteration`), capped by the circular
        operator's value on the map grid, an upper bound.
        """
        if self._lipschitz is None:
            if self.boundary == "circular":
                P = self.gram_hat()
                lam = P.max() if self.n_channels == 1 else torch.linalg.eigvalsh(P).max()
                self._lipschitz = 1.01 * float(lam) if float(lam) > 0 else 1.0
            else:  # bounded by the circular operator on the map grid (the crop is a contraction)
                pi = power_iteration(lambda v: self.normal(v[None])[0], size=self.n_atoms,
                                     dtype=self.dtype, device=self.device, n_iter=300, tol=1e-8)
                circ = ConvOperator(self.filters.detach(), (self.n_channels, *self.map_shape))
                self._lipschitz = min(pi, circ.lipschitz())
        return self._lipschitz

    def solve_normal(self, B, rho, x0=None):
        """``(normal + rho I)^{-1} B`` per row (``rho``: a float or one per row).

        Circular: exact, per frequency (Sherman-Morrison / Woodbury). Zero
        boundary: conjugate gradients preconditioned by the circular solve on
        the map grid (warm-started at ``x0``).
        """
        if self.boundary == "zero":
            if self._circ is None:  # the circular operator on the map grid
                self._circ = ConvOperator(self.filters.detach(),
                                          (self.n_channels, *self.map_shape), "circular")
            return conjugate_gradient(
                lambda v, r: self.normal(v) + r * v, B, rho, x0=x0,
                precondition=lambda v, r: self._circ.solve_normal(v, r),
            )
        n = B.shape[0]
        rho = torch.as_tensor(rho, dtype=self.dtype, device=self.device)
        rho = rho.reshape(-1, 1, 1, 1) if rho.ndim else rho
        bh = self._rfft(self.maps(B))
        Dh = self.Dhat.detach()
        P = self.gram_hat()
        if self.n_channels == 1:
            d = Dh[:, 0]
            c = (bh * d).sum(1, keepdim=True).div_(rho + P)
            xh = bh.addcmul_(d.conj(), c, value=-1)  # in place: bh is ours
            return self._irfft(xh).reshape(n, -1).div_(rho.reshape(-1, 1) if rho.ndim else rho)
        else:
            Db = torch.einsum("nmhw,mchw->nhwc", bh, Dh)
            eye = torch.eye(self.n_channels, dtype=P.dtype, device=P.device)
            r = rho.reshape(-1, 1, 1, 1, 1) if rho.ndim else rho
            c = torch.linalg.solve(P + r * eye, Db.unsqueeze(-1)).squeeze(-1)
            xh = (bh - torch.einsum("nhwc,mchw->nmhw", c, Dh.conj())) / rho
        return self._irfft(xh).reshape(n, -1)


def conv_operator(filters, image_shape, boundary="circular", *, device=None, dtype=None):
    """A :class:`ConvOperator` from filters in any of the accepted shapes
    (numpy or torch; see :func:`as_conv_filters`), on ``device`` in ``dtype``."""
    if isinstance(filters, torch.Tensor):
        f = filters.detach()
    else:
        f = torch.as_tensor(np.asarray(filters, dtype=np.float64))
    f4, img = as_conv_filters(f, image_shape)
    f4 = f4.to(device=device if device is not None else f4.device,
               dtype=torch_dtype(dtype) if dtype is not None else f4.dtype).contiguous()
    return ConvOperator(f4, img, boundary)
