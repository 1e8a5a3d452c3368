"""Hierarchical sparse predictive coding: :class:`HierarchicalSparseCoder`."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions

from ._backend import torch_dtype
from ._validation import SHUFFLE_CONSTRAINT
from .base import BaseSparseCoder, lasso_information_criterion
from .data.codes import CSRBuilder
from .operators import DenseOperator
from .solvers.hierarchical import (
    free_energy_terms,
    generate,
    hierarchical_lipschitz,
    prediction_errors,
)
from .training.estimator import TrainedEstimatorMixin
from .training.hierarchical import HierarchicalLearner, HierarchicalState

__all__ = ["HierarchicalSparseCoder", "hierarchical_information_criterion"]


def hierarchical_information_criterion(n, sizes, rss, nnz, energy):
    """Per-sample extended BIC of a hierarchy of lasso codes (lower is better).

    Level ``l`` is read as one lasso regression per row of its target
    ``a_{l-1}`` (``K_{l-1}`` observations) on ``K_l`` candidate atoms, with
    ``nnz_l`` degrees of freedom in total, and contributes

        K_{l-1} * log(rss_l / s_l) + (log K_{l-1} + 2 log K_l) * nnz_l / n

    where ``rss_l`` is the total squared prediction error of the level. For the
    first level ``s_1 = n * K_0``: exactly
    :func:`skdict.base.lasso_information_criterion` (``"ebic"``). Above it,
    ``s_l = ||a_{l-1}||^2`` summed over the rows: the error counts relative to
    the energy of the codes it predicts (the log of the fraction of their
    energy left unexplained), so that shrinking the level below is not mistaken
    for a better fit; a level whose target is all zero adds nothing.

    Parameters
    ----------
    n : int
        Rows.
    sizes : sequence of int
        ``(K_0, K_1, ..., K_L)``: ``n_features`` then the level sizes.
    rss, nnz, energy : sequences of L floats
        Per level: squared prediction error, non-zero codes, and the squared
        norm of the target (``energy[0]`` is not used).

    Returns
    -------
    float
    """
    total = 0.0
    for i, (r, z) in enumerate(zip(rss, nnz, strict=True)):
        p, k = int(sizes[i]), int(sizes[i + 1])
        if i == 0:
            total += lasso_information_criterion((n, p), z, r, k, "ebic")
            continue
        e = float(energy[i])
        if e <= 0:
            continue
        # lasso_information_criterion's p * log(rss / (n p)) is p * log(rss / e) here
        total += lasso_information_criterion((n, p), z, max(r, 1e-300 * e) * n * p / e, k,
                                             "ebic")
    return total


def _check_per_level(value, n_levels, name, *, positive=True):
    """A scalar broadcast to every level, or one value per level."""
    if np.ndim(value) == 0:
        vals = [float(value)] * n_levels
    else:
        vals = [float(v) for v in np.asarray(value, dtype=np.float64).ravel()]
        if np.ndim(value) != 1 or len(vals) != n_levels:
            raise ValueError(
                f"{name} must be a scalar or have one value per level ({n_levels}, the "
                f"length of n_components); got {np.asarray(value).shape} values."
            )
    for v in vals:
        if not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"{name} must be finite and > 0 at every level, got {vals}.")
    return vals


class HierarchicalSparseCoder(TrainedEstimatorMixin, BaseSparseCoder):
    """Hierarchical sparse predictive coding with joint inference of all levels.

    Levels ``l = 1..L`` have unit-norm dictionaries ``D_l`` of shape
    ``(K_l, K_{l-1})`` (``K_0 = n_features``) and codes ``a_l``; each level
    predicts the one below, ``a_{l-1} ~ a_l D_l`` (``a_0 = x``). The codes of a
    row minimise the free energy::

        F = sum_l 0.5 / sigma_l**2 * ||a_{l-1} - a_l D_l||^2 + alpha_l * ||a_l||_1

    the negative log joint density of a Gaussian prediction error per level and
    a Laplace prior on the codes (sparse coding as predictive coding, Rao &
    Ballard 1999). With one level and ``sigma=1`` it is the lasso objective of
    :class:`SparseCoder`. Each code is pulled by its own prediction error
    (bottom-up) and by the error of the level above (top-down).

    ``inference="joint"`` minimises ``F`` over all levels at once: monotone
    FISTA on the stacked codes (the L1 prox is separable), started from the
    bottom-up codes, stopped on the relative duality gap ``inference_tol``;
    ``F`` never increases along the iterations and is never above the
    bottom-up value. ``inference="bottom_up"`` is the greedy baseline: each
    level's exact lasso code of the level below, ignoring the top-down term.

    ``fit`` alternates, over minibatches, inference of every level with a
    dictionary update per level on its target ``a_{l-1}``: the online
    block-coordinate update of Mairal et al. (2010) on per-level statistics
    (``dict_update="online"``) or the Hebbian step (``"sgd"``), unit-norm
    atoms, and re-initialisation of atoms unused for ``dead_window`` rows from
    the worst-predicted rows of their level.

    Parameters
    ----------
    n_components : int or sequence of int, default=None
        Atoms per level, bottom first: ``(K_1, ..., K_L)``; an int is one level.
        None means two levels, ``(n_features, max(1, n_features // 2))``.
    alpha : float or sequence of float, default=1.0
        L1 weight of each level's codes (> 0); a scalar is used at every level.
    sigma : float or sequence of float, default=1.0
        Standard deviation of each level's prediction error (> 0); the
        precisions ``1 / sigma**2`` weight the levels' errors in ``F``. With
        ``learn_sigma=True`` these are the initial values.
    learn_sigma : bool, default=False
        Learn the precisions during ``fit``: each becomes the inverse of the
        mean squared prediction error per unit of its level (its maximum
        likelihood value), averaged over minibatches with the forgetting of the
        dictionary statistics, and floored at 1% of the mean square of the
        level's target (with learned variances the joint MAP estimate is
        degenerate: a level predicted exactly would get an infinite precision
        and collapse onto its prediction).
    inference : {"joint", "bottom_up"}, default="joint"
        Inference rule in ``fit``, ``transform`` and every other method.
    positive_code : bool, default=False
        Non-negative codes at every level.
    max_iter : int, default=10
        Passes over the data in ``fit`` (ignored when ``n_steps`` is set).
    n_steps : int, default=None
        Minibatches of ``fit`` (cycling over the data); None runs ``max_iter``
        epochs.
    fit_max_iter : int, default=100
        Iterations of joint inference per minibatch during ``fit`` (from the
        bottom-up codes; the dictionaries need no more precise codes).
    transform_max_iter : int, default=1000
        Iterations of joint inference in ``transform`` and the other methods.
    tol : float, default=0.0
        ``fit`` stops when the epoch mean free energy improves by less than
        ``tol`` relatively to the previous epoch; 0 runs ``max_iter`` epochs.
    inference_tol : float, default=1e-4
        Relative duality gap of ``F`` at which joint inference stops, per row. The
        gap bounds the relative excess free energy; in practice (digits, natural
        patches) 1e-4 leaves the codes within 1e-4 of the optimum, relatively,
        with the same supports, and ``F`` within 1e-8.
    dict_update : {"online", "sgd"}, default="online"
    learning_rate : float, default=0.1
        Step size of ``dict_update="sgd"``.
    batch_size : int, default=256
        Minibatch size for learning and the other methods.
    forget_window : int or None, default=10000
        The most rows the online statistics remember (see
        :class:`LCASparseCoder`).
    dead_window : int, default=10000
        Atoms with no non-zero code over the last ``dead_window`` rows are
        re-initialised; 0 disables resampling.
    shuffle : bool or "blocks", default=True
        Batch order of every pass (see :class:`LCASparseCoder`).
    random_state : int, RandomState or None, default=None
    device : str or torch.device, default="auto"
    callbacks : list of callable, default=None
        Called after every minibatch with ``{"step", "epoch", "loss", "n_iter",
        "free_energy_1", ...}``; returning ``False`` stops training.
    verbose : bool or int, default=False
    sparse_output : bool, default=True
        ``transform`` and ``transform_levels`` return scipy CSR (dense if False).

    Attributes
    ----------
    components_ : list of ndarray
        The dictionaries, bottom first: ``components_[l]`` has shape
        ``(K_{l+1}, K_l)`` with unit-norm rows.
    n_components_ : tuple of int
        ``(K_1, ..., K_L)``.
    sigma_ : ndarray of shape (n_levels,)
        Standard deviation of each level's prediction error (the fixed
        ``sigma``, or the learned values).
    free_energy_curve_ : ndarray of shape (n_epochs, n_levels)
        Mean free energy term of each level per epoch (``fit``) or call
        (``partial_fit``), evaluated on the minibatch codes before each
        dictionary update; the rows sum to ``loss_curve_``.
    n_iter_ : int
        Epochs run by the last ``fit`` (``partial_fit`` adds 1 per call).
    n_steps_ : int
        Minibatches processed, over all ``fit`` / ``partial_fit`` calls.
    history_ : dict of str to ndarray
        One entry per minibatch: ``"loss"`` (mean free energy), ``"n_iter"``
        (inference iterations) and ``"free_energy_l"`` for each level ``l``.
    loss_curve_ : ndarray
        Mean ``history_["loss"]`` of each epoch (``fit``) or call.
    n_resampled_ : ndarray of shape (n_levels,)
        Atoms re-initialised so far, per level.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of ``X`` when it had string column names (a DataFrame).

    See Also
    --------
    skdict.nn.HierarchicalSparseCoding : the same model as a torch module.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import HierarchicalSparseCoder
    >>> X = np.random.default_rng(0).standard_normal((200, 16))
    >>> hsc = HierarchicalSparseCoder(n_components=(24, 8), alpha=(0.5, 0.2),
    ...                               max_iter=2, random_state=0, device="cpu").fit(X)
    >>> [D.shape for D in hsc.components_]
    [(24, 16), (8, 24)]
    >>> hsc.transform(X[:5]).shape
    (5, 8)
    >>> [c.shape for c in hsc.transform_levels(X[:5])]
    [(5, 24), (5, 8)]
    >>> hsc.free_energy(X[:5], per_level=True).shape
    (5, 2)
    """

    _parameter_constraints: dict = {
        **BaseSparseCoder._parameter_constraints,
        "n_components": [Interval(numbers.Integral, 1, None, closed="left"), "array-like",
                         None],
        "alpha": [Interval(numbers.Real, 0, None, closed="neither"), "array-like"],
        "sigma": [Interval(numbers.Real, 0, None, closed="neither"), "array-like"],
        "learn_sigma": ["boolean"],
        "inference": [StrOptions({"joint", "bottom_up"})],
        "positive_code": ["boolean"],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_steps": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "fit_max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "transform_max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "inference_tol": [Interval(numbers.Real, 0, None, closed="left")],
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
        sigma=1.0,
        learn_sigma=False,
        inference="joint",
        positive_code=False,
        max_iter=10,
        n_steps=None,
        fit_max_iter=100,
        transform_max_iter=1000,
        tol=0.0,
        inference_tol=1e-4,
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
        self.sigma = sigma
        self.learn_sigma = learn_sigma
        self.inference = inference
        self.positive_code = positive_code
        self.max_iter = max_iter
        self.n_steps = n_steps
        self.fit_max_iter = fit_max_iter
        self.transform_max_iter = transform_max_iter
        self.tol = tol
        self.inference_tol = inference_tol
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

    # ------------------------------------------------------------------ parameters
    def _sizes(self, n_features):
        """``(K_1, ..., K_L)`` from ``n_components`` (ValueError saying what to fix)."""
        nc = self.n_components
        if nc is None:
            return (int(n_features), max(1, int(n_features) // 2))
        if isinstance(nc, numbers.Integral):
            return (int(nc),)
        sizes = list(np.asarray(nc, dtype=object).ravel()) if np.ndim(nc) else [nc]
        if len(sizes) == 0:
            raise ValueError(
                "n_components is empty; give the number of atoms of each level, bottom "
                "first, e.g. n_components=(64, 16)."
            )
        for k in sizes:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise ValueError(
                    f"n_components must hold integers >= 1 (atoms per level), got {nc!r}; "
                    "every level needs at least one atom."
                )
        return tuple(int(k) for k in sizes)

    def _check_params(self, n_features=None):
        if n_features is None:
            n_features = getattr(self, "n_features_in_", 1)
        sizes = self._sizes(n_features)
        L = len(sizes)
        alpha = _check_per_level(self.alpha, L, "alpha")
        sigma = _check_per_level(self.sigma, L, "sigma")
        return sizes, alpha, sigma

    # ------------------------------------------------------------------ training
    _epoch_tol_param = "tol"

    def _train_dtype(self, first):
        return None if first else self.components_[0].dtype

    def _make_learner(self, source, device, first):
        sizes, alpha, sigma = self._check_params(source.n_features)
        return HierarchicalLearner(self, sizes, alpha, sigma, device, source.dtype)

    def _check_resumable(self):
        fitted = tuple(D.shape[0] for D in self.components_)
        wanted = self._sizes(self.n_features_in_)
        if self.n_components is not None and wanted != fitted:
            raise ValueError(
                f"n_components changed from {fitted!r} to {self.n_components!r} since the "
                f"model was fitted; partial_fit continues that model: set "
                f"n_components={fitted!r} back, or call fit to train a new one."
            )

    def _resume_state(self, learner, device):
        return HierarchicalState.from_state_dict(self._train_state, device=device,
                                                 dtype=torch_dtype(learner.dtype))

    def _commit_state(self, state, learner):
        self.components_ = [D.detach().cpu().numpy() for D in state.D]
        self.n_components_ = tuple(int(D.shape[0]) for D in state.D)
        self.n_resampled_ = np.asarray(state.n_resampled, dtype=np.int64)
        if self.learn_sigma:
            self.sigma_ = np.sqrt(np.asarray(state.mse, dtype=np.float64))
        else:
            self.sigma_ = np.asarray(learner.sigma, dtype=np.float64)
        self.free_energy_curve_ = np.asarray(state.level_curve, dtype=np.float64).reshape(
            -1, len(state.D))
        self._train_state = state.state_dict()

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the dictionaries of every level from ``X``.

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
        """Update the dictionaries with one pass over ``X`` in minibatches.

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

    # ------------------------------------------------------------------ inference
    def _n_codes(self):
        return self.components_[-1].shape[0]

    def _precisions(self):
        return [1.0 / float(s) ** 2 for s in self.sigma_]

    def _transform_state(self, device, dtype):
        alpha = _check_per_level(self.alpha, len(self.n_components_), "alpha")
        tdtype = torch_dtype(dtype)
        dicts = [torch.as_tensor(D).to(device=device, dtype=tdtype) for D in self.components_]
        precisions = self._precisions()
        learner = HierarchicalLearner(self, self.n_components_, alpha, self.sigma_, device,
                                      dtype)
        return {"dicts": dicts, "alpha": alpha, "precisions": precisions, "learner": learner,
                "ops": [DenseOperator(D) for D in dicts],
                "lipschitz": (hierarchical_lipschitz(dicts, precisions)
                              if self.inference == "joint" else None)}

    def _infer(self, Xb, state):
        learner = state["learner"]
        if self.inference == "bottom_up":
            return learner.infer(Xb, state["dicts"], state["precisions"], max_iter=1,
                                 ops=state["ops"]).codes
        return learner.infer(Xb, state["dicts"], state["precisions"],
                             max_iter=self.transform_max_iter, ops=state["ops"],
                             lipschitz=state["lipschitz"]).codes

    def _encode(self, Xb, state):
        codes = self._infer(Xb, state)
        state["levels"] = codes  # read by the per-level reductions below
        return codes[-1]

    def _decoder(self, device, dtype):
        dicts = [torch.as_tensor(D).to(device=device, dtype=torch_dtype(dtype))
                 for D in self.components_]
        return generate(dicts[-1], dicts[:-1]), None

    def _collect(self, X, fn):
        """Run ``fn(Xb, levels, state) -> {name: [tensor]}`` over the batches of
        ``X`` (the one reduce loop) and concatenate each name's tensors."""
        def batch(Xb, codes, state):
            return fn(Xb, state["levels"], state)

        totals, _, _ = self._reduce(X, fn=batch)
        return {k: torch.cat(v).cpu().numpy() if isinstance(v[0], torch.Tensor)
                else [torch.cat(parts).cpu().numpy() for parts in zip(*v, strict=True)]
                for k, v in totals.items()}

    def transform_levels(self, X):
        """Codes of every level.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)

        Returns
        -------
        codes : list of CSR matrices (or ndarrays if ``sparse_output=False``)
            ``codes[l]`` has shape ``(n_samples, n_components_[l])``.
        """
        self._check_ready()
        if not self.sparse_output:
            return self._collect(X, lambda Xb, levels, st: {"codes": [levels]})["codes"]
        builders = []

        def add(Xb, levels, state):
            if not builders:
                builders.extend(CSRBuilder(a.shape[1], a.dtype) for a in levels)
            for b, a in zip(builders, levels, strict=True):
                b.add_dense(a)
            return {}

        self._collect(X, add)
        return [b.build() for b in builders]

    def predict_levels(self, X):
        """Each level's top-down prediction of the level below, from the inferred codes.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)

        Returns
        -------
        predictions : list of ndarray
            ``predictions[l] = a_{l+1} @ components_[l]``, of shape
            ``(n_samples, K_l)`` (``K_0 = n_features``: the reconstruction of ``X``).
        """
        self._check_ready()

        def fn(Xb, levels, state):
            return {"pred": [[a @ D for a, D in zip(levels, state["dicts"], strict=True)]]}

        return self._collect(X, fn)["pred"]

    def prediction_errors(self, X):
        """Prediction error of every level, ``a_{l-1} - a_l @ D_l`` (``a_0 = X``).

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)

        Returns
        -------
        errors : list of ndarray
            ``errors[l]`` has shape ``(n_samples, K_l)``, ``K_0 = n_features``.
        """
        self._check_ready()

        def fn(Xb, levels, state):
            return {"err": [prediction_errors(Xb, levels, state["dicts"])]}

        return self._collect(X, fn)["err"]

    def free_energy(self, X, *, per_level=False):
        """Free energy of each row at its inferred codes.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)
        per_level : bool, default=False
            Return each level's term (its weighted squared prediction error plus
            its L1 penalty) instead of their sum.

        Returns
        -------
        F : ndarray of shape (n_samples,) or (n_samples, n_levels)
        """
        self._check_ready()

        def fn(Xb, levels, state):
            terms = free_energy_terms(Xb, levels, state["dicts"], state["alpha"],
                                      state["precisions"])
            return {"F": [terms]}

        F = self._collect(X, fn)["F"]
        return F if per_level else F.sum(1)

    def score(self, X, y=None):
        """Minus the extended BIC of the codes of all levels, per sample.

        Each level is read as one lasso regression per row of its target (the
        data for level 1, the codes of the level below otherwise) on its atoms,
        with degrees of freedom its number of non-zeros; see
        :func:`skdict.hierarchical.hierarchical_information_criterion`. With one
        level this is exactly the score of the lasso coders
        (:meth:`skdict.base.BaseSparseCoder.score`). Higher is better. Unlike the
        free energy, which always prefers the smallest ``alpha``, this trades
        the prediction error of every level against its number of active atoms,
        so ``GridSearchCV(est, {"alpha": grid})`` without ``y`` picks a sparsity
        supported by the data.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        score : float
        """
        self._check_ready()

        def fn(Xb, codes, state):
            levels = state["levels"]
            errs = prediction_errors(Xb, levels, state["dicts"])
            targets = [Xb, *levels[:-1]]
            return {"rss": torch.stack([(e.double() ** 2).sum() for e in errs]),
                    "nnz": torch.stack([(a != 0).sum() for a in levels]).double(),
                    "energy": torch.stack([(t.double() ** 2).sum() for t in targets])}

        sums, n, p = self._reduce(X, fn=fn)
        ic = hierarchical_information_criterion(n, (p, *self.n_components_), sums["rss"],
                                                sums["nnz"], sums["energy"])
        return -float(ic)
