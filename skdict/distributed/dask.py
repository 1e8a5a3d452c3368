"""Dask glue: estimators on ``dask.array`` input, through the same code.

* ``transform`` / ``inverse_transform`` map blocks through the picklable twin
  :class:`skdict.functional.BlockTransformer` and return lazy dask arrays (CSR
  chunks with a CSR ``meta``, dense chunks with ``sparse_output=False``); the
  twin (fitted arrays, no training state) is sent to the workers once per call
  (``Client.scatter(..., broadcast=True)`` under a ``distributed`` client, one
  shared graph key otherwise), never once per task.
* ``score`` (and every batch-wise metric) runs the estimator's batch reduce on
  each block on the workers and sums the totals in a tree.
* ``fit`` / ``partial_fit`` of the statistics learners (those with
  ``broadcast`` / ``statistics_fn`` / ``apply_statistics``, see
  :mod:`skdict.distributed.stats`) run the ordinary
  :class:`~skdict.training.Trainer` loop over *waves* of blocks: each step
  sends the dictionary once, codes one block per worker, tree-reduces the
  sufficient statistics on the workers and updates the dictionary on the client.
  Gradient-trained estimators read the blocks as a stream of batches.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._backend import resolve_device, torch_dtype
from ..data.codes import CSRBuilder
from ..data.sources import RowSource, _to_tensor, as_source, check_block_finite
from ..functional import BlockTransformer
from .stats import add_statistics

__all__ = [
    "DaskLearner",
    "DaskTokens",
    "WaveSource",
    "get_client",
    "inverse_transform_blocks",
    "reduce_blocks",
    "share",
    "transform_blocks",
]


def get_client():
    """The current ``distributed`` client, or None (local dask schedulers, or a
    local scheduler chosen with ``dask.config.set(scheduler=...)``)."""
    import dask

    sched = dask.config.get("scheduler", None)
    if isinstance(sched, str) and sched not in ("dask.distributed", "distributed"):
        return None
    try:
        from distributed import get_client as _get
    except ImportError:  # pragma: no cover - dask without distributed
        return None
    try:
        return _get()
    except ValueError:
        return None


def share(obj):
    """One copy of ``obj`` for every task of a computation: scattered to all the
    workers of the current client (sent once each), else one graph key."""
    import dask

    client = get_client()
    if client is not None:
        # in a list: scatter would split a dict or a tuple into one key per item
        return client.scatter([obj], broadcast=True, hash=False)[0]
    return dask.delayed(obj, pure=False)


def _n_workers():
    client = get_client()
    if client is None:
        return 1
    return max(1, sum(client.nthreads().values()))


def _delayed(fn):
    import dask

    return dask.delayed(fn, pure=True)


def _tree(parts, add):
    """Pairwise sum of delayed parts, on the workers."""
    parts = list(parts)
    add = _delayed(add)
    while len(parts) > 1:
        nxt = [add(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            nxt.append(parts[-1])
        parts = nxt
    return parts[0]


# ------------------------------------------------------------------ transform
def _transform_block(block, twin, *, offsets, est_name, sparse_output, empty, block_id=None):
    i = block_id[0]
    if block.shape[0] == 0:
        return empty
    check_block_finite(block, i, offsets[i], offsets[i + 1], est_name)
    return twin.transform(block, sparse_output)


def transform_blocks(est, X, *, sparse_output):
    """``est.transform`` of a row-chunked dask array ``X``, lazily."""
    src = as_source(X, estimator=est, reset=False, allow_stream=False)
    K = est._n_codes()
    empty = (CSRBuilder(K, src.dtype).build() if sparse_output
             else np.zeros((0, K), dtype=src.dtype))
    twin = share(BlockTransformer(est))
    return X.map_blocks(
        _transform_block, twin, offsets=tuple(int(o) for o in src.offsets),
        est_name=type(est).__name__, sparse_output=bool(sparse_output), empty=empty,
        chunks=(X.chunks[0], (K,)), dtype=src.dtype, meta=empty,
    )


def _inverse_block(block, twin, *, empty):
    if block.shape[0] == 0:
        return empty
    return twin.inverse_transform(block)


def inverse_transform_blocks(est, C):
    """``est.inverse_transform`` of a dask array of codes (CSR or dense chunks)."""
    name = type(est).__name__
    K = est._n_codes()
    if C.ndim != 2 or C.shape[1] != K:
        raise ValueError(
            f"codes must be 2-D with {K} columns (the {name}'s components), got shape "
            f"{C.shape}; pass the output of transform()."
        )
    if any(math.isnan(c) for c in C.chunks[0]):
        raise ValueError(
            "the dask array of codes has unknown chunk sizes; call C.compute_chunk_sizes() "
            "first."
        )
    if len(C.chunks[1]) > 1:
        raise ValueError(
            f"the dask array of codes is chunked along its columns ({C.chunks[1]}); "
            "rechunk it into row blocks first: C.rechunk({1: -1})."
        )
    dtype = np.dtype(C.dtype) if C.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    D, _ = est._decoder(torch.device("cpu"), dtype)
    P = int(D.shape[1])
    empty = np.zeros((0, P), dtype=dtype)
    twin = share(BlockTransformer(est))
    return C.map_blocks(_inverse_block, twin, empty=empty, chunks=(C.chunks[0], (P,)),
                        dtype=dtype, meta=empty)


# ------------------------------------------------------------------ reduce / score
def _reduce_block(twin, block, i, start, stop, est_name, sums, fn):
    check_block_finite(block, i, start, stop, est_name)
    return twin.reduce(block, sums, fn)


def _add_reduced(a, b):
    return add_statistics(a[0], b[0]), a[1] + b[1], a[2]


def reduce_blocks(est, X, sums, *, fn=None):
    """``est._reduce`` of a dask array: each block on the workers, totals summed
    in a tree; computed (the totals are a few numbers)."""
    import dask

    src = as_source(X, estimator=est, reset=False, allow_stream=False)
    if fn is not None and getattr(fn, "__self__", None) is not est:
        raise ValueError("fn must be a method of the estimator to run on dask blocks.")
    fn_name = None if fn is None else fn.__name__
    twin = share(BlockTransformer(est))
    reduce = _delayed(_reduce_block)
    name = type(est).__name__
    parts = [reduce(twin, blk, i, *src.block_range(i), name, sums, fn_name)
             for i, blk in enumerate(X.to_delayed().ravel()) if src.block_range(i)[1]
             > src.block_range(i)[0]]
    return dask.compute(_tree(parts, _add_reduced))[0]


# ------------------------------------------------------------------ fit
class Wave:
    """The blocks of one training step (one per worker, at least
    ``batch_size`` rows), as the :class:`~skdict.training.Trainer` sees a batch."""

    def __init__(self, source, blocks):
        self.source = source
        self.blocks = list(blocks)
        n = sum(b - a for a, b in (source.block_range(i) for i in self.blocks))
        self.shape = (n, source.n_features)


class WaveSource(RowSource):
    """A :class:`~skdict.data.sources.DaskSource` read as waves of blocks."""

    def __init__(self, source, n_workers=None):
        self.source = source
        self.n_samples = source.n_samples
        self.n_features = source.n_features
        self.dtype = source.dtype
        self.n_workers = _n_workers() if n_workers is None else int(n_workers)

    def batches(self, batch_size, *, device, shuffle=False, generator=None, dtype=None):
        src = self.source
        order = (torch.randperm(src.n_blocks, generator=generator).tolist() if shuffle
                 else list(range(src.n_blocks)))
        order = [i for i in order if src.block_range(i)[1] > src.block_range(i)[0]]
        wave, rows = [], 0
        for i in order:
            a, b = src.block_range(i)
            wave.append(i)
            rows += b - a
            if len(wave) >= self.n_workers and rows >= batch_size:
                yield Wave(src, wave)
                wave, rows = [], 0
        if wave:
            yield Wave(src, wave)

    def sample(self, n, *, generator, device, dtype=None):
        return self.source.sample(n, generator=generator, device=device, dtype=dtype)


def _block_statistics(fn, payload, block, i, start, stop, est_name, device, dtype):
    check_block_finite(block, i, start, stop, est_name)
    Xb = _to_tensor(block, resolve_device(device), torch_dtype(dtype))
    # back on the host: the client (or the next worker) may have no GPU
    return _to_device(fn(payload, Xb), "cpu")


def _to_device(stats, device):
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in stats.items()}


class DaskLearner:
    """A statistics learner whose step codes a wave of dask blocks on the workers
    and applies the tree-reduced statistics (the learner's own
    ``apply_statistics``). Everything else is the wrapped learner's."""

    def __init__(self, learner, *, worker_device):
        self.learner = learner
        self.worker_device = worker_device
        self._fn = share(learner.statistics_fn())  # sent once per fit

    def __getattr__(self, name):
        return getattr(self.__dict__["learner"], name)

    def init_state(self, source, generator):
        return self.learner.init_state(source, generator)

    def step(self, state, wave):
        import dask

        learner, src = self.learner, wave.source
        payload = share(learner.broadcast(state))  # the dictionary, once per step
        stats = _delayed(_block_statistics)
        name = src._name
        parts = [stats(self._fn, payload, src.X.blocks[i, 0], i, *src.block_range(i), name,
                       self.worker_device, learner.dtype) for i in wave.blocks]
        total = dask.compute(_tree(parts, add_statistics))[0]
        return learner.apply_statistics(state, _to_device(total, learner.device))


# ------------------------------------------------------------------ token selection
def _block_state(block, dtype, sel):
    """The selector's transform state over one block of tokens (or a few rows)."""
    T = torch.as_tensor(np.asarray(block)).to(dtype)
    inv = None
    if sel.normalize:
        norms = torch.linalg.vector_norm(T, dim=1)
        inv = torch.where(norms > 0, 1.0 / norms, torch.ones_like(norms))
    scale = float(sel.scale) if sel.scale is not None else 1.0 / math.sqrt(T.shape[1])
    return {"T": T, "inv": inv, "scale": scale, "n": T.shape[0]}


def _tile_candidates(block, Q, i, s0, s1, sel, k, stats):
    """Top-``k`` scores of every query over one block of tokens (global indices)
    and, for ``"threshold"``, the row sums of ``|scores|``."""
    check_block_finite(block, i, s0, s1, type(sel).__name__)
    state = _block_state(block, Q.dtype, sel)
    out = sel._pass(Q, state, m=k, stats=stats)
    return {"vals": out["vals"], "idx": out["idx"] + s0,
            "abs_sum": out["abs_sum"] if stats else torch.zeros(())}


def _merge_candidates(a, b):
    from ..selection import _merge_topk

    k = a["vals"].shape[1]
    vals, idx = _merge_topk(a["vals"], a["idx"], b["vals"], b["idx"], max(k, b["vals"].shape[1]))
    return {"vals": vals, "idx": idx, "abs_sum": a["abs_sum"] + b["abs_sum"]}


def select_from_dask_tokens(sel, X, *, sparse_output):
    """``SparseTokenSelector.transform`` when the fitted tokens are a dask array:
    each token block is scored against the queries on a worker, keeping its
    top-``k`` per query, the candidates are merged in a tree (top-``k`` of the
    union) and the weights computed from the merged candidates. ``"lasso"``
    runs the selector's working-set loop with its passes over the tokens on the
    workers (:class:`DaskTokens`)."""
    import dask

    from ..data.codes import Codes
    from ..nn.attention import budget_size, candidate_weights
    from .stats import slim_estimator

    name = type(sel).__name__
    tokens = sel.tokens_
    n = int(tokens.shape[0])
    k = budget_size(n, sel.keep_ratio, sel.max_tokens)
    lasso = sel.method == "lasso"
    if k is None and not lasso:
        raise ValueError(
            f"{name} over a dask array of tokens selects a budget of top-scoring tokens "
            f"per query; method={sel.method!r} with keep_ratio={sel.keep_ratio} and "
            f"max_tokens={sel.max_tokens} needs every token at once. Use method='topk', "
            "'threshold' or 'sparsemax' with keep_ratio or max_tokens, method='lasso', "
            "or fit on the computed tokens."
        )
    src = as_source(X, estimator=sel, reset=False, allow_stream=False)
    if src.is_dask:
        raise ValueError(f"{name} over dask tokens takes the queries in memory, not as a "
                         "dask array; compute them first (or transform query blocks).")
    tsrc = as_source(tokens, estimator=sel, reset=False)
    stats = sel.method == "threshold"
    worker = slim_estimator(sel)
    out_builder = CSRBuilder(n, src.dtype)
    bs = sel._batch_size_for(n, src.dtype)
    cand = _delayed(_tile_candidates)
    dense = [] if not sparse_output else None
    pool = DaskTokens(sel, tsrc, src.dtype) if lasso else None
    state = {"n": n, "k": k}
    for _, _, Qb in src.ordered(bs, device=torch.device("cpu")):
        if lasso:
            idx, w = sel._select_lasso(Qb, state, pool=pool)
            codes = Codes(indices=idx, values=w)
        else:
            Qs = share(Qb)
            parts = [cand(blk, Qs, i, *tsrc.block_range(i), worker, k, stats)
                     for i, blk in enumerate(tokens.to_delayed().ravel())]
            best = dask.compute(_tree(parts, _merge_candidates))[0]
            lam = (sel.alpha * best["abs_sum"] / n)[:, None] if stats else None
            w = candidate_weights(best["vals"], sel.method, alpha=sel.alpha, lam=lam,
                                  empty=sel.empty)
            codes = Codes(indices=best["idx"], values=w)
        if sparse_output:
            codes.add_to(out_builder)
        else:
            dense.append(codes.to_dense(n).numpy())
    if sparse_output:
        return out_builder.build()
    return np.concatenate(dense).astype(src.dtype, copy=False)


# ------------------------------------------------------------------ lasso over dask tokens
def _lasso_initial(block, Q, i, s0, s1, sel, m0):
    """One block's part of the working sets' start: per query its ``m0`` largest
    ``|<q, t>|`` and its best ``<q, t>`` (global indices)."""
    check_block_finite(block, i, s0, s1, type(sel).__name__)
    state = _block_state(block, Q.dtype, sel)
    C = Q @ sel._atoms(state, 0, state["n"]).T
    best_v, best_i = torch.topk(C.abs(), min(m0, C.shape[1]), dim=1)
    top_v, top_i = torch.topk(C, 1, dim=1)
    return {"best": (best_v, best_i + s0), "top": (top_v, top_i + s0)}


def _merge_initial(a, b):
    from ..selection import _merge_topk

    out = {}
    for key in ("best", "top"):
        (va, ia), (vb, ib) = a[key], b[key]
        out[key] = _merge_topk(va, ia, vb, ib, max(va.shape[1], vb.shape[1]))
    return out


def _lasso_violators(block, i, s0, s1, sel, R, flat, offsets, cut, add):
    """One block's KKT violators: per residual row ``j`` the (at most ``add``)
    tokens outside its working set ``flat[offsets[j]:offsets[j + 1]]`` with the
    largest ``|<r_j, t>| > cut`` (value 0: no violator in that slot)."""
    state = _block_state(block, R.dtype, sel)
    corr = (R @ sel._atoms(state, 0, state["n"]).T).abs()
    rows = torch.repeat_interleave(torch.arange(R.shape[0]), offsets.diff())
    inside = (flat >= s0) & (flat < s1)
    member = torch.zeros_like(corr, dtype=torch.bool)
    member[rows[inside], flat[inside] - s0] = True
    score = torch.where((corr > cut) & ~member, corr, torch.zeros_like(corr))
    v, p = torch.topk(score, min(add, score.shape[1]), dim=1)
    return {"vals": v, "idx": p + s0}


def _merge_violators(a, b):
    from ..selection import _merge_topk

    vals, idx = _merge_topk(a["vals"], a["idx"], b["vals"], b["idx"],
                            max(a["vals"].shape[1], b["vals"].shape[1]))
    return {"vals": vals, "idx": idx}


class DaskTokens:
    """The lasso working-set loop's view of a dask array of tokens
    (:meth:`SparseTokenSelector._select_lasso`): the passes over all tokens (the
    working sets' start, the KKT check of the residuals) run blockwise on the
    workers and are merged in a tree (top-``k`` of the union); the tokens of the
    working sets are fetched once each and kept on the client."""

    def __init__(self, sel, tsrc, dtype):
        self.sel = sel
        self.src = tsrc
        self.tokens = tsrc.X
        self.tdtype = torch_dtype(dtype)
        from .stats import slim_estimator

        self.worker = share(slim_estimator(sel))
        self.blocks = [(i, blk) for i, blk in enumerate(self.tokens.to_delayed().ravel())
                       if tsrc.block_range(i)[1] > tsrc.block_range(i)[0]]
        self.ids = torch.zeros(0, dtype=torch.long)  # fetched tokens, sorted
        self.state = _block_state(np.zeros((0, tsrc.n_features)), self.tdtype, sel)

    def _run(self, fn, merge, *args):
        import dask

        task = _delayed(fn)
        parts = [task(blk, i, *self.src.block_range(i), self.worker, *args)
                 for i, blk in self.blocks]
        return dask.compute(_tree(parts, merge))[0]

    def initial(self, Qb, m0):
        import dask

        task = _delayed(_lasso_initial)
        Qs = share(Qb)
        parts = [task(blk, Qs, i, *self.src.block_range(i), self.worker, m0)
                 for i, blk in self.blocks]
        out = dask.compute(_tree(parts, _merge_initial))[0]
        return out["best"][1], out["top"][1]

    def violators(self, R, sets, cut, add):
        lens = torch.tensor([0] + [U.numel() for U in sets])
        out = self._run(_lasso_violators, _merge_violators, share(R),
                        torch.cat(list(sets)), torch.cumsum(lens, 0), float(cut), int(add))
        hit = out["vals"] > 0
        return [out["idx"][j][hit[j]] if bool(hit[j].any()) else None
                for j in range(R.shape[0])]

    def _fetch(self, idx):
        """Positions of the tokens ``idx`` among the fetched ones (fetching the
        missing ones from the workers)."""
        idx = idx.reshape(-1)
        missing = np.setdiff1d(idx.numpy(), self.ids.numpy())
        if missing.size:
            check = np.asarray(self.tokens[missing].compute())
            if not np.all(np.isfinite(check)):
                raise ValueError(
                    f"the {type(self.sel).__name__}'s tokens contain NaN or infinity."
                )
            new = _block_state(check, self.tdtype, self.sel)
            ids = torch.cat([self.ids, torch.from_numpy(missing)])
            order = torch.argsort(ids)
            T = torch.cat([self.state["T"], new["T"]])[order]
            inv = None
            if new["inv"] is not None:
                inv = torch.cat([self.state["inv"], new["inv"]])[order]
            self.ids = ids[order]
            self.state = dict(self.state, T=T, inv=inv, n=T.shape[0])
        return torch.searchsorted(self.ids, idx)

    def atoms_at(self, idx):
        pos = self._fetch(idx).view(idx.shape)  # before reading the (new) state
        return self.sel._atoms_at(self.state, pos)

    def scores_at(self, Qb, idx):
        pos = self._fetch(idx).view(idx.shape)
        return self.sel._scores_at(Qb, self.state, pos)
