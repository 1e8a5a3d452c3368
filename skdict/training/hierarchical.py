"""Training step of :class:`~skdict.HierarchicalSparseCoder`: inference of the codes
of every level (:mod:`skdict.solvers.hierarchical`), then, level by level, the
online block-coordinate (or Hebbian) update of ``D_l`` on its prediction target
``a_{l-1}``, dead-atom resampling (:mod:`skdict.updates`) and, optionally, the
precisions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._backend import torch_dtype
from ..solvers.hierarchical import (
    bottom_up_inference,
    free_energy_terms,
    hierarchical_lipschitz,
    joint_inference,
    prediction_errors,
)
from ..updates import (
    OnlineStats,
    bcd_update,
    dead_atoms,
    forgetting_factor,
    hebbian_update,
    init_atoms,
    resample_dead_atoms,
    statistics_update,
    update_since_used,
)
from .state import TrainState, _floats

__all__ = ["HierarchicalLearner", "HierarchicalState", "level_key"]

SIGMA_FLOOR = 1e-2


def level_key(level):
    """History key of the free energy term of ``level`` (counted from 1)."""
    return f"free_energy_{level}"


@dataclass
class HierarchicalState(TrainState):
    """What :class:`HierarchicalSparseCoder` trains, one entry per level: the
    dictionaries ``D``, online statistics ``A`` / ``B`` (codes of the level
    against its target, the level below), the rows since each atom was last
    used, the atoms resampled; the mean squared prediction error per unit of
    each level (``mse``, whose inverse is the learned precision), the mean free
    energy term of each level per epoch (``level_curve``) and the generator."""

    D: list = None
    A: list = None
    B: list = None
    since_used: list = None
    n_resampled: list = None
    mse: list = None
    epoch_start: int = 0
    level_curve: list = field(default_factory=list)
    generator: torch.Generator = None


class HierarchicalLearner:
    """One minibatch of :class:`HierarchicalSparseCoder`."""

    def __init__(self, est, sizes, alpha, sigma, device, dtype):
        self.est = est
        self.sizes = tuple(sizes)
        self.alpha = list(alpha)
        self.sigma = list(sigma)
        self.device = device
        self.dtype = dtype

    def precisions(self, state):
        if self.est.learn_sigma:
            return [1.0 / v for v in state.mse]
        return [1.0 / s**2 for s in self.sigma]

    def init_state(self, source, generator):
        """``D_1`` from data rows; each higher ``D_l`` from the bottom-up codes, at
        level ``l - 1``, of other data rows (Gaussian atoms where they are zero)."""
        tdtype = torch_dtype(self.dtype)
        K = self.sizes
        n_first = K[0]
        rows = source.sample(n_first + max(K[1:], default=0), generator=generator,
                             device=self.device, dtype=tdtype)
        dims = (source.n_features, *K)
        D = [init_atoms(K[0], dims[0], rows=rows[:n_first], generator=generator,
                        device=self.device, dtype=tdtype)]
        extra, p = rows[n_first:], self.precisions_init()
        for i in range(1, len(K)):
            top = bottom_up_inference(extra, D, self.alpha[:i], p[:i],
                                      positive=self.est.positive_code).codes[-1]
            D.append(init_atoms(K[i], dims[i], rows=top, generator=generator,
                                device=self.device, dtype=tdtype))
        return HierarchicalState(
            D=D,
            A=[torch.zeros(k, k, dtype=tdtype, device=self.device) for k in K],
            # dims = (n_features, K_1, ..., K_L): level l's statistics are K_l x dims[l]
            B=[torch.zeros(k, d, dtype=tdtype, device=self.device)
               for k, d in zip(K, dims[:len(K)], strict=True)],
            since_used=[torch.zeros(k, dtype=torch.long, device=self.device) for k in K],
            n_resampled=[0] * len(K),
            mse=[float(s**2) for s in self.sigma],
            generator=generator,
        )

    def precisions_init(self):
        return [1.0 / s**2 for s in self.sigma]

    def infer(self, Xb, D, precisions, *, max_iter, ops=None, lipschitz=None):
        """Codes of every level by the estimator's inference rule."""
        est = self.est
        if est.inference == "bottom_up":
            return bottom_up_inference(Xb, D, self.alpha, precisions,
                                       positive=est.positive_code, ops=ops)
        if lipschitz is None:
            lipschitz = hierarchical_lipschitz(D, precisions)
        return joint_inference(Xb, D, self.alpha, precisions, positive=est.positive_code,
                               max_iter=max_iter, tol=est.inference_tol, lipschitz=lipschitz,
                               ops=ops)

    def step(self, state, Xb):
        est = self.est
        p = self.precisions(state)
        res = self.infer(Xb, state.D, p, max_iter=est.fit_max_iter)
        codes = res.codes
        errors = prediction_errors(Xb, codes, state.D)
        terms = free_energy_terms(Xb, codes, state.D, self.alpha, p, errors=errors).mean(0)
        b = Xb.shape[0]
        beta = forgetting_factor(state.n_steps, b, est.forget_window)
        targets = [Xb, *codes[:-1]]
        for i, (a, target) in enumerate(zip(codes, targets, strict=True)):
            D = state.D[i]
            if est.dict_update == "online":
                statistics_update(state.A[i], state.B[i], a, target, beta)
                bcd_update(D, state.A[i], state.B[i])
            else:
                D = state.D[i] = hebbian_update(D, target, a, est.learning_rate)
            update_since_used(state.since_used[i], (a != 0).any(0), b)
            if est.dead_window:
                dead = dead_atoms(state.since_used[i], est.dead_window)
                if bool(dead.any()):
                    idx = resample_dead_atoms(D, dead, target - a @ D,
                                              generator=state.generator,
                                              stats=OnlineStats(state.A[i], state.B[i]),
                                              since_used=state.since_used[i])
                    state.n_resampled[i] += int(idx.numel())
        if est.learn_sigma:
            # maximum likelihood of the Gaussian prediction errors, with the
            # forgetting of the online statistics. With learned variances the
            # joint MAP is degenerate (p_l -> inf as a level is predicted
            # exactly, collapsing it onto its prediction), so each variance is
            # floored at SIGMA_FLOOR times the mean square of the level's target.
            for i, (e, target) in enumerate(zip(errors, targets, strict=True)):
                mse = float((e.double() ** 2).mean())
                floor = SIGMA_FLOOR * float((target.double() ** 2).mean()) + 1e-12
                state.mse[i] = beta * state.mse[i] + (1 - beta) * max(mse, floor)
        metrics = {"loss": terms.sum(), "n_iter": float(res.n_iter)}
        for i in range(len(codes)):
            metrics[level_key(i + 1)] = terms[i]
        return metrics

    def end_epoch(self, state):
        """Mean free energy term of each level over the epoch just finished."""
        steps = len(state.history["loss"])
        row = []
        for i in range(len(self.sizes)):
            vals = _floats(state.history[level_key(i + 1)][state.epoch_start:steps])
            row.append(sum(vals) / max(len(vals), 1))
        state.level_curve.append(row)
        state.epoch_start = steps
