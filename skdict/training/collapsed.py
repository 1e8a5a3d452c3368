"""Training step of :class:`~skdict.CollapsedDictionaryLearner`: route and code
each row, add the sparse statistics, refresh the touched atoms, resample the dead
ones (:mod:`skdict.updates`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from .._validation import check_dictionary
from ..solvers.decode import topk_decode
from ..solvers.routing import ClusterIndex
from ..updates import (
    SparseStats,
    dead_atoms,
    forgetting_factor,
    init_atoms,
    refresh_atoms,
    resample_dead_atoms,
    update_since_used,
)
from .state import TrainState

__all__ = ["CollapsedLearner", "CollapsedState", "Routing", "collapsed_block_statistics"]


@dataclass
class CollapsedState(TrainState):
    """What :class:`CollapsedDictionaryLearner` trains: the float32 dictionary
    ``D`` (K x P), its sparse statistics, the rows since each atom was last used,
    the atoms resampled so far and the generator of the batch order, the index
    and resampling."""

    D: torch.Tensor = None
    stats: SparseStats = None
    since_used: torch.Tensor = None
    n_resampled: int = 0
    generator: torch.Generator = None

    def state_dict(self):
        out = TrainState.state_dict(dataclasses.replace(self, stats=None))
        out["stats"] = self.stats.state_dict()
        return out

    @classmethod
    def from_state_dict(cls, d, *, device=None, dtype=None):
        d = dict(d)
        stats = d.pop("stats")
        state = super().from_state_dict(d, device=device, dtype=dtype)
        state.stats = SparseStats.from_state_dict(stats, device=device or "cpu",
                                                  dtype=dtype or torch.float32)
        return state


class Routing(NamedTuple):
    """What ``_encode`` routes with: the dictionary and, for approximate routing,
    its cluster index and the atoms sorted by cluster."""

    D: torch.Tensor
    index: ClusterIndex | None
    Dsorted: torch.Tensor | None


def collapsed_block_statistics(payload, Xb, *, est, max_nnz, n_worst):
    """Sparse statistics of one block of rows routed and coded with the broadcast
    dictionary (and index), its residual sum of squares, its row count and its
    ``n_worst`` worst-reconstructed residual rows."""
    from ..distributed.stats import TopRows

    dev = Xb.device
    D = payload.D.to(dev)
    routing = Routing(D, payload.index, None if payload.Dsorted is None
                      else payload.Dsorted.to(dev))
    idx, vals = est._code(Xb, routing)
    R = Xb - topk_decode(idx, vals, D)
    stats = SparseStats(D.shape[0], D.shape[1], max_nnz=max_nnz, device=dev)
    stats.update(Xb, idx, vals, 1.0)
    out = {"stats": stats, "rss": (R.double() ** 2).sum(), "n": Xb.shape[0]}
    if n_worst:
        out["worst"] = TopRows.of_residuals(R, n_worst)
    return out


class CollapsedLearner:
    """One minibatch of :class:`CollapsedDictionaryLearner`: route and code, add the
    sparse statistics, refresh the touched atoms, resample the dead ones."""

    dtype = np.float32

    def __init__(self, est, device):
        self.est = est
        self.device = device
        self.index = None  # approximate-routing index, rebuilt every index_refresh steps

    def init_state(self, source, generator):
        est, K, P = self.est, self.est.n_components, source.n_features
        if est.dict_init is not None:
            # a copy: dict_init may be read-only (a memory map), and is not ours to edit
            D0 = torch.tensor(check_dictionary(est.dict_init, "dict_init"))
            D = init_atoms(K, P, init=D0, generator=generator, device=self.device,
                           name="dict_init")
        else:
            rows = source.sample(K, generator=generator, device=self.device,
                                 dtype=torch.float32)
            D = init_atoms(K, P, rows=rows, generator=generator, device=self.device)
        return CollapsedState(
            D=D, stats=SparseStats(K, P, max_nnz=est._max_nnz(), device=self.device),
            since_used=torch.zeros(K, dtype=torch.long, device=self.device),
            generator=generator,
        )

    def step(self, state, Xb):
        est, D = self.est, state.D
        if est.routing == "approximate" and (
            self.index is None or state.n_steps % est.index_refresh == 0
        ):
            self.index = est._build_index(D, state.generator)
        Dsorted = D[self.index.order] if self.index is not None else None
        routing = Routing(D, self.index, Dsorted)
        idx, vals = est._code(Xb, routing)
        R = Xb - topk_decode(idx, vals, D)
        mse = float((R.double() ** 2).mean())
        if not math.isfinite(mse):
            raise ValueError(
                "The reconstruction error became non-finite; check the scale of X "
                "(values too large for float32?)."
            )
        state.stats.update(Xb, idx, vals, forgetting_factor(state.n_steps, Xb.shape[0]))
        used = torch.zeros(D.shape[0], dtype=torch.bool, device=D.device)
        used[idx[vals != 0]] = True
        touched = used.nonzero().squeeze(1)  # sorted, no sort of the n * s indices
        refresh_atoms(D, state.stats, touched,
                      preconditioner="gershgorin" if est.positive_code else "jacobi")
        update_since_used(state.since_used, used, Xb.shape[0])
        # only the refreshed atoms changed: one sum of them is non-finite iff one
        # of their entries is (unit-norm rows cannot overflow it), not a full pass
        if not math.isfinite(float(D.index_select(0, touched).sum())):
            raise ValueError(
                "The dictionary became non-finite: the statistics of X overflowed "
                f"float32 (the largest |X| of this batch is {float(Xb.abs().max()):.3g}); "
                "divide X by a constant (e.g. its largest absolute value) before fitting."
            )
        dead = dead_atoms(state.since_used, est._window())
        state.n_resampled += int(resample_dead_atoms(
            D, dead, R, generator=state.generator, stats=state.stats,
            since_used=state.since_used).numel())
        return {"loss": mse}

    # ------------------------------------------------ distributed (statistics)
    def broadcast(self, state):
        est, D = self.est, state.D
        if est.routing == "approximate" and (
            self.index is None or state.n_steps % est.index_refresh == 0
        ):
            self.index = est._build_index(D, state.generator)
        Dsorted = D[self.index.order] if self.index is not None else None
        return Routing(D.detach().cpu(), self.index,
                       None if Dsorted is None else Dsorted.detach().cpu())

    def statistics_fn(self):
        from ..distributed.stats import slim_estimator

        return partial(collapsed_block_statistics, est=slim_estimator(self.est),
                       max_nnz=self.est._max_nnz(), n_worst=self.est.n_components)

    def apply_statistics(self, state, stats):
        """The step of :meth:`step` from the statistics of all its rows."""
        est, D = self.est, state.D
        b = int(stats["n"])
        batch = stats["stats"]
        state.stats.merge_(batch, decay=forgetting_factor(state.n_steps, b))
        touched = (batch.diag.to(D.device) > 0).nonzero().squeeze(1)
        refresh_atoms(D, state.stats, touched,
                      preconditioner="gershgorin" if est.positive_code else "jacobi")
        used = torch.zeros(D.shape[0], dtype=torch.bool, device=D.device)
        used[touched] = True
        update_since_used(state.since_used, used, b)
        dead = dead_atoms(state.since_used, est._window())
        state.n_resampled += int(resample_dead_atoms(
            D, dead, stats["worst"].rows.to(D), generator=state.generator, stats=state.stats,
            since_used=state.since_used).numel())
        mse = float(stats["rss"]) / (b * D.shape[1])
        if not math.isfinite(mse):
            raise ValueError(
                "The reconstruction error became non-finite; check the scale of X "
                "(values too large for float32?)."
            )
        return {"loss": mse}
