"""Training step of :class:`~skdict.ConvDictionaryLearning`: codes of a minibatch
of images by the fit algorithm (:func:`skdict.functional.encode_block` on a
:class:`~skdict.operators.ConvOperator`), the frequency-domain online filter
update (:mod:`skdict.updates.conv`) and dead-filter resampling
(:mod:`skdict.updates.atoms`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._backend import torch_dtype
from ..functional import encode_block
from ..operators import ConvOperator
from ..updates import (
    dead_atoms,
    forgetting_factor,
    init_atoms,
    resample_dead_atoms,
    update_since_used,
)
from ..updates.conv import ConvStats, conv_filter_update, conv_statistics_update
from .state import TrainState

__all__ = ["ConvLearner", "ConvState", "random_patches"]


@dataclass
class ConvState(TrainState):
    """What :class:`ConvDictionaryLearning` trains: the filters ``D``
    ``(M, C, kh, kw)``, the frequency-domain statistics ``A`` / ``B``
    (:mod:`skdict.updates.conv`), the images since each filter was last used,
    the filters resampled so far and the generator."""

    D: torch.Tensor = None
    A: torch.Tensor = None
    B: torch.Tensor = None
    since_used: torch.Tensor = None
    n_resampled: int = 0
    generator: torch.Generator = None


def random_patches(images, n, kernel_shape, generator):
    """``n`` random ``(C, kh, kw)`` patches of ``images`` ``(b, C, H, W)``,
    flattened to ``(n, C * kh * kw)`` (positions drawn with ``generator``)."""
    b, C, H, W = images.shape
    kh, kw = kernel_shape
    dev = generator.device if generator is not None else torch.device("cpu")
    img = torch.randint(b, (n,), generator=generator, device=dev).tolist()
    top = torch.randint(H - kh + 1, (n,), generator=generator, device=dev).tolist()
    left = torch.randint(W - kw + 1, (n,), generator=generator, device=dev).tolist()
    return torch.stack([images[i, :, r:r + kh, c:c + kw].reshape(-1)
                        for i, r, c in zip(img, top, left, strict=True)])


class ConvLearner:
    """One minibatch of images: codes, statistics, filter update, resampling."""

    def __init__(self, est, n_filters, kernel_shape, image_shape, device, dtype):
        self.est = est
        self.n_filters = n_filters
        self.kernel_shape = kernel_shape  # (kh, kw)
        self.image_shape = image_shape  # (C, H, W)
        self.device = device
        self.dtype = dtype

    def _op(self, D):
        return ConvOperator(D, self.image_shape, self.est.boundary)

    def init_state(self, source, generator):
        est, M = self.est, self.n_filters
        C = self.image_shape[0]
        kh, kw = self.kernel_shape
        tdtype = torch_dtype(self.dtype)
        P = C * kh * kw
        if est.dict_init is not None:
            init = torch.as_tensor(est._filters_init()).reshape(M, P)
            D = init_atoms(M, P, init=init, generator=generator, device=self.device,
                           dtype=tdtype, name="dict_init")
        else:
            n_img = min(M, source.n_samples or M)
            imgs = source.sample(n_img, generator=generator, device=self.device, dtype=tdtype)
            imgs = imgs.reshape(-1, *self.image_shape)
            rows = random_patches(imgs, M, self.kernel_shape, generator)
            rows = rows - rows.mean(1, keepdim=True)  # filters start zero-mean
            D = init_atoms(M, P, rows=rows, generator=generator, device=self.device,
                           dtype=tdtype)
        D = D.reshape(M, C, kh, kw)
        op = self._op(D)
        F1, F2 = op.Dhat.shape[-2:]
        cdtype = op.Dhat.dtype
        return ConvState(
            D=D,
            A=torch.zeros(F1, F2, M, M, dtype=cdtype, device=self.device),
            B=torch.zeros(F1, F2, M, C, dtype=cdtype, device=self.device),
            since_used=torch.zeros(M, dtype=torch.long, device=self.device),
            generator=generator,
        )

    def step(self, state, Xb):
        est = self.est
        op = self._op(state.D)
        res = encode_block(Xb, op, algorithm=est.fit_algorithm, alpha=est.alpha,
                           positive=est.positive_code, max_iter=est.fit_max_iter,
                           tol=est.inference_tol)
        codes = res.codes
        R = Xb - op.forward(codes)
        loss = (0.5 * (R * R).sum(1) + est.alpha * codes.abs().sum(1)).mean()
        b = Xb.shape[0]
        zh = torch.fft.rfft2(op.maps(codes))
        xh = torch.fft.rfft2(op._embed(op.images(Xb)), s=op.map_shape)
        beta = forgetting_factor(state.n_steps, b, est.forget_window)
        conv_statistics_update(state.A, state.B, zh, xh, beta)
        state.D = conv_filter_update(state.D, state.A, state.B, op.map_shape,
                                     n_iter=est.dict_update_iter)
        used = (op.maps(codes) != 0).flatten(2).any(2).any(0)
        update_since_used(state.since_used, used, b)
        if est.dead_window:
            dead = dead_atoms(state.since_used, est.dead_window)
            if bool(dead.any()):
                M = self.n_filters
                flat = state.D.reshape(M, -1).clone()
                patches = random_patches(op.images(R), 4 * M, self.kernel_shape,
                                         state.generator)
                idx = resample_dead_atoms(flat, dead, patches, generator=state.generator,
                                          stats=ConvStats(state.A, state.B),
                                          since_used=state.since_used)
                state.D = flat.reshape(state.D.shape)
                state.n_resampled += int(idx.numel())
        return {"loss": loss, "n_iter": float(res.n_iter)}
