"""Dictionary learning with tens of thousands of atoms: :class:`CollapsedDictionaryLearner`.

One minibatch step:

1. **Route** -- each row keeps its ``s`` best atoms from a tiled scan of the
   dictionary with a running top-s merge (:func:`skdict.solvers.routing.route_topk`),
   or from the atoms of its nearest clusters of a coarse index
   (``routing="approximate"``).
2. **Code** -- batched ``s x s`` least squares on each row's active set
   (:func:`skdict.solvers.active_lstsq.active_lstsq`), optionally non-negative
   or with an L1 term.
3. **Decoder** -- sparse normal equations (:class:`skdict.updates.SparseStats`):
   ``B`` (K x P) via ``index_add``, the co-occurrence ``A`` as a pruned sparse
   matrix plus its diagonal, decayed as in online learning; touched atoms get a
   block-coordinate (MOD) refresh (a Jacobi step; for non-negative codes, whose
   co-occurrence matrix is not diagonally dominant, the majorised Gershgorin
   step, which always decreases the surrogate).
4. **Project** -- unit-norm atoms; atoms unused for a window of rows are
   resampled from high-residual rows.

No object of size ``(n_samples, n_components)`` or ``(n_components,
n_components)`` is formed: the largest are the ``(batch, tile_size)`` score
block, the ``(K, P)`` dictionary and ``B``, and the capped sparse ``A``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._backend import make_generator, torch_dtype
from .base import BaseSparseCoder, check_input, iter_batches, n_samples_of
from .solvers.active_lstsq import active_lstsq
from .solvers.decode import topk_decode
from .solvers.routing import ClusterIndex, route_approx, route_topk
from .updates import (
    SparseStats,
    dead_atoms,
    forgetting_factor,
    init_atoms,
    project_unit_norm,
    refresh_atoms,
    resample_dead_atoms,
    update_since_used,
)

__all__ = ["CollapsedDictionaryLearner"]


def _is_minibatch_stream(X):
    """Iterators / generators, and lists or tuples of 2-D blocks, are minibatch streams."""
    if isinstance(X, (np.ndarray, torch.Tensor)) or sp.issparse(X):
        return False
    if isinstance(X, Iterator):
        return True
    if isinstance(X, (list, tuple)) and len(X) > 0:
        first = X[0]
        return (
            isinstance(first, (np.ndarray, torch.Tensor)) or sp.issparse(first)
        ) and getattr(first, "ndim", 0) == 2
    if isinstance(X, Iterable) and not hasattr(X, "shape") and not isinstance(X, (str, bytes)):
        return not hasattr(X, "__len__") and not hasattr(X, "__array__")
    return False


class CollapsedDictionaryLearner(BaseSparseCoder):
    """Fixed-K sparse dictionary learning for very large dictionaries.

    Each row ``x`` is coded with exactly ``n_nonzero_coefs = s`` atoms: the ``s``
    atoms with the largest ``|<x, d_k>|`` (the *routing*), with coefficients
    from least squares on that active set (optionally non-negative, or with an
    L1 term ``alpha``). The dictionary is learned by minibatch alternating
    minimisation of the mean squared reconstruction error with sparse
    sufficient statistics. Memory and time never involve an ``(n_samples,
    n_components)`` or dense ``(n_components, n_components)`` object, so
    ``n_components`` of tens of thousands fits on a laptop.

    Parameters
    ----------
    n_components : int, default=1024
        Number of atoms ``K``.
    n_nonzero_coefs : int, default=16
        Atoms per row ``s`` (``1 <= s <= n_components``).
    n_candidates : int, default=None
        Atoms routed per row before pruning: the ``n_candidates`` best-scored
        atoms get a least-squares fit and the ``s`` with the largest
        coefficients (in absolute value; the largest for ``positive_code``)
        are kept and refitted. None means ``min(2 * s, K)``; ``s`` disables the
        pruning (plain top-s routing).
    tile_size : int, default=4096
        Atoms scored at a time by exact routing; the score block is
        ``(batch_size, tile_size)``.
    batch_size : int, default=1024
        Rows per minibatch in ``fit`` / ``partial_fit`` and per batch in
        ``transform``.
    max_iter : int, default=10
        Maximum number of epochs (passes over the data) in ``fit``.
    tol : float, default=1e-3
        ``fit`` stops when the epoch's mean squared error improves by less
        than ``tol`` relatively to the previous epoch. 0 runs ``max_iter`` epochs.
    positive_code : bool, default=False
        Non-negative codes (routing then uses ``<x, d_k>``, not its absolute value).
    alpha : float, default=0.0
        L1 weight on the active set's coefficients (0: least squares).
    routing : {"exact", "approximate"}, default="exact"
        ``"approximate"`` scores only the atoms of each row's ``n_probes``
        nearest clusters of a spherical k-means index over the atoms, rebuilt
        every ``index_refresh`` minibatches during ``fit`` and at its end.
    n_clusters : int, default=None
        Clusters of the approximate index; None means ``round(2 * sqrt(K))``.
    n_probes : int, default=8
        Clusters searched per row by approximate routing.
    index_refresh : int, default=20
        Minibatches between rebuilds of the approximate index during ``fit``.
    dead_atom_window : int, default=None
        An atom unused for more than this many rows is resampled from the rows
        with the largest residuals; None means ``ceil(20 * K / s)`` rows, 0
        disables resampling.
    max_cooc_nnz : int, default=None
        Cap on the stored off-diagonal co-occurrence entries (upper triangle);
        None means ``batch_size * s * (s - 1) / 2`` (so ``nnz <= batch_size * s**2``).
    shuffle : bool, default=True
        Visit minibatches (contiguous blocks of ``batch_size`` rows) in a random
        order each epoch; blocks of a memmap are still read contiguously.
    dict_init : array-like of shape (n_components, n_features), default=None
        Initial dictionary (normalised to unit-norm atoms). None draws atoms
        from random rows of the data (a random Gaussian atom where there are
        not enough rows).
    random_state : int, RandomState instance or None, default=None
    device : str or torch.device, default="auto"
    verbose : bool or int, default=False
        Show a progress bar over minibatches.
    sparse_output : bool, default=True
        ``transform`` returns CSR with at most ``s`` non-zeros per row.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Unit-norm atoms (float32: all heavy state of the fit is float32).
    n_iter_ : int
        Epochs run by the last ``fit`` (``partial_fit`` counts calls).
    n_steps_ : int
        Minibatch steps taken in total.
    loss_curve_ : ndarray
        Mean squared reconstruction error of each minibatch, measured with the
        dictionary before that minibatch's update.
    epoch_loss_ : ndarray
        Mean squared reconstruction error of each epoch (mean of its minibatches).
    n_resampled_ : int
        Dead atoms resampled so far.
    cluster_centers_, atom_clusters_ : ndarray
        The approximate-routing index (only with ``routing="approximate"``).
    n_features_in_ : int
    feature_names_in_ : ndarray

    Notes
    -----
    ``score`` is minus the mean squared reconstruction error, see :meth:`score`.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import CollapsedDictionaryLearner
    >>> X = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    >>> est = CollapsedDictionaryLearner(n_components=64, n_nonzero_coefs=4,
    ...                                  batch_size=64, max_iter=2, random_state=0,
    ...                                  device="cpu")
    >>> codes = est.fit_transform(X)
    >>> codes.shape, int(codes.getnnz(axis=1).max()) <= 4
    ((200, 64), True)
    """

    _parameter_constraints: dict = {
        **BaseSparseCoder._parameter_constraints,
        "n_components": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_nonzero_coefs": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_candidates": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "tile_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "positive_code": ["boolean"],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "routing": [StrOptions({"exact", "approximate"})],
        "n_clusters": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "n_probes": [Interval(numbers.Integral, 1, None, closed="left")],
        "index_refresh": [Interval(numbers.Integral, 1, None, closed="left")],
        "dead_atom_window": [Interval(numbers.Integral, 0, None, closed="left"), None],
        "max_cooc_nnz": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "shuffle": ["boolean"],
        "dict_init": ["array-like", torch.Tensor, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_components=1024,
        *,
        n_nonzero_coefs=16,
        n_candidates=None,
        tile_size=4096,
        batch_size=1024,
        max_iter=10,
        tol=1e-3,
        positive_code=False,
        alpha=0.0,
        routing="exact",
        n_clusters=None,
        n_probes=8,
        index_refresh=20,
        dead_atom_window=None,
        max_cooc_nnz=None,
        shuffle=True,
        dict_init=None,
        random_state=None,
        device="auto",
        verbose=False,
        sparse_output=True,
    ):
        self.n_components = n_components
        self.n_nonzero_coefs = n_nonzero_coefs
        self.n_candidates = n_candidates
        self.tile_size = tile_size
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.positive_code = positive_code
        self.alpha = alpha
        self.routing = routing
        self.n_clusters = n_clusters
        self.n_probes = n_probes
        self.index_refresh = index_refresh
        self.dead_atom_window = dead_atom_window
        self.max_cooc_nnz = max_cooc_nnz
        self.shuffle = shuffle
        self.dict_init = dict_init
        self.random_state = random_state
        self.device = device
        self.verbose = verbose
        self.sparse_output = sparse_output

    # ------------------------------------------------------------------ settings
    def _check_settings(self):
        if self.n_nonzero_coefs > self.n_components:
            raise ValueError(
                f"n_nonzero_coefs={self.n_nonzero_coefs} exceeds n_components="
                f"{self.n_components}; choose n_nonzero_coefs <= n_components."
            )

    def _n_codes(self):
        return self.components_.shape[0] if hasattr(self, "components_") else self.n_components

    def _batch_size_for(self, n_codes, dtype):
        return int(self.batch_size)

    def _window(self):
        if self.dead_atom_window is None:
            return int(math.ceil(20 * self.n_components / self.n_nonzero_coefs))
        return int(self.dead_atom_window)

    def _max_nnz(self):
        if self.max_cooc_nnz is not None:
            return int(self.max_cooc_nnz)
        s = self.n_nonzero_coefs
        return max(1, self.batch_size * s * (s - 1) // 2)

    def _n_clusters(self, K):
        if self.n_clusters is not None:
            return min(int(self.n_clusters), K)
        return max(1, min(K, int(round(2 * math.sqrt(K)))))

    # ------------------------------------------------------------------ coding
    def _n_candidates(self, K):
        s = self.n_nonzero_coefs
        m = 2 * s if self.n_candidates is None else max(int(self.n_candidates), s)
        return min(m, K)

    def _route(self, Xb, D, index, Dsorted=None):
        s = self._n_candidates(D.shape[0])
        if self.routing == "approximate" and index is not None:
            _, idx = route_approx(
                Xb, D, s, index, n_probes=self.n_probes, positive=self.positive_code,
                tile_size=self.tile_size, Dsorted=Dsorted,
            )
        else:
            _, idx = route_topk(Xb, D, s, tile_size=self.tile_size,
                                positive=self.positive_code)
        return idx

    def _code(self, Xb, D, index, Dsorted=None):
        idx = self._route(Xb, D, index, Dsorted)
        s = self.n_nonzero_coefs
        if idx.shape[1] > s:  # prune the candidates to the s largest LS coefficients
            v = active_lstsq(Xb, D, idx, positive=self.positive_code).codes
            key = v if self.positive_code else v.abs()
            idx = idx.gather(1, key.topk(s, dim=1).indices)
        vals = active_lstsq(
            Xb, D, idx, positive=self.positive_code, alpha=self.alpha
        ).codes
        return idx, vals

    def _transform_state(self, device, dtype):
        D = torch.as_tensor(np.asarray(self.components_), dtype=torch_dtype(dtype)).to(device)
        state = {"D": D, "index": None, "Dsorted": None}
        if self.routing == "approximate" and hasattr(self, "cluster_centers_"):
            index = _index_from_fitted(self, D)
            state["index"] = index
            state["Dsorted"] = D[index.order]
        return state

    def _encode(self, Xb, state):
        return self._code(Xb, state["D"], state["index"], state["Dsorted"])

    # ------------------------------------------------------------------ fitting
    def _iter_minibatches(self, X, device, generator, reset_first):
        """Yield validated float32 minibatch tensors (at most batch_size rows)."""
        bs = int(self.batch_size)
        if _is_minibatch_stream(X):
            first = True
            for block in X:
                Xb, _ = check_input(self, block, reset=reset_first and first)
                first = False
                for _, _, t in iter_batches(Xb, bs, device, np.float32):
                    yield t
            if first:
                raise ValueError("The iterable of minibatches passed to fit is empty.")
            return
        n = n_samples_of(X)
        starts = list(range(0, n, bs))
        if self.shuffle and len(starts) > 1:
            perm = torch.randperm(len(starts), generator=generator, device="cpu").tolist()
            starts = [starts[p] for p in perm]
        for start in starts:
            stop = min(n, start + bs)
            for _, _, t in iter_batches(X[start:stop], bs, device, np.float32):
                yield t

    def _init_dictionary(self, X, first_batch, generator_cpu, device):
        K = self.n_components
        if self.dict_init is not None:
            D0 = self.dict_init
            if isinstance(D0, torch.Tensor):
                D0 = D0.detach().cpu().numpy()
            D0 = np.asarray(D0, dtype=np.float32)
            if D0.shape != (K, self.n_features_in_):
                raise ValueError(
                    f"dict_init has shape {D0.shape}; expected (n_components, n_features)"
                    f" = {(K, self.n_features_in_)}."
                )
            if not np.all(np.isfinite(D0)):
                raise ValueError("dict_init contains NaN or infinity.")
            D = project_unit_norm(torch.from_numpy(D0.copy()).to(device), inplace=True)
        else:
            if X is not None:
                n = n_samples_of(X)
                m = min(n, K)
                rows = torch.randperm(n, generator=generator_cpu)[:m].sort().values.numpy()
                if sp.issparse(X):
                    sample = X[rows].toarray()
                elif isinstance(X, torch.Tensor):
                    sample = X[torch.from_numpy(rows).to(X.device)].detach().cpu().numpy()
                else:
                    sample = np.asarray(X[rows])
                sample = torch.from_numpy(np.asarray(sample, dtype=np.float32))
            else:
                m = min(first_batch.shape[0], K)
                perm = torch.randperm(first_batch.shape[0], generator=generator_cpu)[:m]
                sample = first_batch[perm.to(first_batch.device)]
            D = init_atoms(K, self.n_features_in_, rows=sample, generator=generator_cpu,
                           device=device, dtype=torch.float32)
        return D

    def _build_index(self, D, generator_cpu):
        return ClusterIndex(
            D, self._n_clusters(D.shape[0]), generator=generator_cpu,
            positive=self.positive_code,
        )

    def _step(self, Xb, D, stats, since_used, step, index, Dsorted, generator_cpu):
        """One minibatch step; returns the batch's mean squared error (before update)."""
        idx, vals = self._code(Xb, D, index, Dsorted)
        R = Xb - topk_decode(idx, vals, D)
        mse = float((R.double() ** 2).mean())
        stats.update(Xb, idx, vals, forgetting_factor(step, Xb.shape[0]))
        touched = torch.unique(idx[vals != 0])
        refresh_atoms(D, stats, touched,
                      preconditioner="gershgorin" if self.positive_code else "jacobi")
        used = torch.zeros(D.shape[0], dtype=torch.bool, device=D.device)
        used[touched] = True
        update_since_used(since_used, used, Xb.shape[0])
        dead = dead_atoms(since_used, self._window())
        resampled = resample_dead_atoms(D, dead, R, generator=generator_cpu, stats=stats,
                                        since_used=since_used)
        return mse, int(resampled.numel())

    def _run(self, X, *, state, n_epochs, first_call, verbose):
        """Shared loop of fit and partial_fit; returns the new state dict."""
        device = self._device()
        gen = make_generator(self.random_state, "cpu") if state is None else state["gen"]
        batches_iter = None
        D = stats = index = None
        if state is not None:
            D = torch.as_tensor(state["D"]).to(device=device, dtype=torch.float32).clone()
            stats = SparseStats.from_state_dict(state["stats"], device)
            since_used = torch.as_tensor(state["since_used"]).to(device).clone()
        epoch_losses, losses = [], []
        n_resampled = 0 if state is None else state["n_resampled"]
        n_steps = 0 if state is None else state["n_steps"]
        prev = None
        is_stream = _is_minibatch_stream(X)
        if is_stream and isinstance(X, Iterator):
            n_epochs = 1  # a one-shot iterator can be read once
        bar = None
        if verbose:
            from tqdm.auto import tqdm

            bar = tqdm(desc=type(self).__name__, unit="batch")
        n_done = 0
        for epoch in range(n_epochs):
            batches_iter = self._iter_minibatches(X, device, gen, first_call and epoch == 0)
            ep = []
            for Xb in batches_iter:
                if D is None:
                    self._check_settings()
                    D = self._init_dictionary(None if is_stream else X, Xb, gen, device)
                    stats = SparseStats(
                        self.n_components, D.shape[1], max_nnz=self._max_nnz(), device=device
                    )
                    since_used = torch.zeros(self.n_components, dtype=torch.long,
                                             device=device)
                if self.routing == "approximate" and (
                    index is None or n_steps % self.index_refresh == 0
                ):
                    index = self._build_index(D, gen)
                Dsorted = D[index.order] if index is not None else None
                mse, nr = self._step(Xb, D, stats, since_used, n_steps, index, Dsorted, gen)
                if not math.isfinite(mse):
                    raise ValueError(
                        "The reconstruction error became non-finite; check the scale "
                        "of X (values too large for float32?)."
                    )
                n_resampled += nr
                n_steps += 1
                ep.append(mse)
                losses.append(mse)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(mse=f"{mse:.4g}")
            n_done += 1
            cur = float(np.mean(ep)) if ep else float("nan")
            epoch_losses.append(cur)
            if prev is not None and self.tol > 0 and prev - cur < self.tol * abs(prev):
                break
            prev = cur
        if bar is not None:
            bar.close()
        if D is None:
            raise ValueError("No rows were given to fit.")
        return {
            "D": D, "stats": stats, "since_used": since_used, "gen": gen, "losses": losses,
            "epoch_losses": epoch_losses, "n_resampled": n_resampled,
            "n_steps": n_steps, "epochs": n_done,
        }

    def _commit(self, run, *, append):
        D = run["D"]
        if self.routing == "approximate":
            index = self._build_index(D, run["gen"])
            self.cluster_centers_ = index.centroids.cpu().numpy()
            self.atom_clusters_ = index.labels.cpu().numpy()
        else:
            for attr in ("cluster_centers_", "atom_clusters_"):
                if hasattr(self, attr):
                    delattr(self, attr)
        self.components_ = D.cpu().numpy()
        self.n_components_ = D.shape[0]
        self.n_steps_ = run["n_steps"]
        self.n_resampled_ = run["n_resampled"]
        losses = np.asarray(run["losses"], dtype=np.float64)
        epochs = np.asarray(run["epoch_losses"], dtype=np.float64)
        if append and hasattr(self, "loss_curve_"):
            self.loss_curve_ = np.concatenate([self.loss_curve_, losses])
            self.epoch_loss_ = np.concatenate([self.epoch_loss_, epochs])
        else:
            self.loss_curve_ = losses
            self.epoch_loss_ = epochs
        self._learner_state = {
            "D": self.components_, "stats": run["stats"].state_dict(),
            "since_used": run["since_used"].cpu().numpy(),
            "gen_state": run["gen"].get_state(),
            "n_resampled": run["n_resampled"], "n_steps": run["n_steps"],
        }

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the dictionary from ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix, np.memmap, torch.Tensor} of shape \
(n_samples, n_features), or an iterable of such minibatches
            Arrays (including memory maps larger than memory) are streamed
            ``batch_size`` rows at a time. A list / re-iterable of minibatches is
            read once per epoch; a one-shot iterator (e.g. a generator) gives a
            single epoch.
        y : Ignored

        Returns
        -------
        self
        """
        self._check_settings()
        self._device()
        if not _is_minibatch_stream(X):
            X, _ = check_input(self, X, reset=True)
        run = self._run(X, state=None, n_epochs=self.max_iter, first_call=True,
                        verbose=self.verbose)
        self._commit(run, append=False)
        self.n_iter_ = run["epochs"]
        return self

    def partial_fit(self, X, y=None):
        """One pass over ``X`` (in minibatches), continuing from the current state.

        A failure leaves the previously fitted state untouched.

        Parameters
        ----------
        X : array-like, sparse matrix, torch.Tensor or iterable of minibatches
        y : Ignored

        Returns
        -------
        self
        """
        first = not hasattr(self, "_learner_state")
        if first:
            self._validate_params()
        self._check_settings()
        self._device()
        if not _is_minibatch_stream(X):
            X, _ = check_input(self, X, reset=first)
        state = None if first else self._learner_state
        if state is not None:
            gen = torch.Generator(device="cpu")
            gen.set_state(state["gen_state"])
            state = dict(state, gen=gen)
            if state["D"].shape[0] != self.n_components:
                raise ValueError(
                    f"n_components changed from {state['D'].shape[0]} to "
                    f"{self.n_components} between partial_fit calls; call fit instead."
                )
        run = self._run(X, state=state, n_epochs=1, first_call=first, verbose=self.verbose)
        self._commit(run, append=not first)
        self.n_iter_ = getattr(self, "n_iter_", 0) + 1 if not first else 1
        return self

    # ------------------------------------------------------------------ scoring
    def score(self, X, y=None):
        """Minus the mean squared reconstruction error.

        ``-mean((X - inverse_transform(transform(X)))**2)`` over all entries
        of ``X``, computed batch by batch from the fixed-width codes (no dense
        codes). Higher is better.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        X, dtype = check_input(self, X, reset=False)
        device = self._device()
        state = self._transform_state(device, dtype)
        sse = 0.0
        for _, _, Xb in iter_batches(X, self.batch_size, device, dtype):
            idx, vals = self._encode(Xb, state)
            R = Xb - topk_decode(idx, vals, state["D"])
            sse += float((R.double() ** 2).sum())
        return -sse / (n_samples_of(X) * X.shape[1])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


def _index_from_fitted(est, D):
    cent = torch.as_tensor(est.cluster_centers_).to(D)
    index = ClusterIndex.__new__(ClusterIndex)
    index.positive = est.positive_code
    index.centroids = cent
    index.set_labels(torch.as_tensor(est.atom_clusters_).to(D.device, torch.long),
                     cent.shape[0])
    return index
