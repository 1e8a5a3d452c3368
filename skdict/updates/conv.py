"""Online convolutional dictionary learning in the DFT domain (Liu, Garcia-Cardona,
Wohlberg & Yin 2018, "First- and second-order methods for online convolutional
dictionary learning", the frequency-domain surrogate), pure torch.

For codes ``z`` (maps on the grid of ``F`` frequencies) and images ``x``, the
surrogate of the past minibatches is the quadratic in the filters' DFTs
``d(f)`` (``M x C`` per frequency)::

    sum_f  0.5 d(f)^H A(f) d(f) - Re tr(B(f)^H d(f))

with the statistics ``A(f) = sum z(f)^* z(f)^T / b`` (``M x M``) and
``B(f) = sum z(f)^* x(f)^T / b`` (``M x C``), decayed by
:func:`skdict.updates.atoms.forgetting_factor`. Its gradient with respect to the
spatial filters is ``irfft2(A d - B)`` on the map grid, so projected gradient
(FISTA) on the filters - the support of ``kh x kw`` taps and the unit ball,
the convex hull of the unit-norm constraint - takes a few batched ``M x M``
products per frequency and small FFTs: no pass over the images.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ConvStats", "conv_statistics_update", "conv_filter_update"]


class ConvStats:
    """The frequency-domain statistics ``A`` ``(F1, F2, M, M)`` and ``B``
    ``(F1, F2, M, C)`` (complex); ``reset_atoms`` forgets resampled filters."""

    def __init__(self, A, B):
        self.A, self.B = A, B

    def reset_atoms(self, atoms):
        self.A[..., atoms, :] = 0
        self.A[..., :, atoms] = 0
        self.B[..., atoms, :] = 0


def conv_statistics_update(A, B, zh, xh, beta):
    """In place: ``A <- beta A + sum z^* z^T / n``, ``B <- beta B + sum z^* x^T / n``.

    ``zh``: code DFTs ``(n, M, F1, F2)``; ``xh``: image DFTs ``(n, C, F1, F2)``.
    """
    n = zh.shape[0]
    zf = zh.permute(2, 3, 0, 1)  # (F1, F2, n, M)
    xf = xh.permute(2, 3, 0, 1)
    A.mul_(beta).add_(zf.conj().transpose(-1, -2) @ zf, alpha=1.0 / n)
    B.mul_(beta).add_(zf.conj().transpose(-1, -2) @ xf, alpha=1.0 / n)
    return A, B


def _project(D):
    """Onto ``||d_m|| <= 1`` per filter (the support is kept by construction)."""
    nrm = D.flatten(1).norm(dim=1).clamp_min(1.0)
    return D / nrm.reshape(-1, *([1] * (D.ndim - 1)))


def _support_dfts(map_shape, kernel_shape, dtype, device):
    """``rfft2(d, s=map_shape)`` of ``(..., kh, kw)`` filters and the ``kh x kw``
    corner of ``irfft2(g, s=map_shape)``, as small matrix products: the filters
    have ``kh * kw`` taps and the projection keeps as many, so the full
    transforms (the inverse especially: torch's CPU c2r) would compute
    ``H * W`` values to use ``kh * kw`` of them."""
    H, W = map_shape
    kh, kw = kernel_shape
    Wf = W // 2 + 1
    ctype = torch.complex64 if dtype == torch.float32 else torch.complex128
    u = torch.arange(H, dtype=torch.float64, device=device)
    v = torch.arange(Wf, dtype=torch.float64, device=device)
    p = torch.arange(kh, dtype=torch.float64, device=device)
    q = torch.arange(kw, dtype=torch.float64, device=device)
    Eh = torch.polar(torch.ones(H, kh, dtype=torch.float64, device=device),
                     -2 * math.pi * torch.outer(u, p) / H).to(ctype)  # (H, kh)
    Ew = torch.polar(torch.ones(kw, Wf, dtype=torch.float64, device=device),
                     -2 * math.pi * torch.outer(q, v) / W).to(ctype)  # (kw, Wf)
    # inverse along H (complex), then the real inverse along W: the columns
    # 1 .. ceil(W / 2) - 1 stand for their conjugate twins too
    w = torch.full((Wf,), 2.0, dtype=torch.float64, device=device)
    w[0] = 1.0
    if W % 2 == 0:
        w[-1] = 1.0
    Fh = Eh.conj().T.contiguous() / H  # (kh, H)
    Fw = (Ew.conj().T * (w / W).to(ctype)[:, None]).contiguous()  # (Wf, kw)

    def fwd(d):
        return Eh @ (d.to(ctype) @ Ew)

    def inv(g):
        return ((Fh @ g) @ Fw).real

    return fwd, inv


def conv_filter_update(D, A, B, map_shape, *, n_iter=10, L=None):
    """Filters ``D`` ``(M, C, kh, kw)`` minimising the surrogate by ``n_iter``
    FISTA steps from ``D``, then scaled to unit norm; returns the new filters.

    ``L``: a bound on the largest eigenvalue of every ``A(f)`` (computed when
    None). Filters whose statistics vanish (never used) are left unchanged.
    """
    M, C, kh, kw = D.shape
    if L is None:
        L = float(torch.linalg.eigvalsh(A).max()) if A.numel() else 0.0
    if L <= 0:
        return D
    step = 1.0 / (1.01 * L)

    fwd, inv = _support_dfts(map_shape, (kh, kw), D.dtype, D.device)

    def grad(Dk):
        dh = fwd(Dk).permute(2, 3, 0, 1)  # (F1, F2, M, C)
        return inv((A @ dh - B).permute(2, 3, 0, 1))

    x, y, t = D, D, 1.0
    for _ in range(int(n_iter)):
        x_new = _project(y - step * grad(y))
        t_new = 0.5 * (1 + (1 + 4 * t * t) ** 0.5)
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    nrm = x.flatten(1).norm(dim=1)
    used = A.diagonal(dim1=-2, dim2=-1).real.sum((0, 1)) > 0
    ok = used & (nrm > 1e-10)
    out = torch.where(ok.reshape(-1, 1, 1, 1), x / nrm.clamp_min(1e-30).reshape(-1, 1, 1, 1), D)
    return out
