"""The one interface the distributed learners see: statistics that add up.

A learner that can be distributed splits its step in three:

* ``broadcast(state)``: what every worker needs to code its rows (the
  dictionary, a routing index), small and picklable;
* ``block_statistics(payload, Xb)`` (a picklable callable, see
  ``statistics_fn``): the sufficient statistics of one block of rows, a dict
  whose values add up with ``+`` (tensors, numbers, :class:`TopRows`,
  :class:`~skdict.updates.SparseStats`);
* ``apply_statistics(state, stats)``: the update from the statistics of all
  the rows of the step, summed.

How the sum is taken is the engine's business (a tree reduction on Dask workers,
an all-reduce across torch.distributed ranks, or nothing at all on one process),
so each algorithm is written once.
"""

from __future__ import annotations

import torch

__all__ = ["TopRows", "add_statistics", "slim_estimator", "tree_sum"]

# fitted state and callables that workers never need (and may not unpickle)
_NOT_SHIPPED = ("callbacks", "dict_init")


def slim_estimator(est):
    """A copy of ``est`` with its parameters only (no fitted state, callbacks or
    initial dictionary): what a worker needs to run the estimator's coding
    methods, pickled small."""
    params = est.get_params(deep=False)
    for p in _NOT_SHIPPED:
        if p in params:
            params[p] = None
    return type(est)(**params)


class TopRows:
    """The (at most) ``k`` rows with the largest scores; ``a + b`` keeps the
    ``k`` best of both (ties keep ``a``'s rows first)."""

    def __init__(self, scores, rows, k):
        self.k = int(k)
        if scores.shape[0] > self.k:
            keep = scores.topk(self.k).indices.sort().values
            scores, rows = scores[keep], rows[keep]
        self.scores, self.rows = scores, rows

    @classmethod
    def of_residuals(cls, R, k):
        """The ``k`` worst-reconstructed rows of a residual block ``R``."""
        return cls((R.double() ** 2).sum(1), R, k)

    def __add__(self, other):
        return TopRows(torch.cat([self.scores, other.scores.to(self.scores.device)]),
                       torch.cat([self.rows, other.rows.to(self.rows.device)]),
                       max(self.k, other.k))

    def to(self, device):
        return TopRows(self.scores.to(device), self.rows.to(device), self.k)


def add_statistics(a, b):
    """``a + b`` key by key (both dicts hold the same keys)."""
    if a.keys() != b.keys():
        raise ValueError(f"statistics with different keys: {sorted(a)} and {sorted(b)}.")
    return {k: a[k] + b[k] for k in a}


def tree_sum(parts):
    """Pairwise (tree) sum of a non-empty list of statistics dicts."""
    parts = list(parts)
    while len(parts) > 1:
        nxt = [add_statistics(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            nxt.append(parts[-1])
        parts = nxt
    return parts[0]
