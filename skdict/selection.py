"""Budgeted relevance selection of tokens: :class:`SparseTokenSelector`.

Instead of softmax attention, which gives every token some weight, each query
selects a few relevant tokens with hard sparsity. The fitted token embeddings
play the role of a dictionary; ``transform(queries)`` returns the selection
weights as CSR ``(n_queries, n_tokens)`` and ``inverse_transform(W)`` the
attended output ``W @ values``.

Scale: scores are computed tile by tile over the tokens (``tile_size`` tokens
at a time) with a running top-k merge, so no dense ``(batch, n_tokens)`` block
beyond one tile is held when a budget is set, and a million tokens work on one
machine. Tokens fitted as a dask array stay on the workers: every method's
passes over them run blockwise there (for ``"lasso"``, the working sets' start
and each KKT check), merged in a tree.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._backend import default_batch_size, torch_dtype
from ._validation import restore_input_attrs_on_error
from .base import BaseSparseCoder, SparseCodingMixin
from .data.codes import Codes
from .data.sources import as_source, is_dask
from .nn.attention import budget_size, candidate_weights
from .solvers import lasso_exact, power_iteration, topk_decode
from .solvers.exact import lasso_exact_compact

__all__ = ["SparseTokenSelector"]

METHODS = ("lasso", "threshold", "sparsemax", "topk")

# Working set of the lasso: initial candidates per query and KKT violators added
# per query and round.
_LASSO_INIT = 256
_LASSO_ADD = 256


def _lasso_on(q, Tu, alpha):
    """Exact lasso coefficients of one query ``q`` over the atoms ``Tu`` (m, d):
    the compiled homotopy on CPU (KKT-certified, with the active-set method for
    an uncertified row), the batched active-set method elsewhere."""
    G64 = Tu.double() @ Tu.double().T
    if q.device.type == "cpu":
        idx, val, _, _, _ = lasso_exact_compact(q[None], G64.to(q.dtype), alpha, gram64=G64,
                                                n_features=Tu.shape[1], dictionary=Tu)
        return torch.zeros(Tu.shape[0], dtype=q.dtype).scatter_add_(0, idx[0], val[0])
    G = G64.to(q.dtype)
    return lasso_exact((q @ Tu.T)[None], G, alpha, gram64=G64, method="active_set",
                       L=power_iteration(G64)).codes[0]


def _max_abs(X):
    if isinstance(X, torch.Tensor):
        return float(X.detach().abs().max()) if X.numel() else 0.0
    if sp.issparse(X):
        return float(abs(X).max()) if X.nnz else 0.0
    return float(np.abs(X).max()) if X.size else 0.0


def _merge_topk(best_v, best_i, vals, idx, k):
    """Running top-k merge: keep the k largest of the union of two candidate sets."""
    if best_v is None:
        kk = min(k, vals.shape[1])
        v, p = torch.topk(vals, kk, dim=1)
        return v, idx.gather(1, p) if idx.dim() == 2 else idx[p]
    v = torch.cat([best_v, vals], dim=1)
    i = torch.cat([best_i, idx.expand(vals.shape[0], -1) if idx.dim() == 1 else idx], 1)
    kk = min(k, v.shape[1])
    v, p = torch.topk(v, kk, dim=1)
    return v, i.gather(1, p)


class _TokenTiles:
    """The lasso working-set loop's view of in-memory tokens: passes tile by tile
    over the selector's transform state."""

    def __init__(self, sel, state):
        self.sel, self.state = sel, state

    def initial(self, Qb, m0):
        """Per query, the ``m0`` tokens of largest ``|<q, t>|`` and the best
        scoring token (``(b, m0)`` and ``(b, 1)`` global indices)."""
        sel, state = self.sel, self.state
        best_v = best_i = top_v = top_i = None
        for s0, s1 in sel._tiles(state["n"]):
            C = Qb @ sel._atoms(state, s0, s1).T
            idx = torch.arange(s0, s1, device=Qb.device)
            best_v, best_i = _merge_topk(best_v, best_i, C.abs(), idx, m0)
            top_v, top_i = _merge_topk(top_v, top_i, C, idx, 1)
        return best_i, top_i

    def atoms_at(self, idx):
        return self.sel._atoms_at(self.state, idx)

    def scores_at(self, Qb, idx):
        return self.sel._scores_at(Qb, self.state, idx)

    def violators(self, R, sets, cut, add):
        """Per residual row ``j``: tokens outside ``sets[j]`` with ``|<r_j, t>| >
        cut``, at most ``add`` per tile (None: no violator)."""
        sel, state, n = self.sel, self.state, self.state["n"]
        member = torch.zeros(R.shape[0], n, dtype=torch.bool, device=R.device)
        for j, U in enumerate(sets):
            member[j, U] = True
        added = [[] for _ in sets]
        for s0, s1 in sel._tiles(n):
            corr = (R @ sel._atoms(state, s0, s1).T).abs()
            viol = (corr > cut) & ~member[:, s0:s1]
            if bool(viol.any()):
                score = torch.where(viol, corr, torch.zeros_like(corr))
                v, p = torch.topk(score, min(add, score.shape[1]), dim=1)
                for j in viol.any(1).nonzero().squeeze(1).tolist():
                    added[j].append(p[j][v[j] > 0] + s0)
        return [torch.cat(a) if a else None for a in added]


class SparseTokenSelector(SparseCodingMixin, BaseEstimator):
    """Select, for each query, a few relevant tokens with a hard budget.

    ``fit(tokens)`` stores the token embeddings (and optionally their
    ``values``); ``transform(queries)`` returns CSR selection weights of shape
    ``(n_queries, n_tokens)``. Scores are ``s = scale * <q, t>`` with ``t`` the
    token embedding (unit-normalised when ``normalize=True``).

    Methods (``method``):

    * ``"lasso"``: each query ``q`` is sparse-coded over the token embeddings,
      ``argmin_a 0.5 ||q - a T||^2 + alpha ||a||_1`` (exact active-set solver
      :func:`skdict.solvers.lasso_exact`); the tokens with non-zero
      coefficients are the selection ("the most relevant tokens are those that
      would have non-zero coefficients in a sparse reconstruction of the
      information need"). Their weights are the softmax of their scores
      renormalised over the selection, so rows sum to one like attention.
      Per query a working set of candidates (its 256 largest ``|<q, t>|`` and
      its best score) is coded exactly by the compiled lasso homotopy, the KKT
      condition ``|<r, t>| <= alpha`` is checked against every token tile by
      tile, and violators are added and the lasso re-solved until it holds, so
      the result is the exact lasso over all tokens.
    * ``"threshold"``: an adaptive soft threshold: weights
      ``max(s - lam, 0)`` with ``lam = alpha * mean|s|`` (mean over all tokens),
      renormalised to sum to one.
    * ``"sparsemax"``: the Euclidean projection of the scores onto the simplex
      (exact, sort-based); the budget-1 case of soft thresholding.
    * ``"topk"``: the ``k`` best scores, softmax-renormalised over the kept
      ones (no budget: the dense softmax).

    The budget caps the non-zeros of every row for every method:
    ``k = min(ceil(keep_ratio * n_tokens), max_tokens)``. ``"threshold"`` and
    ``"sparsemax"`` are then computed on the ``k`` best scores (sparsemax on
    them equals the full sparsemax whenever its support has at most ``k``
    tokens); ``"lasso"`` keeps the ``k`` largest ``|coefficients|`` of the exact
    solution.

    Empty rows: a lasso solution with no non-zero (``alpha >= max|<q, t>|``)
    or a threshold that no score passes selects nothing. With
    ``empty="argmax"`` (default) the row then puts all its weight on its best
    scoring token; with ``empty="zero"`` it stays empty (an all-zero row,
    attended output zero). Sparsemax and top-k never produce empty rows.

    Parameters
    ----------
    method : {"lasso", "threshold", "sparsemax", "topk"}, default="lasso"
    alpha : float, default=1.0
        ``"lasso"``: the L1 weight. ``"threshold"``: the multiplier of the
        adaptive threshold ``alpha * mean|s|``. Unused by the other methods.
    keep_ratio : float in (0, 1], default=None
        Budget as a share of the tokens.
    max_tokens : int, default=None
        Budget as a count (must not exceed the number of tokens).
    scale : float, default=None
        Score scale (inverse temperature); None is ``1 / sqrt(n_features)``,
        the scale of dot-product attention.
    normalize : bool, default=True
        Unit-normalise the token embeddings for scoring and coding (unit-norm
        atoms, as everywhere in skdict). ``values`` (for ``inverse_transform``)
        are never normalised.
    empty : {"argmax", "zero"}, default="argmax"
        What an empty row becomes; see above.
    compute_cost : float, default=1.0
        Weight of the compute penalty in :meth:`score`.
    tile_size : int, default=65536
        Tokens scored at a time.
    device : str or torch.device, default="auto"
    sparse_output : bool, default=True
        CSR output (``csr_matrix``, or ``csr_array`` under scikit-learn's
        ``sparse_interface="sparray"``); dense ndarray otherwise.
    batch_size : int, default=None
        Queries processed at a time; None picks ~64 MB of scores per batch.

    Attributes
    ----------
    tokens_ : ndarray of shape (n_tokens, n_features)
        The fitted token embeddings (not normalised).
    values_ : ndarray of shape (n_tokens, n_values)
        What :meth:`inverse_transform` mixes (``tokens_`` unless ``values`` was
        passed to :meth:`fit`).
    n_tokens_ : int
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of ``X`` when it had string column names (a DataFrame).

    See Also
    --------
    skdict.nn.SparseAttention : the differentiable multi-head module.
    skdict.metrics.attention_mass_captured, skdict.metrics.output_fidelity

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import SparseTokenSelector
    >>> rng = np.random.default_rng(0)
    >>> tokens = rng.standard_normal((50, 8))
    >>> sel = SparseTokenSelector(method="topk", keep_ratio=0.1, device="cpu")
    >>> W = sel.fit(tokens).transform(tokens[:3])
    >>> W.shape, W.getnnz(axis=1).tolist()
    ((3, 50), [5, 5, 5])
    >>> np.allclose(W.sum(axis=1), 1)
    True
    """

    _parameter_constraints: dict = {
        **BaseSparseCoder._parameter_constraints,
        "method": [StrOptions(set(METHODS))],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "keep_ratio": [Interval(numbers.Real, 0, 1, closed="right"), None],
        "max_tokens": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "scale": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "normalize": ["boolean"],
        "empty": [StrOptions({"argmax", "zero"})],
        "compute_cost": [Interval(numbers.Real, 0, None, closed="left")],
        "tile_size": [Interval(numbers.Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        *,
        method="lasso",
        alpha=1.0,
        keep_ratio=None,
        max_tokens=None,
        scale=None,
        normalize=True,
        empty="argmax",
        compute_cost=1.0,
        tile_size=65536,
        device="auto",
        sparse_output=True,
        batch_size=None,
    ):
        self.method = method
        self.alpha = alpha
        self.keep_ratio = keep_ratio
        self.max_tokens = max_tokens
        self.scale = scale
        self.normalize = normalize
        self.empty = empty
        self.compute_cost = compute_cost
        self.tile_size = tile_size
        self.device = device
        self.sparse_output = sparse_output
        self.batch_size = batch_size

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, values=None):
        """Store the token embeddings (and optionally their values).

        Parameters
        ----------
        X : array-like, sparse matrix or torch.Tensor of shape (n_tokens, n_features)
            Token embeddings: the dictionary the queries select from.
        y : Ignored
        values : array-like of shape (n_tokens, n_values), default=None
            What :meth:`inverse_transform` mixes; default: the embeddings.

        Returns
        -------
        self
        """
        self._device()
        with restore_input_attrs_on_error(self):
            return self._fit(X, values)

    def _fit(self, X, values):
        src = as_source(X, estimator=self, reset=True, allow_stream=False)
        X, dtype = src.X, src.dtype
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        elif sp.issparse(X):
            X = X.toarray()
        n = X.shape[0]
        self._check_budget(n)
        self._token_max = _max_abs(X)
        self._check_magnitude(0.0, dtype, "the tokens")
        if values is not None:
            if isinstance(values, torch.Tensor):
                values = values.detach().cpu().numpy()
            values = np.asarray(values)
            if values.ndim == 1:
                values = values[:, None]
            if values.ndim != 2 or values.shape[0] != n:
                raise ValueError(
                    f"values must have shape ({n}, n_values) (one row per token), "
                    f"got {values.shape}."
                )
            if values.dtype.kind not in "fiu" or not np.all(np.isfinite(values)):
                raise ValueError("values must be finite numbers.")
            values = values.astype(dtype, copy=False)
        self.tokens_ = X
        self.values_ = X if values is None else values
        self.n_tokens_ = n
        return self

    def _n_codes(self):
        return self.n_tokens_

    def _transform_impl(self, X, *, sparse_output=None, cache=None):
        if is_dask(getattr(self, "tokens_", None)):  # tiles on the workers, top-k merged
            from .distributed.dask import select_from_dask_tokens

            return select_from_dask_tokens(
                self, X, sparse_output=self.sparse_output if sparse_output is None
                else sparse_output)
        return super()._transform_impl(X, sparse_output=sparse_output, cache=cache)

    def _source(self, X):
        src = super()._source(X)
        if hasattr(src, "X"):  # arrays: scores must stay finite in the compute dtype
            self._check_magnitude(_max_abs(src.X), src.dtype, "X (the queries)")
        return src

    def _check_magnitude(self, query_max, dtype, what):
        """A bound on |score| (queries times unit-norm or raw tokens) within the
        dtype's range, so that no score overflows (the lasso's working set would
        never settle on non-finite scores)."""
        d = self.n_features_in_
        t = 1.0 if self.normalize else self._token_max
        scale = float(self.scale) if self.scale is not None else 1.0 / math.sqrt(d)
        limit = float(np.finfo(dtype).max) ** 0.5  # headroom for squares of scores
        if not query_max * t * d * max(scale, 1.0) < limit or not self._token_max * d < limit:
            raise ValueError(
                f"{what} and the tokens have values up to {max(query_max, self._token_max):.3g}, "
                f"whose attention scores overflow {np.dtype(dtype).name}; rescale them or pass "
                "float64 arrays."
            )

    def _check_budget(self, n):
        if self.max_tokens is not None and self.max_tokens > n:
            raise ValueError(
                f"max_tokens={self.max_tokens} exceeds the {n} fitted tokens; "
                "use a smaller max_tokens or keep_ratio."
            )

    def _check_ready(self):
        check_is_fitted(self)
        self._check_current_params()
        self._check_budget(self.n_tokens_)

    def _decoder(self, device, dtype):
        V = torch.as_tensor(np.asarray(self.values_)).to(device, torch_dtype(dtype))
        return V, None

    def _batch_size_for(self, n_codes, dtype):
        bs = getattr(self, "batch_size", None)
        if bs is not None:
            return int(bs)
        # the dense block here is the (batch, tile_size) score tile, not the codes
        return default_batch_size(min(n_codes, self.tile_size), dtype, lo=16, hi=4096)

    # ------------------------------------------------------------------ state
    def _transform_state(self, device, dtype):
        tdtype = torch_dtype(dtype)
        T = torch.as_tensor(np.asarray(self.tokens_)).to(device, tdtype)
        n, d = T.shape
        inv = None
        if self.normalize:
            norms = torch.linalg.vector_norm(T, dim=1)
            inv = torch.where(norms > 0, 1.0 / norms, torch.ones_like(norms))
        scale = float(self.scale) if self.scale is not None else 1.0 / math.sqrt(d)
        k = budget_size(n, self.keep_ratio, self.max_tokens)
        state = {"T": T, "inv": inv, "scale": scale, "k": k, "n": n}
        return state

    def _atoms(self, state, s0, s1):
        Tt = state["T"][s0:s1]
        return Tt if state["inv"] is None else Tt * state["inv"][s0:s1, None]

    def _tile_scores(self, Qb, state, s0, s1):
        """Scaled scores of a batch of queries against tokens ``s0:s1``."""
        S = Qb @ state["T"][s0:s1].T
        if state["inv"] is not None:
            S = S * state["inv"][s0:s1]
        return S * state["scale"]

    def _tiles(self, n):
        t = int(self.tile_size)
        for s0 in range(0, n, t):
            yield s0, min(n, s0 + t)

    def _pass(self, Qb, state, *, m=None, cutoff=None, stats=False):
        """One pass over the token tiles: optional running top-m, counts above
        ``cutoff`` and row statistics (sum |s|, max s)."""
        n = state["n"]
        best_v = best_i = None
        abs_sum = rowmax = counts = None
        for s0, s1 in self._tiles(n):
            St = self._tile_scores(Qb, state, s0, s1)
            if stats:
                a = St.abs().sum(1)
                mx = St.amax(1)
                abs_sum = a if abs_sum is None else abs_sum + a
                rowmax = mx if rowmax is None else torch.maximum(rowmax, mx)
            if cutoff is not None:
                c = (St > cutoff[:, None]).sum(1)
                counts = c if counts is None else counts + c
            if m is not None:
                idx = torch.arange(s0, s1, device=St.device)
                best_v, best_i = _merge_topk(best_v, best_i, St, idx, m)
        return {"vals": best_v, "idx": best_i, "abs_sum": abs_sum, "max": rowmax,
                "counts": counts}

    # ------------------------------------------------------------------ encode
    def _select(self, Qb, state):
        """Selected tokens of a batch: ``(indices, weights)``, both ``(b, m)``.

        Indices are distinct within a row; unselected slots carry weight 0.
        """
        if self.method == "lasso":
            return self._select_lasso(Qb, state)
        n, k = state["n"], state["k"]
        method = self.method
        if method == "topk" and k is None:
            k = n
        lam = None
        if k is not None:
            out = self._pass(Qb, state, m=k, stats=method == "threshold")
            vals, idx = out["vals"], out["idx"]
            if method == "threshold":
                lam = (self.alpha * out["abs_sum"] / n)[:, None]
        elif n <= self.tile_size:
            vals = self._tile_scores(Qb, state, 0, n)
            idx = torch.arange(n, device=vals.device).expand(vals.shape[0], -1)
            if method == "threshold":
                lam = self.alpha * vals.abs().mean(1, keepdim=True)
        else:
            # no budget and several tiles: the support lies above a cutoff known
            # after one pass (threshold: lam; sparsemax: max - 1, since
            # tau >= max - 1); count it, then gather exactly that many best.
            st = self._pass(Qb, state, stats=True)
            if method == "threshold":
                cut = self.alpha * st["abs_sum"] / n
                lam = cut[:, None]
            else:
                cut = st["max"] - 1
            cnt = self._pass(Qb, state, cutoff=cut)["counts"]
            m = max(1, int(cnt.max()))
            out = self._pass(Qb, state, m=m)
            vals, idx = out["vals"], out["idx"]
        w = candidate_weights(vals, method, alpha=self.alpha, lam=lam, empty=self.empty)
        return idx, w

    def _scores_at(self, Qb, state, idx):
        emb = state["T"][idx]  # (b, m, d)
        s = torch.einsum("bmd,bd->bm", emb, Qb)
        if state["inv"] is not None:
            s = s * state["inv"][idx]
        return s * state["scale"]

    def _atoms_at(self, state, idx):
        Tt = state["T"][idx]
        return Tt if state["inv"] is None else Tt * state["inv"][idx][:, None]

    def _select_lasso(self, Qb, state, pool=None):
        """Exact lasso selection of a batch of queries over all tokens.

        Per query, a working set starts from its ``_LASSO_INIT`` largest
        ``|<q, t>|`` and its best score; the lasso on it is solved by the
        compiled homotopy (:func:`~skdict.solvers.exact.lasso_exact_compact`,
        KKT-certified; the batched active-set method off CPU), the KKT
        condition ``|<r, t>| <= alpha`` is checked for every token outside it,
        batched over queries, and up to ``_LASSO_ADD`` worst violators are
        added, until none is left: the solution is then the exact lasso over all
        tokens, whatever their number. ``pool`` reads the tokens (the passes
        over them and the atoms of the working sets): the in-memory tokens tile
        by tile (:class:`_TokenTiles`, the default) or a dask array's blocks on
        the workers (:class:`skdict.distributed.dask.DaskTokens`).
        """
        pool = _TokenTiles(self, state) if pool is None else pool
        alpha = float(self.alpha)
        b, n = Qb.shape[0], state["n"]
        dev = Qb.device
        best_i, top_i = pool.initial(Qb, min(n, _LASSO_INIT))
        sets = [torch.unique(torch.cat([best_i[r], top_i[r]])) for r in range(b)]
        coefs = [None] * b
        kkt_tol = max(1e-6, 100 * torch.finfo(Qb.dtype).eps)
        active = list(range(b))
        while active:
            R = torch.empty(len(active), Qb.shape[1], dtype=Qb.dtype, device=dev)
            for j, r in enumerate(active):
                U = sets[r]
                Tu = pool.atoms_at(U)
                coefs[r] = (U, _lasso_on(Qb[r], Tu, alpha))
                R[j] = Qb[r] - coefs[r][1] @ Tu
            added = pool.violators(R, [sets[r] for r in active], alpha * (1 + kkt_tol),
                                   _LASSO_ADD)
            still = []
            for j, r in enumerate(active):
                cand = added[j]
                if cand is not None and cand.numel():
                    if cand.numel() > _LASSO_ADD:  # the worst violators over all tiles
                        cc = (R[j] @ pool.atoms_at(cand).T).abs()
                        cand = cand[torch.topk(cc, _LASSO_ADD).indices]
                    sets[r] = torch.unique(torch.cat([sets[r], cand]))
                    still.append(r)
            active = still
        k = state["k"]
        idx_rows, w_rows = [], []
        for r in range(b):
            U, coef = coefs[r]
            nz = (coef != 0).nonzero().squeeze(1)
            if k is not None and nz.numel() > k:
                nz = nz[torch.topk(coef[nz].abs(), k).indices]
            sel = U[nz]
            if sel.numel() == 0 and self.empty == "argmax":
                sel = top_i[r]
            if sel.numel():
                w = torch.softmax(pool.scores_at(Qb[r : r + 1], sel[None])[0], 0)
            else:
                w = torch.zeros(0, dtype=Qb.dtype, device=dev)
            idx_rows.append(sel)
            w_rows.append(w)
        return self._pad_rows(idx_rows, w_rows, n)

    @staticmethod
    def _pad_rows(idx_rows, w_rows, n):
        """Stack ragged rows, padding with distinct zero-weight columns."""
        width = max(1, max(i.numel() for i in idx_rows))
        b = len(idx_rows)
        dev = w_rows[0].device
        idx = torch.empty(b, width, dtype=torch.long, device=dev)
        wts = torch.zeros(b, width, dtype=w_rows[0].dtype, device=dev)
        for r, (i, w) in enumerate(zip(idx_rows, w_rows, strict=True)):
            m = i.numel()
            idx[r, :m] = i
            wts[r, :m] = w
            if m < width:
                used = set(i.tolist())
                free, c = [], 0
                while len(free) < width - m:
                    if c not in used:
                        free.append(c)
                    c += 1
                idx[r, m:] = torch.as_tensor(free, dtype=torch.long, device=dev)
        return idx, wts

    def _encode(self, Xb, state):
        idx, w = self._select(Xb, state)
        return Codes(indices=idx, values=w)

    # ------------------------------------------------------------------ public
    def get_support(self, X):
        """Indices of the selected tokens of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        support : list of ndarray
            One sorted int array per query.
        """
        W = sp.csr_matrix(self.transform(X))
        return [W.indices[W.indptr[i] : W.indptr[i + 1]].copy() for i in range(W.shape[0])]

    def attention_scores(self, X):
        """Dense scaled scores ``scale * <q, t>`` (n_queries, n_tokens).

        The scores the methods select from and the dense softmax reference of
        :meth:`score` and :mod:`skdict.metrics` uses. Dense: for evaluation on
        moderate sizes only.
        """
        check_is_fitted(self)
        src = self._source(X)
        device = self._device()
        state = self._transform_state(device, src.dtype)
        out = np.empty((src.n_samples, state["n"]), dtype=src.dtype)
        for a, b, Qb in src.ordered(self._batch_size_for(state["n"], src.dtype), device=device):
            out[a:b] = self._tile_scores(Qb, state, 0, state["n"]).cpu().numpy()
        return out

    def score(self, X, y=None):
        """Output fidelity minus a compute penalty (higher is better).

        With ``A`` the dense softmax of the scores (the attention every token
        would get) and ``W`` the selection weights, per query::

            fidelity = 1 - ||W V - A V|| / ||A V||

        and the score is ``mean(fidelity) - compute_cost * mean(nnz) / n_tokens``
        where ``nnz`` is the number of selected tokens. Fidelity rises with the
        budget with diminishing returns while the penalty rises linearly, so a
        ``GridSearchCV`` over ``keep_ratio`` or ``alpha`` (without ``y``) picks
        an interior trade-off between accuracy and compute; ``compute_cost=0``
        scores fidelity alone (then larger budgets always win). The dense
        reference is computed tile by tile with an online softmax.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
            Queries.
        y : Ignored

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        totals, nq, _ = self._reduce(X, fn=self._fidelity_sums)
        n = self.n_tokens_
        return totals["fidelity"] / nq - float(self.compute_cost) * totals["nnz"] / (nq * n)

    def _fidelity_sums(self, Qb, codes, state):
        """Per batch: the sum of output fidelities against the dense softmax and
        the number of selected tokens (see :meth:`score`)."""
        V, _ = self._decoder(Qb.device, Qb.dtype)
        n = state["n"]
        WV = topk_decode(codes.indices, codes.values, V)
        mrun = lrun = acc = None
        for s0, s1 in self._tiles(n):
            St = self._tile_scores(Qb, state, s0, s1)
            mt = St.amax(1)
            mnew = mt if mrun is None else torch.maximum(mrun, mt)
            P = torch.exp(St - mnew[:, None])
            if mrun is None:
                lrun = P.sum(1)
                acc = P @ V[s0:s1]
            else:
                f = torch.exp(mrun - mnew)
                lrun = lrun * f + P.sum(1)
                acc = acc * f[:, None] + P @ V[s0:s1]
            mrun = mnew
        AV = acc / lrun[:, None]
        den = torch.linalg.vector_norm(AV, dim=1)
        num = torch.linalg.vector_norm(WV - AV, dim=1)
        tiny = torch.finfo(AV.dtype).tiny
        rel = torch.where(den > tiny, num / den.clamp(min=tiny), num)
        return {"fidelity": (1 - rel).double().sum(), "nnz": (codes.values != 0).sum()}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags
