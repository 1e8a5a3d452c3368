"""Dictionary learning with Locally Competitive Algorithm inference."""

from __future__ import annotations

import numbers

import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions

from ._backend import torch_dtype
from ._validation import SHUFFLE_CONSTRAINT, check_n_nonzero_coefs
from .base import BaseSparseCoder
from .functional import BlockEncoder
from .solvers.registry import get_solver, solver_names
from .training.estimator import TrainedEstimatorMixin
from .training.lca import LCALearner, LCAState

__all__ = ["LCASparseCoder"]

# max_iter="auto": whole passes until fit has seen this many rows (2000 minibatches
# of 256), between 1 and AUTO_MAX_PASSES passes. The dictionary's quality follows
# the rows trained on, not the passes: a fixed 10 passes stopped 3.7% above SPAMS'
# held-out objective on 16k rows of 8x8 patches (issue 18) and trained on 1M rows
# given 100k. At 512k rows (11 passes over 50k rows, benchmarks.fit seeds 0-2) the
# held-out objective was 0.004-0.13% below SPAMS trainDL's after 3000 iterations.
AUTO_ROWS = 512_000
AUTO_MAX_PASSES = 100


class LCASparseCoder(TrainedEstimatorMixin, BaseSparseCoder):
    """Sparse coding with a learned dictionary, by exact lasso or LCA inference.

    ``fit`` alternates, over minibatches, inference of the codes (by default the
    exact lasso codes of the homotopy solver; ``fit_algorithm="lca"`` runs the
    Locally Competitive Algorithm of Rozell et al. 2008) with a dictionary
    update: the online block-coordinate update of Mairal et al. (2010) on the
    sufficient statistics ``A = sum a^T a``,
    ``B = sum a^T x`` (``dict_update="online"``, default), or the Hebbian
    gradient step of Olshausen & Field (1996) (``dict_update="sgd"``). Atoms are
    kept at unit norm and atoms unused for ``dead_window`` rows are
    re-initialised from badly reconstructed rows.

    With the soft threshold the codes solve, per row::

        argmin_a  0.5 * ||x - a @ components_||^2 + alpha * ||a||_1

    Parameters
    ----------
    n_components : int, default=None
        Number of atoms; None means ``n_features`` (a complete dictionary).
    alpha : float, default=1.0
        Threshold of the LCA (the L1 weight for ``threshold="soft"``; for
        ``"hard"`` the L0 penalty ``alpha**2 / 2`` per non-zero).
    tau : float, default=None
        LCA time constant in units of the step; None uses the largest eigenvalue
        of the Gram matrix, the fastest stable value.
    max_iter : int or "auto", default="auto"
        Passes over the data in ``fit`` (ignored when ``n_steps`` is set).
        ``"auto"`` makes as many whole passes as it takes to train on about
        512,000 rows (2000 minibatches of 256), at least 1 and at most 100: 11
        passes over 50,000 rows, 32 over 16,000, one over more than 512,000 rows
        (a stream of unknown length is counted as it is read). That is where the
        held-out objective on natural image patches has settled (within 0.1% of
        SPAMS' 3000-iteration dictionary in ``benchmarks/fit.py``), so small
        training sets are not under-trained and large ones not over-trained.
    n_steps : int, default=None
        Minibatches of ``fit`` (cycling over the data); None runs ``max_iter``
        epochs.
    fit_max_iter : int, default=100
        Iterations of ``fit_algorithm`` per minibatch during ``fit`` (when it is
        iterative).
    tol : float, default=0.0
        ``fit`` stops when the epoch mean objective improves by less than
        ``tol`` relatively to the previous epoch (as for
        :class:`CollapsedDictionaryLearner`); 0 runs ``max_iter`` epochs.
    inference_tol : float, default=1e-5
        Stopping tolerance of the iterative inference (relative duality gap for
        the soft threshold, relative change of the potentials for the hard one),
        in fit and transform.
    threshold : {"soft", "hard"}, default="soft"
    positive_code : bool, default=False
        Non-negative codes (rectified LCA).
    fit_algorithm : {"auto", "lca", "exact", "fista", "ista"}, default="auto"
        Inference used on each minibatch during ``fit`` / ``partial_fit``.
        ``"exact"`` (soft threshold only) gives the exact lasso codes with the
        homotopy / active-set solver, which on natural images is much faster
        than running LCA to convergence and gives a better dictionary per
        minibatch (see ``benchmarks/fit.py``). ``"auto"`` is ``"exact"`` for
        ``threshold="soft"`` and ``"lca"`` for ``"hard"`` (the only algorithm for
        L0-type codes).
    transform_algorithm : {"auto", "lca", "exact", "fista", "ista", "omp"}, default="auto"
        Encoder used by ``transform`` and ``score``; ``"auto"`` as for
        ``fit_algorithm`` (exact lasso codes for the soft threshold).
    transform_max_iter : int, default=1000
        Iterations of the iterative transform algorithms.
    transform_n_nonzero_coefs : int, default=None
        Atoms per row for ``transform_algorithm="omp"``.
    dict_init : array-like of shape (n_components, n_features), default=None
        Initial dictionary (rows are normalised). None draws atoms from the data.
    dict_update : {"online", "sgd"}, default="online"
        Dictionary update rule (see above).
    learning_rate : float, default=0.1
        Step size of ``dict_update="sgd"``.
    batch_size : int, default=256
        Minibatch size for learning and transform.
    forget_window : int or None, default=10000
        ``dict_update="online"`` only: the most rows the sufficient statistics
        remember (:func:`skdict.updates.forgetting_factor`). None follows Mairal
        et al. (2010): the memory grows without bound (``b**2 + t`` rows after
        ``t`` minibatches of ``b``), so codes computed with early dictionaries
        linger. A cap forgets them at a steady rate ``b / (forget_window + 1)``
        per minibatch, which converges much faster on natural image patches
        (``benchmarks/fit.py``).
    dead_window : int, default=10000
        Atoms with no non-zero code over the last ``dead_window`` rows are
        re-initialised; 0 disables resampling.
    shuffle : bool or "blocks", default=True
        Batch order of every pass (``fit`` and ``partial_fit``): True draws a
        permutation of the rows, ``"blocks"`` visits contiguous blocks of
        ``batch_size`` rows in random order (contiguous reads of a memory map),
        False keeps the row order. The same seed gives the same batches for every
        kind of input array.
    random_state : int, RandomState or None, default=None
    device : str or torch.device, default="auto"
    callbacks : list of callable, default=None
        Called after every minibatch with ``{"step", "epoch", "loss", "n_iter"}``;
        returning ``False`` stops training.
    verbose : bool or int, default=False
        Show a progress bar over minibatches.
    sparse_output : bool, default=True
        ``transform`` returns scipy CSR (dense ndarray if False).

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Unit-norm atoms.
    n_iter_ : int
        Epochs run by the last ``fit`` (``partial_fit`` adds 1 per call); with
        ``max_iter="auto"``, the passes the row budget asked for.
    n_steps_ : int
        Minibatches processed, over all ``fit`` / ``partial_fit`` calls.
    history_ : dict of str to ndarray
        One entry per minibatch: ``"loss"`` (mean objective of the minibatch
        codes, before that minibatch's dictionary update) and ``"n_iter"``
        (inference iterations).
    loss_curve_ : ndarray
        Mean ``history_["loss"]`` of each epoch (``fit``) or call (``partial_fit``).
    n_resampled_ : int
        Atoms re-initialised so far.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of ``X`` when it had string column names (a DataFrame).

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import LCASparseCoder
    >>> X = np.random.default_rng(0).standard_normal((200, 16))
    >>> lca = LCASparseCoder(n_components=32, alpha=0.5, max_iter=2,
    ...                      random_state=0, device="cpu").fit(X)
    >>> lca.components_.shape
    (32, 16)
    >>> lca.transform(X[:5]).shape
    (5, 32)
    """

    _parameter_constraints: dict = {
        **BaseSparseCoder._parameter_constraints,
        "n_components": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "tau": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "n_steps": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "fit_max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "inference_tol": [Interval(numbers.Real, 0, None, closed="left")],
        "threshold": [StrOptions({"soft", "hard"})],
        "positive_code": ["boolean"],
        "fit_algorithm": [StrOptions(set(solver_names(problem="lasso")) | {"auto"})],
        "transform_algorithm": [StrOptions(set(solver_names()) | {"auto"})],
        "transform_max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "transform_n_nonzero_coefs": [
            Interval(numbers.Integral, 1, None, closed="left"),
            None,
        ],
        "dict_init": ["array-like", torch.Tensor, None],
        "dict_update": [StrOptions({"online", "sgd"})],
        "learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
        "forget_window": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "dead_window": [Interval(numbers.Integral, 0, None, closed="left")],
        "shuffle": SHUFFLE_CONSTRAINT,
        "random_state": ["random_state"],
        "callbacks": [list, None],
        "verbose": ["verbose"],
    }
    _parameter_constraints["batch_size"] = [Interval(numbers.Integral, 1, None, closed="left")]

    def __init__(
        self,
        n_components=None,
        *,
        alpha=1.0,
        tau=None,
        max_iter="auto",
        n_steps=None,
        fit_max_iter=100,
        tol=0.0,
        inference_tol=1e-5,
        threshold="soft",
        positive_code=False,
        fit_algorithm="auto",
        transform_algorithm="auto",
        transform_max_iter=1000,
        transform_n_nonzero_coefs=None,
        dict_init=None,
        dict_update="online",
        learning_rate=0.1,
        batch_size=256,
        forget_window=10000,
        dead_window=10000,
        shuffle=True,
        random_state=None,
        device="auto",
        callbacks=None,
        verbose=False,
        sparse_output=True,
    ):
        self.n_components = n_components
        self.alpha = alpha
        self.tau = tau
        self.max_iter = max_iter
        self.n_steps = n_steps
        self.fit_max_iter = fit_max_iter
        self.tol = tol
        self.inference_tol = inference_tol
        self.threshold = threshold
        self.positive_code = positive_code
        self.fit_algorithm = fit_algorithm
        self.transform_algorithm = transform_algorithm
        self.transform_max_iter = transform_max_iter
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.dict_init = dict_init
        self.dict_update = dict_update
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.forget_window = forget_window
        self.dead_window = dead_window
        self.shuffle = shuffle
        self.random_state = random_state
        self.device = device
        self.callbacks = callbacks
        self.verbose = verbose
        self.sparse_output = sparse_output

    def _resolved(self, algorithm):
        """``"auto"``: exact lasso codes for the soft threshold, LCA for the hard one."""
        if algorithm != "auto":
            return algorithm
        return "lca" if self.threshold == "hard" else "exact"

    @property
    def _fit_algorithm(self):
        return self._resolved(self.fit_algorithm)

    @property
    def _transform_algorithm(self):
        return self._resolved(self.transform_algorithm)

    def _check_params(self):
        """Cross-parameter checks (ValueError saying what to change)."""
        K = self.components_.shape[0] if hasattr(self, "components_") else self.n_components
        if K is not None and get_solver(self._transform_algorithm).problem == "l0":
            check_n_nonzero_coefs(self.transform_n_nonzero_coefs, K,
                                  "transform_n_nonzero_coefs")
        if self.threshold == "hard" and self._transform_algorithm not in ("lca", "omp"):
            raise ValueError(
                "threshold='hard' codes are L0-type and only transform_algorithm='lca' "
                f"or 'omp' can reproduce them; got {self.transform_algorithm!r}."
            )
        if self.threshold == "hard" and self._fit_algorithm != "lca":
            raise ValueError(
                "threshold='hard' is only supported by fit_algorithm='lca'; got "
                f"{self.fit_algorithm!r}."
            )

    # ------------------------------------------------------------------ training
    _epoch_tol_param = "tol"

    def _pass_budget(self):
        if self.max_iter == "auto":
            return AUTO_MAX_PASSES, AUTO_ROWS
        return self.max_iter, None

    def _train_dtype(self, first):
        return None if first else self.components_.dtype

    def _make_learner(self, source, device, first):
        if first:
            K = self.n_components if self.n_components is not None else source.n_features
        else:
            K = self.components_.shape[0]
        if get_solver(self._transform_algorithm).problem == "l0":
            check_n_nonzero_coefs(self.transform_n_nonzero_coefs, K,
                                  "transform_n_nonzero_coefs")
        return LCALearner(self, K, device, source.dtype)

    def _resume_state(self, learner, device):
        return LCAState.from_state_dict(self._train_state, device=device,
                                        dtype=torch_dtype(learner.dtype))

    def _commit_state(self, state, learner):
        self.components_ = state.D.detach().cpu().numpy()
        self.n_resampled_ = state.n_resampled
        self._train_state = state.state_dict()

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the dictionary from ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features), \
or an iterable of such minibatches
        y : Ignored

        Returns
        -------
        self
        """
        return self._train(X, first=True, single_pass=False)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Update the dictionary with one pass over ``X`` in minibatches (shuffled
        as in ``fit`` when ``shuffle`` is set; a stream is read in its order).

        On failure (invalid input, a non-finite batch) the previous fitted state
        is left unchanged.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features), \
or an iterable of such minibatches
        y : Ignored

        Returns
        -------
        self
        """
        return self._train(X, first=not hasattr(self, "_train_state"), single_pass=True)

    # ------------------------------------------------------------------ transform
    def _transform_state(self, device, dtype):
        return BlockEncoder(
            self.components_, self._transform_algorithm, device=device, dtype=dtype,
            alpha=self.alpha, n_nonzero_coefs=self.transform_n_nonzero_coefs,
            positive=self.positive_code, max_iter=self.transform_max_iter,
            tol=self.inference_tol, tau=self.tau, threshold=self.threshold,
            param_names={"max_iter": "transform_max_iter", "tol": "inference_tol"},
        )

    def _encode(self, Xb, encoder):
        return encoder.codes(Xb)
