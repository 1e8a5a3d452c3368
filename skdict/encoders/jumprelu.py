"""JumpReLU (Rajamanoharan et al. 2024): ``z_j = pre_j * H(pre_j - theta_j)`` with
one learned threshold ``theta_j = exp(log_threshold_j)`` per latent and an L0
penalty ``alpha * mean_rows(sum_j H(pre_j - theta_j))``.

The step function ``H`` has no useful derivative; the thresholds learn through
the paper's straight-through estimator with the rectangle kernel
``rect(u) = 1{|u| < 1/2}`` and a ``bandwidth`` ``eps``. With ``g`` the gradient
reaching the codes::

    d z_j / d pre_j     = H(pre_j - theta_j)                       (exact a.e.)
    d z_j / d theta_j   ~ -(theta_j / eps) rect((pre_j - theta_j) / eps)
    d H_j / d theta_j   ~ -(1 / eps)       rect((pre_j - theta_j) / eps)
    d H_j / d pre_j     = 0

:func:`jumprelu` and :func:`step` are these as dense autograd functions (the
reference). Training uses the sparse equivalent: the active pairs
(``pre > theta``) go through the sparse kernels and the threshold gradient is
one dot product per pair inside the kernel window (``|pre - theta| < eps / 2``),
so no dense ``(B, n_components)`` code matrix is formed.

Thresholds start at the BatchTopK threshold of ``k`` on the initialisation rows
(initial L0 about ``k``). SAELens architecture ``"jumprelu"`` (tensor
``threshold``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..solvers.topk import SparsePairs, select_threshold, sparse_decode_pairs, sparse_encode
from .base import Encoder, preactivations, register, selected_output

__all__ = ["JumpReLU", "jumprelu", "step"]


def _rect(u):
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = g * (pre > theta)
        g_theta = -((theta / eps) * _rect((pre - theta) / eps) * g).sum(0)
        return g_pre, g_theta, None


class _StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_theta = -((1.0 / eps) * _rect((pre - theta) / eps) * g).sum(0)
        return torch.zeros_like(pre), g_theta, None


def jumprelu(pre, theta, bandwidth):
    """Dense JumpReLU ``pre * H(pre - theta)`` with the straight-through threshold
    gradient (reference of the training path)."""
    return _JumpReLUFn.apply(pre, theta, float(bandwidth))


def step(pre, theta, bandwidth):
    """Dense Heaviside ``H(pre - theta)`` with the straight-through threshold
    gradient (the L0 penalty's pseudo-gradient)."""
    return _StepFn.apply(pre, theta, float(bandwidth))


class _ThresholdJump(torch.autograd.Function):
    """Identity on ``x_hat``; backward adds the threshold's straight-through
    gradient from the reconstruction: for every window pair ``(i, j)``,
    ``-(theta_j / eps) * <g_i, W_dec_j>``."""

    @staticmethod
    def forward(ctx, x_hat, theta, W_dec, window, bandwidth):
        ctx.save_for_backward(theta, W_dec)
        ctx.window = window
        ctx.bandwidth = bandwidth
        return x_hat.view_as(x_hat)

    @staticmethod
    def backward(ctx, g):
        theta, W_dec = ctx.saved_tensors
        win = ctx.window
        g_theta = None
        if ctx.needs_input_grad[1]:
            d = win.pair_dot(g.contiguous(), W_dec)
            g_theta = torch.zeros_like(theta).index_add_(0, win.col, d)
            g_theta.mul_(-theta / ctx.bandwidth)
        return g, g_theta, None, None, None


class _L0(torch.autograd.Function):
    """Mean L0 of the batch (value given); backward: the rectangle-kernel
    pseudo-gradient ``-(1 / eps) * count_j / B`` for each threshold, where
    ``count_j`` is the number of window pairs of latent ``j``."""

    @staticmethod
    def forward(ctx, theta, value, window_col, n_rows, bandwidth):
        ctx.save_for_backward(window_col)
        ctx.shape = (theta.shape[0], n_rows, bandwidth)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, g):
        (col,) = ctx.saved_tensors
        K, B, eps = ctx.shape
        counts = torch.bincount(col, minlength=K).to(g.dtype)
        return -g * counts / (eps * B), None, None, None, None


def _window(pre, theta, eps):
    """Pairs inside the kernel window ``|pre - theta| < eps / 2`` (row-major)."""
    row, col = torch.nonzero((pre - theta).abs() < 0.5 * eps, as_tuple=True)
    return SparsePairs(row, col, pre.shape[0], pre.shape[1])


@register
class JumpReLU(Encoder):
    """Per-latent learned thresholds, straight-through rectangle-kernel
    gradient of width ``bandwidth``, L0 penalty weighted by ``alpha``."""

    name = "jumprelu"
    params = ("k", "alpha", "bandwidth")
    sparse = True
    inference = "threshold"
    auxk = False
    saelens_architecture = "jumprelu"
    saelens_imports = ("jumprelu",)
    # bandwidth and thresholds are in units of unit-row pre-activations
    encoder_init_norm = 1.0

    def init_parameters(self, P, x0):
        with torch.no_grad():
            rows = x0[: min(x0.shape[0], 4096)]
            pre = preactivations(rows, P)
            m = min(int(self.k) * pre.shape[0], pre.numel())
            t0 = torch.topk(pre.reshape(-1), m, sorted=False).values.min()
            t0 = torch.clamp(t0, min=1e-3 * float(pre.abs().mean()) + 1e-12)
            log_t = torch.log(t0).expand(self.n_components).clone()
        return {"log_threshold": log_t}

    def from_threshold(self, P, threshold):
        floor = torch.finfo(threshold.dtype).tiny
        return {"log_threshold": torch.log(threshold.clamp_min(floor))}, {}

    def forward(self, x, P, k, buffers, pre=None):
        theta = torch.exp(P["log_threshold"])
        eps = float(self.bandwidth)
        with torch.no_grad():
            t = theta.detach()
            pairs = select_threshold(pre, t)
            window = _window(pre, t, eps)
        vals = sparse_encode(x, P["W_enc"], P["b_enc"], pairs, pre, b_dec=P["b_dec"])
        x_hat = sparse_decode_pairs(vals, P["W_dec"], pairs) + P["b_dec"]
        x_hat = _ThresholdJump.apply(x_hat, theta, P["W_dec"].detach(), window, eps)
        out = selected_output(x, [x_hat], pairs, vals)
        l0 = _L0.apply(theta, out.l0, window.col, x.shape[0], eps)
        out.penalty = self.alpha * l0
        out.metrics["threshold"] = theta.detach().mean()
        return out

    def inference_threshold(self, P, buffers):
        return torch.exp(P["log_threshold"]).detach()

    def saelens_tensors(self, threshold):
        return {"threshold": np.ascontiguousarray(threshold)}

    @classmethod
    def from_saelens(cls, cfg, tensors, d_sae):
        thr = tensors.get("threshold")
        if thr is None and "log_threshold" in tensors:
            thr = np.exp(np.asarray(tensors["log_threshold"]))
        if thr is None:
            raise ValueError("a jumprelu SAE needs a 'threshold' tensor.")
        thr = np.broadcast_to(np.asarray(thr).reshape(-1), (d_sae,))
        return {}, np.array(thr)


def reference_loss(x, P, theta, alpha, bandwidth):
    """Dense JumpReLU training loss (FVU + ``alpha`` * L0) with the paper's
    straight-through gradients (for tests of the sparse path)."""
    pre = preactivations(x, P)
    z = jumprelu(pre, theta, bandwidth)
    x_hat = z @ P["W_dec"] + P["b_dec"]
    denom = ((x - x.mean(0)) ** 2).sum()
    l0 = step(pre, theta, bandwidth).sum(1).mean()
    return ((x - x_hat) ** 2).sum() / denom + alpha * l0

