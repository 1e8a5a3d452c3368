"""Convolutional sparse coding of whole images and signals:
:class:`ConvSparseCoder` (fixed filters) and :class:`ConvDictionaryLearning`."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._backend import torch_dtype
from ._validation import SHUFFLE_CONSTRAINT
from .base import BaseSparseCoder, _dense_block
from .data.sources import as_source
from .functional import encode_block
from .operators.conv import as_conv_filters, conv_operator
from .solvers.cbpdn import cbpdn
from .solvers.registry import solver_names
from .training.conv import ConvLearner, ConvState
from .training.estimator import TrainedEstimatorMixin

__all__ = ["ConvSparseCoder", "ConvDictionaryLearning"]

_ALGORITHMS = StrOptions(set(solver_names(problem="lasso", requires="operator")))
_SHAPE = [tuple, list, None]
# working set of the solvers, in copies of one image's codes (iterates, dual,
# DFTs and temporaries); the default batch keeps it near _BATCH_BYTES
_COPIES = 12
_BATCH_BYTES = 512 * 2**20


def _tol_for(algorithm, tol, *, residual, gap):
    """``tol`` or, when None, the algorithm's default: the scaled ADMM residuals
    (:func:`skdict.solvers.cbpdn.cbpdn`) or the relative duality gap."""
    if tol is not None:
        return float(tol)
    return residual if algorithm == "admm" else gap


def _filters_array(filters, name="filters"):
    if isinstance(filters, torch.Tensor):
        filters = filters.detach().cpu().numpy()
    arr = np.asarray(filters)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(arr.dtype if arr.dtype in (np.float32, np.float64) else np.float64)
    if arr.ndim < 2 or arr.size == 0:
        raise ValueError(
            f"{name} must have shape (n_filters, k), (n_filters, kh, kw) or "
            f"(n_filters, C, kh, kw); got {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contain NaN or infinity.")
    return arr


class _ConvCodingMixin:
    """What both convolutional estimators share: the image layout, the operator,
    codes in (filter, row, col) order, decoding and the score."""

    def _image_shape(self, n_features=None):
        """``image_shape`` as a tuple, checked against the row length."""
        n = self.n_features_in_ if n_features is None else int(n_features)
        shape = (n,) if self.image_shape is None else tuple(int(s) for s in self.image_shape)
        if any(s < 1 for s in shape) or len(shape) not in (1, 2, 3):
            raise ValueError(
                f"image_shape must be (T,), (H, W) or (C, H, W) with positive sizes, got "
                f"{self.image_shape!r}."
            )
        if math.prod(shape) != n:
            raise ValueError(
                f"rows of X have {n} values but image_shape={shape} needs "
                f"{math.prod(shape)}; each row must be one image flattened in C order."
            )
        return shape

    def _map_shape(self):
        f4, img = as_conv_filters(np.asarray(self.components_), self._image_shape())
        if self.boundary == "circular":
            return tuple(img[1:])
        return (img[1] + f4.shape[2] - 1, img[2] + f4.shape[3] - 1)

    def _n_codes(self):
        return self.components_.shape[0] * math.prod(self._map_shape())

    def _operator(self, device, dtype):
        return conv_operator(self.components_, self._image_shape(), self.boundary,
                             device=device, dtype=dtype)

    def _batch_size_for(self, n_codes, dtype):
        if self.batch_size is not None:
            return int(self.batch_size)
        per_image = _COPIES * n_codes * np.dtype(dtype).itemsize
        return max(1, _BATCH_BYTES // per_image)

    def _transform_state(self, device, dtype):
        return self._operator(device, dtype)

    def _encode(self, Xb, op):
        algorithm = self._coding_algorithm()
        tol = _tol_for(algorithm, self._coding_tol(), residual=1e-3, gap=1e-4)
        if algorithm == "admm" and op.boundary == "circular":
            return cbpdn(op, Xb, self.alpha, positive=self.positive_code,
                         max_iter=self.transform_max_iter, tol=tol).codes
        return encode_block(Xb, op, algorithm=algorithm, alpha=self.alpha,
                            positive=self.positive_code, max_iter=self.transform_max_iter,
                            tol=tol).codes

    def _decoder(self, device, dtype):
        raise TypeError("a convolutional dictionary decodes through its operator")

    def inverse_transform(self, X):
        """Images from codes: ``sum_m d_m * z_m`` for each row.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_codes)
            Codes, typically the output of :meth:`transform`: ``n_filters`` maps
            of ``map_shape_`` per row, in (filter, row, col) order.

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features)
            Images flattened in C order.
        """
        self._check_ready()
        X, dtype = self._check_codes(X)
        op = self._operator(self._device(), dtype)
        n = X.shape[0]
        out = np.empty((n, op.n_features), dtype=dtype)
        bs = self._batch_size_for(op.n_atoms, dtype)
        for start in range(0, n, bs):
            stop = min(n, start + bs)
            if hasattr(X, "toarray"):
                A = torch.from_numpy(X[start:stop].toarray().astype(dtype, copy=False))
                A = A.to(op.device)
            else:
                A = _dense_block(X, start, stop, op.device, torch_dtype(dtype))
            out[start:stop] = op.forward(A).cpu().numpy()
        return out

    def score(self, X, y=None):
        """Minus the extended BIC of the codes per image (as
        :meth:`SparseCoder.score`, with ``n_features`` pixels and ``n_codes``
        candidate coefficients per image).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        score : float
        """
        self._check_ready()
        n_codes = self._n_codes()

        def sums(Xb, codes, op):
            R = Xb - op.forward(codes.to_dense(n_codes))
            return {"rss": (R.double() ** 2).sum(), "nnz": codes.nnz()}

        totals, n, p = self._reduce(X, fn=sums)
        return float(self._score_from(totals, n, p))

    def _objective(self, X):
        """Mean per-image objective of the codes of ``X`` (tests, benchmarks)."""
        n_codes = self._n_codes()

        def sums(Xb, codes, op):
            A = codes.to_dense(n_codes)
            R = Xb - op.forward(A)
            return {"obj": 0.5 * (R.double() ** 2).sum() + self.alpha * A.double().abs().sum()}

        totals, n, _ = self._reduce(X, fn=sums)
        return totals["obj"] / n


class ConvSparseCoder(_ConvCodingMixin, BaseSparseCoder):
    """Convolutional sparse coding of images (or signals) with fixed filters.

    Each row ``x`` of ``X`` is one image, flattened in C order, of shape
    ``image_shape``; its codes are ``n_filters`` maps ``z_m`` solving::

        argmin_z  0.5 * ||sum_m d_m * z_m - x||^2 + alpha * sum_m ||z_m||_1

    with ``*`` a 2-D (or 1-D) convolution (sporco's ``ConvBPDN``). Multi-channel
    filters ``(n_filters, C, kh, kw)`` share their maps across the channels.

    Parameters
    ----------
    filters : array-like or torch.Tensor
        ``(n_filters, k)`` for 1-D signals, ``(n_filters, kh, kw)`` for images,
        ``(n_filters, C, kh, kw)`` for ``C``-channel images. They need not have
        unit norm.
    alpha : float, default=1.0
        L1 weight (>= 0), sporco's ``lmbda``.
    image_shape : tuple, default=None
        ``(T,)``, ``(H, W)`` or ``(C, H, W)``; None means 1-D signals of the
        rows' length.
    algorithm : {"admm", "fista", "ista", "lca"}, default="admm"
        ``"admm"``: ADMM in the DFT domain with the per-frequency
        Sherman-Morrison solve, over-relaxation and residual balancing
        (Wohlberg 2016). ``"fista"``: FFT convolutions with the step from the
        operator's spectral norm. Both stop on ``tol``.
    boundary : {"circular", "zero"}, default="circular"
        ``"circular"``: periodic convolution, maps of the image's size.
        ``"zero"``: linear convolution without wrap-around; each map is
        ``(H + kh - 1, W + kw - 1)`` (the image is the ``"valid"`` part of
        ``sum_m d_m * z_m``, so structure at the edges has codes of its own).
    positive_code : bool, default=False
        Non-negative codes.
    transform_max_iter : int, default=500
        Iteration cap of the solver.
    tol : float, default=None
        Stopping tolerance per image. ``algorithm="admm"`` with the circular
        boundary: both scaled ADMM residuals (Wohlberg's relative stopping rule,
        checked every 10 iterations) below ``tol``; None means 1e-3, which
        on sporco's 8x8x64 dictionary and natural images leaves the objective
        within ~1e-4 of the optimum (``benchmarks/conv.py``). Other algorithms
        (and the zero boundary): the relative duality gap of the codes is
        below ``tol`` (the objective is within ``tol`` of the optimum); None
        means 1e-4.
    device : str or torch.device, default="auto"
    sparse_output : bool, default=True
        ``transform`` returns scipy CSR (dense ndarray if False).
    batch_size : int, default=None
        Images coded at a time; None keeps the solver's working set near 512 MB.

    Attributes
    ----------
    components_ : ndarray
        The filters, shaped as given.
    image_shape_ : tuple
        The image shape in use.
    map_shape_ : tuple
        Shape of one code map (``image_shape_``'s spatial size for the circular
        boundary).
    n_features_in_ : int
        Values per row (``prod(image_shape_)``).
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of ``X`` when it had string column names.

    See Also
    --------
    ConvDictionaryLearning : learns the filters.
    SparseCoder : patch-based (non-convolutional) coding.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import ConvSparseCoder
    >>> rng = np.random.default_rng(0)
    >>> filters = rng.standard_normal((4, 3, 3))
    >>> X = rng.standard_normal((2, 16 * 16))
    >>> coder = ConvSparseCoder(filters, alpha=0.5, image_shape=(16, 16), device="cpu")
    >>> codes = coder.fit_transform(X)
    >>> codes.shape  # 4 maps of 16 x 16 per image
    (2, 1024)
    >>> coder.inverse_transform(codes).shape
    (2, 256)
    """

    _parameter_constraints: dict = {
        **BaseSparseCoder._parameter_constraints,
        "filters": ["array-like", torch.Tensor],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "image_shape": _SHAPE,
        "algorithm": [_ALGORITHMS],
        "boundary": [StrOptions({"circular", "zero"})],
        "positive_code": ["boolean"],
        "transform_max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left"), None],
    }

    def __init__(self, filters, *, alpha=1.0, image_shape=None, algorithm="admm",
                 boundary="circular", positive_code=False, transform_max_iter=500, tol=None,
                 device="auto", sparse_output=True, batch_size=None):
        self.filters = filters
        self.alpha = alpha
        self.image_shape = image_shape
        self.algorithm = algorithm
        self.boundary = boundary
        self.positive_code = positive_code
        self.transform_max_iter = transform_max_iter
        self.tol = tol
        self.device = device
        self.sparse_output = sparse_output
        self.batch_size = batch_size

    def _coding_algorithm(self):
        return self.algorithm

    def _coding_tol(self):
        return self.tol

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Validate ``X`` against the filters and ``image_shape``; nothing is learned.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Images, one per row.
        y : Ignored

        Returns
        -------
        self
        """
        filters = _filters_array(self.filters)
        self._device()
        src = as_source(X, estimator=self, reset=True, allow_stream=False)
        shape = self._image_shape(src.n_features)
        as_conv_filters(filters, shape)
        self.components_ = filters
        self.image_shape_ = shape
        self.map_shape_ = tuple(self._map_shape())
        return self


class ConvDictionaryLearning(_ConvCodingMixin, TrainedEstimatorMixin, BaseSparseCoder):
    """Learn convolutional filters from whole images (online, in the DFT domain).

    The filters ``d_m`` (unit norm, ``filter_shape`` taps) minimise the mean over
    the images of::

        0.5 * ||sum_m d_m * z_m - x||^2 + alpha * sum_m ||z_m||_1

    ``fit`` alternates, over minibatches of images, convolutional sparse coding
    of the minibatch (``fit_algorithm``, ADMM by default) with the online
    filter update of Liu et al. (2018) on frequency-domain statistics
    (:mod:`skdict.updates.conv`): a few projected-gradient steps on the
    surrogate of all the past minibatches, decayed by the forgetting schedule
    of :class:`LCASparseCoder`. Filters unused for ``dead_window`` images are
    re-drawn from badly reconstructed patches.

    Parameters
    ----------
    n_filters : int, default=32
    filter_shape : tuple, default=(8, 8)
        ``(k,)`` for 1-D signals, ``(kh, kw)`` for images (each channel of a
        ``(C, H, W)`` image gets its own taps).
    alpha : float, default=1.0
        L1 weight (>= 0).
    image_shape : tuple, default=None
        ``(T,)``, ``(H, W)`` or ``(C, H, W)``; None means 1-D signals of the
        rows' length.
    boundary : {"circular", "zero"}, default="circular"
        See :class:`ConvSparseCoder`. With ``"zero"`` the filter statistics are
        those of the images zero-padded to the map grid.
    max_iter : int, default=10
        Passes over the images in ``fit`` (ignored when ``n_steps`` is set).
    n_steps : int, default=None
        Minibatches of ``fit``; None runs ``max_iter`` epochs.
    tol : float, default=0.0
        ``fit`` stops when the epoch mean objective improves by less than
        ``tol`` relatively; 0 runs ``max_iter`` epochs.
    batch_size : int, default=4
        Images per minibatch (and per ``transform`` batch).
    fit_algorithm : {"admm", "fista", "ista", "lca"}, default="admm"
        Coding of each minibatch during ``fit``.
    fit_max_iter : int, default=20
        Iteration cap of ``fit_algorithm`` per minibatch (warm-started ADMM
        continues where the image's last visit stopped).
    inference_tol : float, default=None
        Where the coding of a minibatch stops in ``fit``: the scaled ADMM
        residuals (``fit_algorithm="admm"``, circular boundary) or the relative
        duality gap; None means 1e-3. With ADMM on the circular boundary each
        training image's codes, dual and penalty are kept between visits (up to
        256 MB of them) and warm-start its next coding.
    transform_algorithm : {"admm", "fista", "ista", "lca"}, default="admm"
    transform_max_iter : int, default=500
    transform_tol : float, default=None
        Where ``transform`` stops, as ``tol`` of :class:`ConvSparseCoder`
        (None: 1e-3 on the scaled ADMM residuals, else a 1e-4 duality gap).
    dict_update_iter : int, default=40
        Projected-gradient (FISTA) steps of the filter update per minibatch.
        The defaults (20, 40) reached sporco's held-out objective in the
        fewest epochs and least time of the settings tried on the benchmark
        (``benchmarks/conv.py``, 32 8x8 filters: (50, 10) took 30 epochs, (20, 40)
        9, (10, 40) 10, (20, 20) 15); at (20, 40) in 0.48x sporco's time.
    positive_code : bool, default=False
    dict_init : array-like, default=None
        Initial filters, shaped like ``components_``; None draws random image
        patches (zero-mean, unit norm).
    forget_window : int or None, default=16
        Images the statistics remember (:func:`skdict.updates.forgetting_factor`).
    dead_window : int, default=64
        Filters with no non-zero code over the last ``dead_window`` images are
        re-drawn; 0 disables resampling.
    shuffle : bool or "blocks", default=True
    random_state : int, RandomState or None, default=None
    device : str or torch.device, default="auto"
    callbacks : list of callable, default=None
        Called after every minibatch with ``{"step", "epoch", "loss", "n_iter"}``;
        returning ``False`` stops training.
    verbose : bool or int, default=False
    sparse_output : bool, default=True

    Attributes
    ----------
    components_ : ndarray
        Unit-norm filters: ``(n_filters, k)``, ``(n_filters, kh, kw)`` or
        ``(n_filters, C, kh, kw)``.
    image_shape_ : tuple
    map_shape_ : tuple
    n_iter_ : int
        Epochs run by the last ``fit`` (``partial_fit`` adds 1 per call).
    n_steps_ : int
        Minibatches processed over all calls.
    history_ : dict of str to ndarray
        Per minibatch: ``"loss"`` (mean objective of its codes before the
        update) and ``"n_iter"`` (coding iterations).
    loss_curve_ : ndarray
        Mean loss per epoch (``fit``) or call (``partial_fit``).
    n_resampled_ : int
        Filters re-drawn so far.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of ``X`` when it had string column names.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import ConvDictionaryLearning
    >>> X = np.random.default_rng(0).standard_normal((8, 24 * 24))
    >>> cdl = ConvDictionaryLearning(6, (5, 5), alpha=0.5, image_shape=(24, 24),
    ...                              max_iter=2, random_state=0, device="cpu").fit(X)
    >>> cdl.components_.shape
    (6, 5, 5)
    >>> cdl.transform(X[:2]).shape
    (2, 3456)
    """

    _parameter_constraints: dict = {
        **BaseSparseCoder._parameter_constraints,
        "n_filters": [Interval(numbers.Integral, 1, None, closed="left")],
        "filter_shape": [tuple, list],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "image_shape": _SHAPE,
        "boundary": [StrOptions({"circular", "zero"})],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_steps": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "fit_algorithm": [_ALGORITHMS],
        "fit_max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "inference_tol": [Interval(numbers.Real, 0, None, closed="left"), None],
        "transform_algorithm": [_ALGORITHMS],
        "transform_max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "transform_tol": [Interval(numbers.Real, 0, None, closed="left"), None],
        "dict_update_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "positive_code": ["boolean"],
        "dict_init": ["array-like", torch.Tensor, None],
        "forget_window": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "dead_window": [Interval(numbers.Integral, 0, None, closed="left")],
        "shuffle": SHUFFLE_CONSTRAINT,
        "random_state": ["random_state"],
        "callbacks": [list, None],
        "verbose": ["verbose"],
    }
    _parameter_constraints["batch_size"] = [Interval(numbers.Integral, 1, None, closed="left")]

    def __init__(self, n_filters=32, filter_shape=(8, 8), *, alpha=1.0, image_shape=None,
                 boundary="circular", max_iter=10, n_steps=None, tol=0.0, batch_size=4,
                 fit_algorithm="admm", fit_max_iter=20, inference_tol=None,
                 transform_algorithm="admm", transform_max_iter=500, transform_tol=None,
                 dict_update_iter=40, positive_code=False, dict_init=None, forget_window=16,
                 dead_window=64, shuffle=True, random_state=None, device="auto",
                 callbacks=None, verbose=False, sparse_output=True):
        self.n_filters = n_filters
        self.filter_shape = filter_shape
        self.alpha = alpha
        self.image_shape = image_shape
        self.boundary = boundary
        self.max_iter = max_iter
        self.n_steps = n_steps
        self.tol = tol
        self.batch_size = batch_size
        self.fit_algorithm = fit_algorithm
        self.fit_max_iter = fit_max_iter
        self.inference_tol = inference_tol
        self.transform_algorithm = transform_algorithm
        self.transform_max_iter = transform_max_iter
        self.transform_tol = transform_tol
        self.dict_update_iter = dict_update_iter
        self.positive_code = positive_code
        self.dict_init = dict_init
        self.forget_window = forget_window
        self.dead_window = dead_window
        self.shuffle = shuffle
        self.random_state = random_state
        self.device = device
        self.callbacks = callbacks
        self.verbose = verbose
        self.sparse_output = sparse_output

    _epoch_tol_param = "tol"
    _resume_params = ("n_filters", "filter_shape", "image_shape", "boundary")

    def _coding_algorithm(self):
        return self.transform_algorithm

    def _coding_tol(self):
        return self.transform_tol

    def _fit_tol(self):
        return _tol_for(self.fit_algorithm, self.inference_tol, residual=1e-3, gap=1e-3)

    def _check_params(self):
        fs = tuple(self.filter_shape)
        if len(fs) not in (1, 2) or any(not isinstance(k, numbers.Integral) or k < 1
                                        for k in fs):
            raise ValueError(
                f"filter_shape must be (k,) or (kh, kw) with positive integers, got "
                f"{self.filter_shape!r}."
            )

    def _filter_dims(self, shape):
        """``components_``'s shape for ``image_shape`` ``shape``."""
        fs = tuple(int(k) for k in self.filter_shape)
        if len(shape) == 1:
            if len(fs) != 1:
                raise ValueError(f"1-D signals need filter_shape=(k,), got {fs}.")
            return (self.n_filters, *fs)
        if len(fs) != 2:
            raise ValueError(f"images need filter_shape=(kh, kw), got {fs}.")
        return (self.n_filters, *shape[:-2], *fs)

    def _filters_init(self):
        arr = _filters_array(self.dict_init, "dict_init")
        want = self._filter_dims(self._pending_shape)
        if arr.shape != want:
            raise ValueError(f"dict_init has shape {arr.shape}, expected {want}.")
        return arr

    def _train_dtype(self, first):
        return None if first else self.components_.dtype

    def _make_learner(self, source, device, first):
        shape = self._image_shape(source.n_features)
        dims = self._filter_dims(shape)
        f4, img = as_conv_filters(np.zeros(dims), shape)
        self._pending_shape = shape
        return ConvLearner(self, self.n_filters, tuple(f4.shape[2:]), img, device, source.dtype)

    def _resume_state(self, learner, device):
        return ConvState.from_state_dict(self._train_state, device=device,
                                         dtype=torch_dtype(learner.dtype))

    def _commit_state(self, state, learner):
        shape = self._pending_shape
        self.components_ = state.D.detach().cpu().numpy().reshape(self._filter_dims(shape))
        self.image_shape_ = shape
        self.n_resampled_ = state.n_resampled
        # the run's state is dropped after this: export views, not copies (~0.35 s
        # per partial_fit with 136 MB of statistics and the warm starts)
        self._train_state = state.state_dict(copy_arrays=False)
        self.map_shape_ = tuple(self._map_shape())

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the filters from the images ``X``.

        Parameters
        ----------
        X : {array-like, torch.Tensor} of shape (n_samples, n_features), or an \
iterable of such minibatches
            Images, one per row, flattened in C order.
        y : Ignored

        Returns
        -------
        self
        """
        return self._train(X, first=True, single_pass=False)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Update the filters with one pass over ``X``; a failure leaves the
        previous fitted state unchanged.

        Parameters
        ----------
        X : {array-like, torch.Tensor} of shape (n_samples, n_features), or an \
iterable of such minibatches
        y : Ignored

        Returns
        -------
        self
        """
        return self._train(X, first=not hasattr(self, "_train_state"), single_pass=True)

    def _check_ready(self):
        check_is_fitted(self)
