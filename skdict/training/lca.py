"""Training step of :class:`~skdict.LCASparseCoder`: codes by the fit algorithm
(:func:`skdict.functional.encode_block`), the online block-coordinate (or Hebbian)
dictionary update and dead-atom resampling (:mod:`skdict.updates`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .._backend import torch_dtype
from .._validation import check_dictionary
from ..functional import encode_block
from ..operators import DenseOperator
from ..updates import (
    OnlineStats,
    bcd_update,
    dead_atoms,
    forgetting_factor,
    hebbian_update,
    init_atoms,
    project_unit_norm,
    resample_dead_atoms,
    statistics_update,
    update_since_used,
)
from .state import TrainState

__all__ = ["LCALearner", "LCAState", "lca_block_statistics"]


@dataclass
class LCAState(TrainState):
    """What :class:`LCASparseCoder` trains: the dictionary ``D`` (K x P), the
    online statistics ``A`` (K x K) and ``B`` (K x P), the rows since each atom
    was last used, the atoms resampled so far and the generator of the batch
    order and of resampling."""

    D: torch.Tensor = None
    A: torch.Tensor = None
    B: torch.Tensor = None
    since_used: torch.Tensor = None
    n_resampled: int = 0
    generator: torch.Generator = None


def _batch_objective(X, codes, D, alpha, threshold):
    R = X - codes @ D
    rss = 0.5 * (R * R).sum(1)
    if threshold == "hard":
        return rss + 0.5 * alpha**2 * (codes != 0).sum(1).to(X.dtype)
    return rss + alpha * codes.abs().sum(1)


def lca_block_statistics(payload, Xb, *, coding, threshold, n_worst):
    """Sufficient statistics of one block of rows under the broadcast dictionary:
    ``A = sum a^T a``, ``B = sum a^T x``, the summed objective, the rows, the
    rows using each atom, the inference iterations and (for dead-atom
    resampling) the ``n_worst`` worst-reconstructed residual rows."""
    from ..distributed.stats import TopRows

    D = torch.as_tensor(payload["D"]).to(device=Xb.device, dtype=Xb.dtype)
    res = encode_block(Xb, DenseOperator(D), **coding)
    codes = res.codes
    R = Xb - codes @ D
    obj = (res.objective.sum() if res.objective is not None
           else _batch_objective(Xb, codes, D, coding["alpha"], threshold).sum())
    out = {"A": codes.T @ codes, "B": codes.T @ Xb, "loss": obj.double(),
           "n": Xb.shape[0], "used": (codes != 0).sum(0), "n_iter": float(res.n_iter),
           "n_blocks": 1}
    if n_worst:
        out["worst"] = TopRows.of_residuals(R, n_worst)
    return out


class LCALearner:
    """One minibatch of :class:`LCASparseCoder`: codes by ``fit_algorithm``, then
    the online (or Hebbian) dictionary update and dead-atom resampling."""

    def __init__(self, est, n_components, device, dtype):
        self.est = est
        self.n_components = n_components
        self.device = device
        self.dtype = dtype

    def init_state(self, source, generator):
        est, K, P = self.est, self.n_components, source.n_features
        tdtype = torch_dtype(self.dtype)
        if est.dict_init is not None:
            D = init_atoms(K, P, init=torch.as_tensor(check_dictionary(est.dict_init, "dict_init")),
                           generator=generator, device=self.device, dtype=tdtype,
                           name="dict_init")
        else:
            rows = source.sample(K, generator=generator, device=self.device, dtype=tdtype)
            D = init_atoms(K, P, rows=rows, generator=generator, device=self.device,
                           dtype=tdtype)
        return LCAState(
            D=D,
            A=torch.zeros(K, K, dtype=tdtype, device=self.device),
            B=torch.zeros(K, P, dtype=tdtype, device=self.device),
            since_used=torch.zeros(K, dtype=torch.long, device=self.device),
            generator=generator,
        )

    def step(self, state, Xb):
        est, D = self.est, state.D
        res = encode_block(
            Xb, DenseOperator(D), algorithm=est._fit_algorithm, alpha=est.alpha,
            positive=est.positive_code, max_iter=est.fit_max_iter, tol=est.inference_tol,
            tau=est.tau, threshold=est.threshold, objective=est.threshold == "soft",
        )
        codes = res.codes
        if res.objective is not None:  # the exact solver's by-product
            loss = res.objective.mean()
        else:
            loss = _batch_objective(Xb, codes, D, est.alpha, est.threshold).mean()
        b = Xb.shape[0]
        if est.dict_update == "online":
            beta = forgetting_factor(state.n_steps, b, est.forget_window)
            statistics_update(state.A, state.B, codes, Xb, beta)
            bcd_update(D, state.A, state.B)
        else:
            D = state.D = hebbian_update(D, Xb, codes, est.learning_rate)
        update_since_used(state.since_used, (codes != 0).any(0), b)
        if est.dead_window:
            dead = dead_atoms(state.since_used, est.dead_window)
            if bool(dead.any()):
                idx = resample_dead_atoms(D, dead, Xb - codes @ D, generator=state.generator,
                                          stats=OnlineStats(state.A, state.B),
                                          since_used=state.since_used)
                state.n_resampled += int(idx.numel())
        # fit_max_iter caps inference by design (inexact codes still improve the
        # dictionary); whether each minibatch's inference met inference_tol is recorded
        return {"loss": loss, "n_iter": float(res.n_iter), "converged": float(res.converged)}

    # ------------------------------------------------ distributed (statistics)
    def broadcast(self, state):
        return {"D": state.D.detach().cpu().numpy()}

    def statistics_fn(self):
        est = self.est
        coding = dict(algorithm=est._fit_algorithm, alpha=est.alpha, positive=est.positive_code,
                      max_iter=est.fit_max_iter, tol=est.inference_tol, tau=est.tau,
                      threshold=est.threshold, objective=est.threshold == "soft")
        return partial(lca_block_statistics, coding=coding, threshold=est.threshold,
                       n_worst=self.n_components if est.dead_window else 0)

    def apply_statistics(self, state, stats):
        """The step of :meth:`step` from the statistics of all its rows."""
        est, D = self.est, state.D
        b = int(stats["n"])
        A = stats["A"].to(D)
        B = stats["B"].to(D)
        if est.dict_update == "online":
            beta = forgetting_factor(state.n_steps, b, est.forget_window)
            state.A.mul_(beta).add_(A, alpha=1.0 / b)
            state.B.mul_(beta).add_(B, alpha=1.0 / b)
            bcd_update(D, state.A, state.B)
        else:  # the Hebbian step: D + lr (B - A D) / b
            D = state.D = project_unit_norm(D + (est.learning_rate / b) * (B - A @ D),
                                            inplace=True)
        update_since_used(state.since_used, stats["used"].to(D.device) > 0, b)
        if est.dead_window:
            dead = dead_atoms(state.since_used, est.dead_window)
            if bool(dead.any()):
                idx = resample_dead_atoms(D, dead, stats["worst"].rows.to(D),
                                          generator=state.generator,
                                          stats=OnlineStats(state.A, state.B),
                                          since_used=state.since_used)
                state.n_resampled += int(idx.numel())
        return {"loss": float(stats["loss"]) / b,
                "n_iter": float(stats["n_iter"]) / int(stats["n_blocks"])}
