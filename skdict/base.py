"""The shared estimator base of skdict.

Everything that is the same for every skdict estimator lives here: the device and
dtype policy, the conversion of numpy / scipy sparse / torch inputs, batching,
assembly of CSR outputs without a dense ``(n_samples, n_components)`` block,
``inverse_transform`` from CSR or dense codes, the default ``score`` and
portable pickling.

Subclasses implement ``_encode(Xb, state)`` (one batch, a torch tensor on the
device, to codes) and ``_transform_state(device, dtype)`` (tensors the encoder
needs, such as the dictionary and its Gram matrix, prepared once per call).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
)
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._backend import numpy_dtype, resolve_device, torch_dtype
from .data.codes import Codes, CSRBuilder, as_codes, make_csr  # noqa: F401
from .solvers.decode import sparse_decode

__all__ = [
    "SparseCodingMixin",
    "BaseSparseCoder",
    "CSRBuilder",
    "check_input",
    "iter_batches",
    "n_samples_of",
    "make_csr",
    "lasso_information_criterion",
]

_DEVICE_CONSTRAINT = [StrOptions({"auto", "cpu", "cuda", "mps"}), str, torch.device, None]


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _shape_error(X_ndim, shape, name):
    if X_ndim == 1:
        return ValueError(
            f"Expected a 2-D array (n_samples, n_features), got a 1-D array of shape "
            f"{tuple(shape)}. Reshape your data using X.reshape(-1, 1) if it has a "
            "single feature or X.reshape(1, -1) if it contains a single sample."
        )
    return ValueError(
        f"Expected a 2-D array (n_samples, n_features), got a {X_ndim}-D array of "
        f"shape {tuple(shape)}. {name} treats each row as one sample: reshape, e.g. "
        "X.reshape(-1, X.shape[-1]) to treat every token / position as a sample."
    )


def _is_torch(X):
    return isinstance(X, torch.Tensor)


def check_input(estimator, X, *, reset, dtype_default=np.float64):
    """Validate ``X`` for an skdict estimator and record its feature count.

    Returns ``(X, dtype)`` where ``X`` is a 2-D numpy array (possibly a memmap,
    never copied when it is already float32/float64 C-or-F contiguous), a scipy
    CSR matrix, or a 2-D floating torch tensor left on its device; and ``dtype``
    is the numpy floating dtype of the computation (float32 or float64).
    """
    name = type(estimator).__name__
    if _is_torch(X):
        if X.ndim != 2:
            raise _shape_error(X.ndim, X.shape, name)
        if X.shape[0] < 1:
            raise ValueError(
                f"Found array with 0 sample(s) (shape={tuple(X.shape)}) while a "
                f"minimum of 1 is required by {name}."
            )
        if X.shape[1] < 1:
            raise ValueError(
                f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while a "
                f"minimum of 1 is required by {name}."
            )
        if X.dtype not in (torch.float32, torch.float64):
            X = X.to(torch.float64 if not X.is_floating_point() else torch.float32)
        if not bool(torch.isfinite(X).all()):
            raise ValueError(
                "Input X contains NaN or infinity. Remove or impute non-finite values "
                f"before calling {name}."
            )
        n_features = X.shape[1]
        if reset:
            estimator.n_features_in_ = n_features
            if hasattr(estimator, "feature_names_in_"):
                del estimator.feature_names_in_
        else:
            _check_n_features(estimator, n_features)
        return X, numpy_dtype(X.dtype)

    ndim = getattr(X, "ndim", None)
    if ndim is not None and ndim not in (2,) and not sp.issparse(X):
        if ndim == 0:
            raise ValueError(f"Expected a 2-D array (n_samples, n_features), got a scalar ({X!r}).")
        raise _shape_error(ndim, X.shape, name)
    X = validate_data(
        estimator,
        X,
        reset=reset,
        accept_sparse="csr",
        dtype=[np.float64, np.float32],
        ensure_min_samples=1,
        ensure_min_features=1,
        order=None,
        copy=False,
    )
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        X.sort_indices()
    return X, X.dtype


def _check_n_features(estimator, n_features):
    expected = getattr(estimator, "n_features_in_", None)
    if expected is not None and n_features != expected:
        raise ValueError(
            f"X has {n_features} features, but {type(estimator).__name__} is "
            f"expecting {expected} features as input."
        )


def n_samples_of(X):
    return int(X.shape[0])


def iter_batches(X, batch_size, device, dtype):
    """Yield ``(start, stop, Xb)`` with ``Xb`` a dense torch tensor on ``device``.

    Only one batch of ``X`` is ever materialised densely on the device. Torch
    inputs already on ``device`` are sliced without a copy.
    """
    n = n_samples_of(X)
    tdtype = torch_dtype(dtype)
    batch_size = max(1, int(batch_size))
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if _is_torch(X):
            Xb = X[start:stop].to(device=device, dtype=tdtype)
        elif sp.issparse(X):
            Xb = torch.from_numpy(X[start:stop].toarray().astype(dtype, copy=False))
            Xb = Xb.to(device)
        else:
            chunk = np.ascontiguousarray(X[start:stop], dtype=dtype)
            Xb = torch.from_numpy(chunk).to(device)
        yield start, stop, Xb


# --------------------------------------------------------------------------------------
# Estimator mixin
# --------------------------------------------------------------------------------------


class SparseCodingMixin(ClassNamePrefixFeaturesOutMixin, TransformerMixin):
    """Machinery shared by every skdict transformer that outputs sparse codes.

    A subclass provides:

    * ``_n_codes()``: the number of code columns (``n_components``);
    * ``_transform_state(device, dtype)``: a dict of tensors prepared once per
      ``transform`` call (dictionary, Gram matrix, step size ...);
    * ``_encode(Xb, state)``: codes for one batch, either a dense ``(b, K)`` tensor
      or a fixed-width ``(indices, values)`` pair;
    * ``_decoder(device, dtype)``: ``(D, offset)`` such that
      ``X_hat = codes @ D + offset`` (offset may be None).
    """

    # default batch size when batch_size=None: aim at ~64 MB of dense codes
    _batch_target_bytes = 64 * 2**20

    # ---------------------------------------------------------------- settings
    def _device(self):
        return resolve_device(getattr(self, "device", "auto"))

    def _batch_size_for(self, n_codes, dtype):
        bs = getattr(self, "batch_size", None)
        if bs is not None:
            return int(bs)
        itemsize = np.dtype(dtype).itemsize
        return int(max(256, min(65536, self._batch_target_bytes // max(1, n_codes * itemsize))))

    @property
    def _n_features_out(self):
        return self._n_codes()

    # ---------------------------------------------------------------- transform
    def _transform_impl(self, X, *, sparse_output=None):
        X, dtype = check_input(self, X, reset=False)
        device = self._device()
        state = self._transform_state(device, dtype)
        n_codes = self._n_codes()
        sparse_output = self.sparse_output if sparse_output is None else sparse_output
        bs = self._batch_size_for(n_codes, dtype)
        if sparse_output:
            builder = CSRBuilder(n_codes, dtype)
            for _, _, Xb in iter_batches(X, bs, device, dtype):
                as_codes(self._encode(Xb, state)).add_to(builder)
            return builder.build()
        out = np.zeros((n_samples_of(X), n_codes), dtype=dtype)
        for start, stop, Xb in iter_batches(X, bs, device, dtype):
            dense = as_codes(self._encode(Xb, state)).to_dense(n_codes)
            out[start:stop] = dense.detach().cpu().numpy()
        return out

    def transform(self, X):
        """Encode ``X`` into sparse codes.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)
            Data to encode. Rows are processed in batches of ``batch_size`` on the
            estimator's device.

        Returns
        -------
        codes : scipy CSR of shape (n_samples, n_components) or ndarray
            CSR (``csr_matrix``, or ``csr_array`` under scikit-learn's
            ``sparse_interface="sparray"``) when ``sparse_output=True``, a dense
            array otherwise. Same floating dtype as ``X``.
        """
        self._check_ready()
        return self._transform_impl(X)

    def _check_ready(self):
        check_is_fitted(self)

    # ---------------------------------------------------------------- decode
    def inverse_transform(self, X):
        """Reconstruct data from codes: ``codes @ components_`` (+ offset).

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_components)
            Codes, typically the output of :meth:`transform`, CSR or dense.

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features)
        """
        self._check_ready()
        n_codes = self._n_codes()
        name = type(self).__name__
        if _is_torch(X):
            X = X.detach()
            if X.is_sparse or X.layout != torch.strided:
                X = X.to_dense()
        if sp.issparse(X):
            X = sp.csr_matrix(X)
        elif not _is_torch(X):
            X = np.asarray(X)
            if X.dtype.kind not in "fiub":
                raise ValueError(f"codes must be numeric, got dtype {X.dtype}.")
        if X.ndim != 2:
            raise ValueError(f"codes must be 2-D (n_samples, n_components), got shape {X.shape}.")
        if X.shape[1] != n_codes:
            raise ValueError(
                f"codes have {X.shape[1]} columns but {name} has {n_codes} "
                "components; pass the output of transform()."
            )
        dtype = (
            X.dtype
            if not _is_torch(X)
            else numpy_dtype(X.dtype)
            if X.is_floating_point()
            else np.float64
        )
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            dtype = np.dtype(np.float64)
        if sp.issparse(X):
            if not np.all(np.isfinite(X.data)):
                raise ValueError("codes contain NaN or infinity.")
        elif _is_torch(X):
            if not bool(torch.isfinite(X).all()):
                raise ValueError("codes contain NaN or infinity.")
        elif not np.all(np.isfinite(X)):
            raise ValueError("codes contain NaN or infinity.")
        device = self._device()
        D, offset = self._decoder(device, dtype)
        n = X.shape[0]
        out = np.empty((n, D.shape[1]), dtype=dtype)
        bs = self._batch_size_for(n_codes, dtype)
        tdtype = torch_dtype(dtype)
        for start in range(0, n, bs):
            stop = min(n, start + bs)
            if sp.issparse(X):
                blk = X[start:stop]
                crow = torch.from_numpy(blk.indptr.astype(np.int64)).to(device)
                col = torch.from_numpy(blk.indices.astype(np.int64)).to(device)
                val = torch.from_numpy(blk.data.astype(dtype, copy=False)).to(device)
                Xh = sparse_decode(crow, col, val, D)
            else:
                if _is_torch(X):
                    A = X[start:stop].to(device=device, dtype=tdtype)
                else:
                    A = torch.from_numpy(np.ascontiguousarray(X[start:stop], dtype=dtype)).to(
                        device
                    )
                Xh = A @ D
            if offset is not None:
                Xh = Xh + offset
            out[start:stop] = Xh.cpu().numpy()
        return out

    # ---------------------------------------------------------------- output
    def set_output(self, *, transform=None):
        """Set the output container; pandas/polars need ``sparse_output=False``."""
        if transform in ("pandas", "polars") and getattr(self, "sparse_output", False):
            raise ValueError(
                f"{type(self).__name__} returns sparse codes (sparse_output=True), which "
                f"set_output(transform={transform!r}) cannot wrap. Set "
                "sparse_output=False to get a dense DataFrame."
            )
        return super().set_output(transform=transform)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ---------------------------------------------------------------- pickling
    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        for key, val in list(state.items()):
            if isinstance(val, torch.Tensor):
                state[key] = val.detach().cpu()
        return state


def lasso_information_criterion(shape, nnz, rss, n_components, criterion="ebic"):
    """Per-sample information criterion of lasso codes (lower is better).

    Every row is one regression with ``n_features`` observations whose degrees of
    freedom are its number of non-zeros (Zou, Hastie & Tibshirani 2007; the
    estimate scikit-learn's ``LassoLarsIC`` uses). Pooled over ``n`` rows::

        n_features * log(rss / (n * n_features)) + c * nnz / n

    with ``c = log(n_features) + 2 * log(n_components)`` for the extended BIC
    (Chen & Chen 2008, gamma = 1: the BIC corrected for choosing the support
    among ``n_components`` candidate atoms, needed when the dictionary is
    overcomplete), ``log(n_features)`` for the BIC and ``2`` for the AIC.
    """
    n, p = shape
    sigma2 = max(rss / (n * p), np.finfo(np.float64).tiny)
    if criterion == "ebic":
        c = math.log(p) + 2 * math.log(max(n_components, 1))
    elif criterion == "bic":
        c = math.log(p)
    elif criterion == "aic":
        c = 2.0
    else:
        raise ValueError(f"criterion must be 'ebic', 'bic' or 'aic', got {criterion!r}.")
    return p * math.log(sigma2) + c * nnz / n


class BaseSparseCoder(SparseCodingMixin, BaseEstimator):
    """Base of estimators with a dictionary ``components_`` and lasso-type codes.

    Provides ``score`` as minus a per-sample information criterion (the
    extended BIC) so that a ``GridSearchCV`` over ``alpha`` without ``y`` has a
    meaningful optimum; see :meth:`score`.
    """

    _parameter_constraints: dict = {
        "device": _DEVICE_CONSTRAINT,
        "sparse_output": ["boolean"],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
    }

    def _n_codes(self):
        return self.components_.shape[0]

    def _decoder(self, device, dtype):
        D = torch.as_tensor(np.asarray(self.components_), dtype=torch_dtype(dtype))
        return D.to(device), None

    def score(self, X, y=None):
        """Minus the extended Bayesian information criterion of the codes, per sample.

        Each row's lasso code is one regression with ``n_features``
        observations and degrees of freedom equal to its number of non-zeros
        (Zou et al. 2007, the estimate scikit-learn's ``LassoLarsIC`` uses).
        Over ``n`` rows, with ``rss`` the total squared residual, ``nnz`` the
        total number of non-zeros, ``P = n_features`` and ``K = n_components``::

            score = -(P * log(rss / (n * P)) + (log(P) + 2 * log(K)) * nnz / n)

        The ``2 log K`` term is the extended BIC of Chen & Chen (2008): with an
        overcomplete dictionary (``K >= P``) the plain BIC keeps rewarding
        near-saturated supports whose residual vanishes, while the extended
        BIC charges for choosing each atom among ``K`` candidates. Higher is
        better. Unlike the lasso objective, which always prefers the smallest
        ``alpha``, this trades reconstruction against the number of active
        atoms, so ``GridSearchCV(est, {"alpha": grid})`` without ``y`` picks a
        sparsity level supported by the data. See
        :func:`skdict.base.lasso_information_criterion` for the AIC / BIC.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        score : float
        """
        self._check_ready()
        rss, nnz, n, p = self._rss_nnz(X)
        return -lasso_information_criterion((n, p), nnz, rss, self._n_codes(), "ebic")

    def _rss_nnz(self, X):
        X, dtype = check_input(self, X, reset=False)
        device = self._device()
        state = self._transform_state(device, dtype)
        D, offset = self._decoder(device, dtype)
        bs = self._batch_size_for(self._n_codes(), dtype)
        rss = 0.0
        nnz = 0
        for _, _, Xb in iter_batches(X, bs, device, dtype):
            A = as_codes(self._encode(Xb, state)).to_dense(D.shape[0], device).to(Xb.dtype)
            R = Xb - A @ D
            if offset is not None:
                R = R - offset
            rss += float((R.double() ** 2).sum())
            nnz += int((A != 0).sum())
        return rss, nnz, n_samples_of(X), X.shape[1]
