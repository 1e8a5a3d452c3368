"""The shared estimator base of skdict.

Everything that is the same for every skdict transformer lives here: the device
policy, ``transform`` assembled batch by batch into CSR (never a dense
``(n_samples, n_components)`` block), ``inverse_transform`` from CSR or dense
codes, the one reduce loop that ``score`` and batch-wise metrics run on, and
portable pickling.

Subclasses implement ``_transform_state(device, dtype)`` (tensors prepared once
per call), ``_encode(Xb, state) -> Codes`` (one batch), ``_decoder(device,
dtype) -> (D, offset)`` and, for ``score``, ``_score_from(sums, n, p)``.
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
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from ._backend import default_batch_size, numpy_dtype, resolve_device, torch_dtype
from ._validation import DEVICE_CONSTRAINT as _DEVICE_CONSTRAINT
from ._validation import is_torch as _is_torch
from ._validation import validate_params_if_changed
from .data.codes import CSRBuilder, as_codes
from .data.sources import as_source, is_dask
from .solvers.decode import sparse_decode, topk_decode

__all__ = [
    "BATCH_SUMS",
    "SparseCodingMixin",
    "BaseSparseCoder",
    "lasso_information_criterion",
    "batch_sums",
    "decode_codes",
]

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

    # ---------------------------------------------------------------- settings
    def _device(self):
        return resolve_device(getattr(self, "device", "auto"))

    def _batch_size_for(self, n_codes, dtype):
        bs = getattr(self, "batch_size", None)
        return int(bs) if bs is not None else default_batch_size(n_codes, dtype)

    @property
    def _n_features_out(self):
        return self._n_codes()

    # ---------------------------------------------------------------- transform
    def _source(self, X):
        return as_source(X, estimator=self, reset=False, allow_stream=False)

    def _cached_transform_state(self, device, dtype, cache):
        if cache is None:
            return self._transform_state(device, dtype)
        key = (str(device), np.dtype(dtype).str)
        if key not in cache:
            cache[key] = self._transform_state(device, dtype)
        return cache[key]

    def _transform_impl(self, X, *, sparse_output=None, cache=None):
        sparse_output = self.sparse_output if sparse_output is None else sparse_output
        if is_dask(X):
            from .distributed.dask import transform_blocks

            return transform_blocks(self, X, sparse_output=sparse_output)
        src = self._source(X)
        device = self._device()
        state = self._cached_transform_state(device, src.dtype, cache)
        n_codes = self._n_codes()
        bs = self._batch_size_for(n_codes, src.dtype)
        if sparse_output:
            builder = CSRBuilder(n_codes, src.dtype)
            for _, _, Xb in src.ordered(bs, device=device):
                as_codes(self._encode(Xb, state)).add_to(builder)
            _report(state, self)
            return builder.build()
        out = np.zeros((src.n_samples, n_codes), dtype=src.dtype)
        for start, stop, Xb in src.ordered(bs, device=device):
            dense = as_codes(self._encode(Xb, state)).to_dense(n_codes)
            out[start:stop] = dense.detach().cpu().numpy()
        _report(state, self)
        return out

    def _reduce(self, X, sums=None, *, fn=None, cache=None):
        """The one loop behind ``score`` and batch-wise metrics.

        Encodes ``X`` batch by batch and adds up, in float64, what each batch
        contributes: by default the quantities named in ``sums`` (see
        :data:`BATCH_SUMS`: ``"rss"`` squared residual, ``"nnz"`` non-zero codes,
        ``"s1"`` column sums of ``X``, ``"s2"`` squared norm of ``X``), or the
        dict returned by ``fn(Xb, codes, state)``. Values stay on the device
        until the end (no host sync per batch). Returns ``(totals, n_samples,
        n_features)`` with floats (vectors as numpy arrays).
        """
        sums = BATCH_SUMS if sums is None else tuple(sums)
        if is_dask(X):  # per block on the workers, then summed
            from .distributed.dask import reduce_blocks

            return reduce_blocks(self, X, sums, fn=fn)
        src = self._source(X)
        device = self._device()
        state = self._cached_transform_state(device, src.dtype, cache)
        if fn is None:
            D, offset = self._decoder(device, src.dtype)

            def fn(Xb, codes, state):
                return batch_sums(Xb, codes, D, offset, sums)

        bs = self._batch_size_for(self._n_codes(), src.dtype)
        totals = {}
        for _, _, Xb in src.ordered(bs, device=device):
            for name, value in fn(Xb, as_codes(self._encode(Xb, state)), state).items():
                totals[name] = totals[name] + value if name in totals else value
        _report(state, self)
        out = {}
        for k, v in totals.items():
            if isinstance(v, torch.Tensor):
                v = v.double().cpu()
                v = v.numpy() if v.dim() else float(v)
            out[k] = v
        return out, src.n_samples, src.n_features

    def score(self, X, y=None):
        """Score of the codes of ``X`` (higher is better); see ``_score_from``.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        score : float
        """
        self._check_ready()
        totals, n, p = self._reduce(X)
        return float(self._score_from(totals, n, p))

    def _score_from(self, sums, n, p):
        raise NotImplementedError  # pragma: no cover - every estimator defines its criterion

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
        self._check_current_params()

    def _check_current_params(self):
        """Parameters may have changed (``set_params``) since ``fit``: every call
        that uses them validates them, as ``fit`` did."""
        validate_params_if_changed(self)
        check = getattr(self, "_check_params", None)
        if check is not None:
            check()

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
        if is_dask(X):
            from .distributed.dask import inverse_transform_blocks

            return inverse_transform_blocks(self, X)
        X, dtype = self._check_codes(X)
        device = self._device()
        D, offset = self._decoder(device, dtype)
        n = X.shape[0]
        out = np.empty((n, D.shape[1]), dtype=dtype)
        bs = self._batch_size_for(self._n_codes(), dtype)
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
                Xh = _dense_block(X, start, stop, device, tdtype) @ D
            if offset is not None:
                Xh = Xh + offset
            out[start:stop] = Xh.cpu().numpy()
        return out

    def _check_codes(self, X):
        """Validated codes for ``inverse_transform`` (CSR, ndarray or dense torch)
        and the numpy dtype to decode in."""
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
        return X, dtype

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


def _report(state, estimator):
    """A transform state that tracks solver convergence (a ``BlockEncoder``) warns
    once per call when a solver stopped at its iteration cap."""
    report = getattr(state, "report", None)
    if report is not None:
        report(type(estimator).__name__)


def _dense_block(X, start, stop, device, tdtype):
    """Rows ``start:stop`` of dense codes (ndarray or torch) as a tensor."""
    if _is_torch(X):
        return X[start:stop].to(device=device, dtype=tdtype)
    return torch.from_numpy(np.ascontiguousarray(X[start:stop])).to(device=device,
                                                                     dtype=tdtype)


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
        return super().score(X, y)

    def _score_from(self, sums, n, p):
        return -lasso_information_criterion((n, p), sums["nnz"], sums["rss"], self._n_codes(),
                                            "ebic")


BATCH_SUMS = ("rss", "nnz", "s1", "s2")


def decode_codes(codes, D, offset=None):
    """``codes @ D (+ offset)`` for any :class:`~skdict.data.codes.Codes`, without
    densifying fixed-width or CSR codes."""
    if codes.dense is not None:
        Xh = codes.dense.to(D.dtype) @ D
    elif codes.csr is not None:
        data, cols, counts = codes.csr
        crow = torch.zeros(len(counts) + 1, dtype=torch.int64)
        torch.cumsum(torch.as_tensor(np.asarray(counts), dtype=torch.int64), 0, out=crow[1:])
        col = torch.as_tensor(np.asarray(cols), dtype=torch.int64)
        val = torch.as_tensor(np.asarray(data)).to(D.dtype)
        Xh = sparse_decode(crow.to(D.device), col.to(D.device), val.to(D.device), D)
    else:
        Xh = topk_decode(codes.indices, codes.values.to(D.dtype), D)
    return Xh if offset is None else Xh + offset


def batch_sums(Xb, codes, D, offset=None, sums=BATCH_SUMS):
    """The float64 sums of one batch that :meth:`SparseCodingMixin._reduce` adds up
    (0-d or 1-d tensors on the batch's device: no host sync per batch)."""
    out = {}
    if "rss" in sums:
        R = Xb - decode_codes(codes, D, offset)
        out["rss"] = (R.double() ** 2).sum()
    if "nnz" in sums:
        out["nnz"] = codes.nnz()
    if "s1" in sums:
        out["s1"] = Xb.double().sum(0)
    if "s2" in sums:
        out["s2"] = (Xb.double() ** 2).sum()
    return out
