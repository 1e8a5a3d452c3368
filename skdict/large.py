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
4. **Project** -- unit-norm atoms; atoms unused for ``dead_window`` rows are
   resampled from high-residual rows (:mod:`skdict.updates.atoms`).

Training runs through :class:`skdict.training.Trainer`; the step is
:class:`skdict.training.collapsed.CollapsedLearner`.

No object of size ``(n_samples, n_components)`` or ``(n_components,
n_components)`` is formed: the largest are the ``(batch, tile_size)`` score
block, the ``(K, P)`` dictionary and ``B``, and the capped sparse ``A``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions

from ._backend import torch_dtype
from ._validation import SHUFFLE_CONSTRAINT
from .base import BaseSparseCoder
from .data.codes import Codes
from .solvers.active_lstsq import active_gram, active_lstsq
from .solvers.routing import ClusterIndex, faiss_available, route_approx, route_topk
from .training.collapsed import CollapsedLearner, CollapsedState, Routing
from .training.estimator import TrainedEstimatorMixin

__all__ = ["CollapsedDictionaryLearner"]


class CollapsedDictionaryLearner(TrainedEstimatorMixin, BaseSparseCoder):
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
    n_steps : int, default=None
        Minibatches of ``fit`` (cycling over the data); None runs up to
        ``max_iter`` epochs.
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
        every ``index_refresh`` minibatches during ``fit`` and at its end. On
        CPU with ``faiss`` installed (``pip install skdict[faiss]``) the index
        is searched by a FAISS inverted file.
    n_clusters : int, default=None
        Clusters of the approximate index; None means ``round(2 * sqrt(K))``.
    n_probes : int, default=8
        Clusters searched per row by approximate routing.
    index_refresh : int, default=20
        Minibatches between rebuilds of the approximate index during ``fit``.
    dead_window : int, default=None
        An atom unused over the last ``dead_window`` rows is resampled from
        badly reconstructed rows; None means ``ceil(20 * K / s)`` rows, 0
        disables resampling.
    max_cooc_nnz : int, default=None
        Cap on the stored off-diagonal co-occurrence entries (upper triangle);
        None means ``min(4 * batch_size * s, batch_size * s * (s - 1) / 2)``:
        the largest co-occurrences of about four minibatches' worth of code
        entries. Keeping more (up to all of one minibatch's pairs) costs time
        in the statistics and the atom refresh and did not lower the held-out
        error (MiniLM activations, 8,192 atoms, s = 16 and 32).
    shuffle : bool or "blocks", default="blocks"
        Batch order of every pass: ``"blocks"`` visits contiguous blocks of
        ``batch_size`` rows in random order, rows permuted within each block
        (a memory map is read contiguously, which the workloads this estimator
        is for need), True draws a permutation of all rows, False keeps the row
        order.
    dict_init : array-like of shape (n_components, n_features), default=None
        Initial dictionary (normalised to unit-norm atoms). None draws atoms
        from random rows of the data (a random Gaussian atom where there are
        not enough rows).
    random_state : int, RandomState instance or None, default=None
    device : str or torch.device, default="auto"
    callbacks : list of callable, default=None
        Called after every minibatch with ``{"step", "epoch", "loss"}``;
        returning ``False`` stops training.
    verbose : bool or int, default=False
        Show a progress bar over minibatches.
    sparse_output : bool, default=True
        ``transform`` returns CSR with at most ``s`` non-zeros per row.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Unit-norm atoms (float32: all heavy state of the fit is float32).
    n_iter_ : int
        Epochs run by the last ``fit`` (``partial_fit`` adds 1 per call).
    n_steps_ : int
        Minibatch steps taken in total.
    history_ : dict of str to ndarray
        ``"loss"``: the mean squared reconstruction error of each minibatch,
        measured with the dictionary before that minibatch's update.
    loss_curve_ : ndarray
        Mean squared reconstruction error of each epoch (mean of its
        minibatches; ``partial_fit`` adds one per call).
    n_resampled_ : int
        Dead atoms resampled so far.
    cluster_centers_, atom_clusters_ : ndarray
        The approximate-routing index (only with ``routing="approximate"``).
    n_components_ : int
        Number of atoms of the fitted model.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of ``X`` when it had string column names (a DataFrame).

    Notes
    -----
    ``score`` is minus the mean squared reconstruction error,
    ``-mean((X - inverse_transform(transform(X)))**2)`` over all entries of ``X``
    (higher is better), computed batch by batch from the fixed-width codes.

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
        "n_steps": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "positive_code": ["boolean"],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "routing": [StrOptions({"exact", "approximate"})],
        "n_clusters": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "n_probes": [Interval(numbers.Integral, 1, None, closed="left")],
        "index_refresh": [Interval(numbers.Integral, 1, None, closed="left")],
        "dead_window": [Interval(numbers.Integral, 0, None, closed="left"), None],
        "max_cooc_nnz": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "shuffle": SHUFFLE_CONSTRAINT,
        "dict_init": ["array-like", torch.Tensor, None],
        "random_state": ["random_state"],
        "callbacks": [list, None],
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
        n_steps=None,
        tol=1e-3,
        positive_code=False,
        alpha=0.0,
        routing="exact",
        n_clusters=None,
        n_probes=8,
        index_refresh=20,
        dead_window=None,
        max_cooc_nnz=None,
        shuffle="blocks",
        dict_init=None,
        random_state=None,
        device="auto",
        callbacks=None,
        verbose=False,
        sparse_output=True,
    ):
        self.n_components = n_components
        self.n_nonzero_coefs = n_nonzero_coefs
        self.n_candidates = n_candidates
        self.tile_size = tile_size
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.n_steps = n_steps
        self.tol = tol
        self.positive_code = positive_code
        self.alpha = alpha
        self.routing = routing
        self.n_clusters = n_clusters
        self.n_probes = n_probes
        self.index_refresh = index_refresh
        self.dead_window = dead_window
        self.max_cooc_nnz = max_cooc_nnz
        self.shuffle = shuffle
        self.dict_init = dict_init
        self.random_state = random_state
        self.device = device
        self.callbacks = callbacks
        self.verbose = verbose
        self.sparse_output = sparse_output

    # ------------------------------------------------------------------ settings
    def _check_params(self):
        """Cross-parameter checks (ValueError saying what to change)."""
        if self.n_nonzero_coefs > self.n_components:
            raise ValueError(
                f"n_nonzero_coefs={self.n_nonzero_coefs} exceeds n_components="
                f"{self.n_components}; choose n_nonzero_coefs <= n_components."
            )
        if self.n_candidates is not None and self.n_candidates < self.n_nonzero_coefs:
            raise ValueError(
                f"n_candidates={self.n_candidates} is below n_nonzero_coefs="
                f"{self.n_nonzero_coefs}: each row needs at least its {self.n_nonzero_coefs} "
                "atoms as candidates; use n_candidates >= n_nonzero_coefs (equal disables "
                "the pruning)."
            )

    def _n_codes(self):
        return self.components_.shape[0]  # AttributeError before fit: no output features yet

    def _batch_size_for(self, n_codes, dtype):
        return int(self.batch_size)

    def _window(self):
        if self.dead_window is None:
            return int(math.ceil(20 * self.n_components / self.n_nonzero_coefs))
        return int(self.dead_window)

    def _max_nnz(self):
        if self.max_cooc_nnz is not None:
            return int(self.max_cooc_nnz)
        s = self.n_nonzero_coefs
        return max(1, min(4 * self.batch_size * s, self.batch_size * s * (s - 1) // 2))

    def _n_clusters(self, K):
        if self.n_clusters is not None:
            return min(int(self.n_clusters), K)
        return max(1, min(K, int(round(2 * math.sqrt(K)))))

    # ------------------------------------------------------------------ coding
    def _n_candidates(self, K):
        s = self.n_nonzero_coefs
        m = 2 * s if self.n_candidates is None else int(self.n_candidates)
        return min(m, K)

    def _route(self, Xb, routing):
        D = routing.D
        s = self._n_candidates(D.shape[0])
        if self.routing == "approximate" and routing.index is not None:
            _, idx = route_approx(
                Xb, D, s, routing.index, n_probes=self.n_probes, positive=self.positive_code,
                tile_size=self.tile_size, Dsorted=routing.Dsorted,
            )
        else:
            _, idx = route_topk(Xb, D, s, tile_size=self.tile_size,
                                positive=self.positive_code)
        return idx

    def _code(self, Xb, routing):
        """``(indices, values)`` of the fixed-width codes of ``Xb``."""
        D = routing.D
        idx = self._route(Xb, routing)
        s = self.n_nonzero_coefs
        G = c = None
        if idx.shape[1] > s:  # prune the candidates to the s largest LS coefficients
            G, c = active_gram(Xb, D, idx)
            v = active_lstsq(Xb, D, idx, positive=self.positive_code, G=G, c=c).codes
            key = v if self.positive_code else v.abs()
            pos = key.topk(s, dim=1).indices
            idx = idx.gather(1, pos)
            # the kept atoms' Gram is a sub-block of the candidates'
            m = G.shape[1]
            G = G.gather(1, pos[:, :, None].expand(-1, s, m)).gather(
                2, pos[:, None, :].expand(-1, s, s))
            c = c.gather(1, pos)
        vals = active_lstsq(
            Xb, D, idx, positive=self.positive_code, alpha=self.alpha, G=G, c=c
        ).codes
        return idx, vals

    def _transform_state(self, device, dtype):
        D = torch.as_tensor(np.asarray(self.components_), dtype=torch_dtype(dtype)).to(device)
        if self.routing == "approximate" and hasattr(self, "cluster_centers_"):
            index = _index_from_fitted(self, D)
            return Routing(D, index, D[index.order])
        return Routing(D, None, None)

    def _encode(self, Xb, routing):
        idx, vals = self._code(Xb, routing)
        return Codes(indices=idx, values=vals)

    def _build_index(self, D, generator):
        index = ClusterIndex(
            D, self._n_clusters(D.shape[0]), generator=generator,
            positive=self.positive_code,
        )
        return _with_faiss(index, D)

    # ------------------------------------------------------------------ fitting
    # ------------------------------------------------------------------ training
    _epoch_tol_param = "tol"

    def _train_dtype(self, first):
        return np.float32  # all heavy state of the fit is float32

    def _make_learner(self, source, device, first):
        return CollapsedLearner(self, device)

    def _resume_state(self, learner, device):
        return CollapsedState.from_state_dict(self._train_state, device=device,
                                              dtype=torch.float32)

    def _commit_state(self, state, learner):
        if self.routing == "approximate":
            index = self._build_index(state.D, state.generator)
            self.cluster_centers_ = index.centroids.cpu().numpy()
            self.atom_clusters_ = index.labels.cpu().numpy()
        else:
            for attr in ("cluster_centers_", "atom_clusters_"):
                if hasattr(self, attr):
                    delattr(self, attr)
        self.components_ = state.D.cpu().numpy()
        self.n_components_ = state.D.shape[0]
        self.n_resampled_ = state.n_resampled
        self._train_state = state.state_dict()

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
        return self._train(X, first=True, single_pass=False)

    @_fit_context(prefer_skip_nested_validation=True)
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
        return self._train(X, first=not hasattr(self, "_train_state"), single_pass=True)

    # ------------------------------------------------------------------ scoring
    def _score_from(self, sums, n, p):
        """Minus the mean squared reconstruction error over all entries."""
        return -sums["rss"] / (n * p)

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
        return super().score(X, y)

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
    return _with_faiss(index, D)


def _with_faiss(index, D):
    """Search ``index`` with FAISS on CPU when it is installed (the torch path
    scans one cluster at a time; FAISS's inverted file does it in compiled code)."""
    if D.device.type == "cpu" and faiss_available():
        index.attach_faiss(D)
    return index
