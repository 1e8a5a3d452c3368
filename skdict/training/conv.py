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
from ..solvers.cbpdn import cbpdn, default_rho
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

# memory for the ADMM warm starts (codes and dual of every training image); past
# it, new images start cold
_WARM_BYTES = 256 * 2**20
_N_PROBES = 15


def _fingerprint(Xb):
    """Each image's values at ``_N_PROBES`` fixed positions and its sum: a key
    that tells the training images apart (a collision only costs a worse warm
    start, never a wrong solution)."""
    n, p = Xb.shape
    idx = torch.linspace(0, p - 1, min(p, _N_PROBES), device=Xb.device).long()
    return torch.cat([Xb[:, idx], Xb.sum(1, keepdim=True)], 1)


def _match(keys, probe):
    """For each row of ``probe``, the index of an equal row of ``keys`` or -1."""
    out = torch.full((probe.shape[0],), -1, dtype=torch.long, device=probe.device)
    if keys is None or keys.shape[0] == 0:
        return out
    eq = (probe[:, None, :] == keys[None, :, :]).all(2)  # (b, n_keys)
    hit = eq.any(1)
    out[hit] = eq[hit].float().argmax(1)
    return out


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
    # warm starts of the CBPDN ADMM, one row per training image seen (while
    # they fit in _WARM_BYTES): a fingerprint of the image, its codes, scaled
    # dual and penalty
    warm_keys: torch.Tensor = None
    warm_Y: torch.Tensor = None
    warm_U: torch.Tensor = None
    warm_rho: torch.Tensor = None


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

    def _code(self, state, Xb, op):
        """Codes of the minibatch: CBPDN warm-started from each image's last
        codes and dual when the fit algorithm is ADMM on the circular
        boundary, else the registered solver."""
        est = self.est
        if est.fit_algorithm != "admm" or op.boundary != "circular":
            return encode_block(Xb, op, algorithm=est.fit_algorithm, alpha=est.alpha,
                                positive=est.positive_code, max_iter=est.fit_max_iter,
                                tol=est._fit_tol())
        b, K = Xb.shape[0], op.n_atoms
        keys = _fingerprint(Xb)
        slot = _match(state.warm_keys, keys)
        hit = slot >= 0
        Y0 = U0 = None
        rho = torch.full((b,), default_rho(est.alpha), dtype=torch.float64, device=Xb.device)
        if bool(hit.any()):
            Y0 = torch.zeros((b, K), dtype=Xb.dtype, device=Xb.device)
            U0 = torch.zeros_like(Y0)
            Y0[hit] = state.warm_Y[slot[hit]]
            U0[hit] = state.warm_U[slot[hit]]
            rho[hit] = state.warm_rho[slot[hit]].double()
        res = cbpdn(op, Xb, est.alpha, rho=rho, Y0=Y0, U0=U0, positive=est.positive_code,
                    max_iter=est.fit_max_iter, tol=est._fit_tol(), return_dual=True)
        if bool(hit.any()):
            state.warm_Y[slot[hit]] = res.codes[hit]
            state.warm_U[slot[hit]] = res.dual[hit]
            state.warm_rho[slot[hit]] = res.rho[hit]
        new = ~hit
        n_have = 0 if state.warm_keys is None else state.warm_keys.shape[0]
        room = _WARM_BYTES // (2 * K * Xb.element_size()) - n_have
        if bool(new.any()) and room > 0:
            take = torch.nonzero(new).flatten()[:room]
            parts = [(state.warm_keys, keys[take]), (state.warm_Y, res.codes[take]),
                     (state.warm_U, res.dual[take]), (state.warm_rho, res.rho[take])]
            state.warm_keys, state.warm_Y, state.warm_U, state.warm_rho = (
                new_ if old is None else torch.cat([old, new_]) for old, new_ in parts)
        return res

    def step(self, state, Xb):
        est = self.est
        op = self._op(state.D)
        res = self._code(state, Xb, op)
        codes = res.codes
        b = Xb.shape[0]
        zh = torch.fft.rfft2(op.maps(codes))
        xh = torch.fft.rfft2(op._embed(op.images(Xb)), s=op.map_shape)
        # the residual from the code DFTs the statistics need anyway
        R = Xb - op._crop(torch.fft.irfft2(op._synth_hat(zh), s=op.map_shape)).reshape(b, -1)
        loss = (0.5 * (R * R).sum(1) + est.alpha * codes.abs().sum(1)).mean()
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
