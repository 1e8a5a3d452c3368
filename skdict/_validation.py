"""Validation at the estimator boundary: input arrays, dictionaries and the
parameter-constraint fragments every estimator shares."""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import validate_data

from ._backend import numpy_dtype

__all__ = ["DEVICE_CONSTRAINT", "SHUFFLE_CONSTRAINT", "FeatureProbe", "check_dictionary",
           "check_input", "check_n_features", "check_n_nonzero_coefs", "feature_probe",
           "restore_input_attrs_on_error", "shape_error", "validate_params_if_changed"]

_INPUT_ATTRS = ("n_features_in_", "feature_names_in_")

SHUFFLE_CONSTRAINT = ["boolean", StrOptions({"blocks"})]

DEVICE_CONSTRAINT = [StrOptions({"auto", "cpu", "cuda", "mps"}), str, torch.device, None]


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def shape_error(X_ndim, shape, name):
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


def is_torch(X):
    return isinstance(X, torch.Tensor)


def check_input(estimator, X, *, reset, dtype_default=np.float64, ensure_finite=True):
    """Validate ``X`` for an skdict estimator and record its feature count.

    Returns ``(X, dtype)`` where ``X`` is a 2-D numpy array (possibly a memmap,
    never copied when it is already float32/float64 C-or-F contiguous), a scipy
    CSR matrix, or a 2-D floating torch tensor left on its device; and ``dtype``
    is the numpy floating dtype of the computation (float32 or float64).
    ``ensure_finite=False`` leaves the NaN / infinity check to the caller (who
    checks the rows it reads).
    """
    name = type(estimator).__name__
    if is_torch(X) and X.layout != torch.strided:
        X = _torch_sparse_to_csr(X, name)  # then validated like a scipy matrix
    if is_torch(X):
        X = X.detach()  # codes and statistics never carry the caller's autograd graph
        if X.ndim != 2:
            raise shape_error(X.ndim, X.shape, name)
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
        if X.is_complex():
            raise ValueError(
                f"Complex data not supported: {name} needs a real tensor, got {X.dtype}; "
                "pass X.real (or split real and imaginary parts into features)."
            )
        if X.dtype not in (torch.float32, torch.float64):
            X = X.to(torch.float64 if not X.is_floating_point() else torch.float32)
        if ensure_finite and not bool(torch.isfinite(X).all()):
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
            check_n_features(estimator, n_features)
        return X, numpy_dtype(X.dtype)

    ndim = getattr(X, "ndim", None)
    if ndim is not None and ndim not in (2,) and not sp.issparse(X):
        if ndim == 0:
            raise ValueError(f"Expected a 2-D array (n_samples, n_features), got a scalar ({X!r}).")
        raise shape_error(ndim, X.shape, name)
    if not reset and _plain_checked(estimator, X, ensure_finite):
        return X, X.dtype
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
        ensure_all_finite=ensure_finite,
    )
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        X.sort_indices()
    return X, X.dtype


@contextmanager
def restore_input_attrs_on_error(estimator):
    """Validating ``X`` with ``reset=True`` records ``n_features_in_`` /
    ``feature_names_in_`` before the rest of ``fit`` runs; if the call then
    fails, put them back so the previous fitted state stays consistent."""
    saved = {a: estimator.__dict__[a] for a in _INPUT_ATTRS if a in estimator.__dict__}
    try:
        yield
    except BaseException:
        for a in _INPUT_ATTRS:
            if a in saved:
                estimator.__dict__[a] = saved[a]
            else:
                estimator.__dict__.pop(a, None)
        raise


def _torch_sparse_to_csr(X, name):
    """A torch sparse tensor (COO, CSR, ...) as a scipy CSR matrix on the host."""
    if X.ndim != 2:
        raise shape_error(X.ndim, X.shape, name)
    X = X.detach().cpu().to_sparse_csr()
    return sp.csr_matrix(
        (X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()),
        shape=tuple(X.shape),
    )


def _plain_checked(estimator, X, ensure_finite=True):
    """Whether ``X`` is a plain float32 / float64 ndarray that passes every check
    ``validate_data`` would make for an estimator fitted without feature names
    (then the feature count is checked here). scikit-learn's generic checks cost
    ~0.3 ms a call, a tenth of an exact encode of a thousand rows; anything else
    (names, other dtypes, non-finite values, empty arrays) takes that path and its
    errors."""
    if (type(X) is not np.ndarray or X.ndim != 2 or X.dtype not in _FLOAT_DTYPES
            or X.shape[0] < 1 or X.shape[1] < 1 or hasattr(estimator, "feature_names_in_")):
        return False
    # a sum is finite only if every value is (an overflowing sum of finite values
    # takes the full check)
    if ensure_finite and not np.isfinite(np.add.reduce(X, axis=None)):
        return False
    check_n_features(estimator, X.shape[1])
    return True


_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_n_features(estimator, n_features):
    expected = getattr(estimator, "n_features_in_", None)
    if expected is not None and n_features != expected:
        raise ValueError(
            f"X has {n_features} features, but {type(estimator).__name__} is "
            f"expecting {expected} features as input."
        )




def check_n_nonzero_coefs(n_nonzero_coefs, n_atoms, name="n_nonzero_coefs"):
    """An atom budget must fit the dictionary: nothing is silently clipped."""
    if n_nonzero_coefs is not None and n_nonzero_coefs > n_atoms:
        raise ValueError(
            f"{name}={n_nonzero_coefs} exceeds the {n_atoms} atoms of the dictionary; "
            f"use at most {n_atoms}."
        )


def check_dictionary(dictionary, name="dictionary"):
    """A dictionary (atoms as rows) as a finite, numeric, non-empty 2-D numpy array."""
    if isinstance(dictionary, torch.Tensor):
        dictionary = dictionary.detach().cpu().numpy()
    D = np.asarray(dictionary)
    if D.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_components, n_features), got shape {D.shape}.")
    if D.shape[0] < 1 or D.shape[1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {D.shape}.")
    if D.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {D.dtype}.")
    if not np.all(np.isfinite(D)):
        raise ValueError(f"{name} contains NaN or infinity.")
    return D


class FeatureProbe(BaseEstimator):
    """Stands in for an estimator at the input boundary of a function: carries the
    expected feature count; errors name the function (see :func:`feature_probe`)."""

    def __init__(self, n_features=None):
        self.n_features = n_features
        self.n_features_in_ = n_features


def feature_probe(n_features, name):
    """A :class:`FeatureProbe` whose errors read "... but ``name`` is expecting ..."."""
    return type(name, (FeatureProbe,), {})(n_features)


# the parameter values each estimator last passed validation with (held, so
# that identity means "unchanged"), kept outside the estimator: transform and
# score must not change its __dict__
_VALIDATED = weakref.WeakKeyDictionary()
_PARAM_NAMES = {}


def validate_params_if_changed(estimator):
    """``estimator._validate_params()`` unless every parameter is the very object
    it was at the last successful validation (``set_params`` or an assignment
    makes a new one). Validation costs ~0.1-0.3 ms, which every ``transform``
    paid again for unchanged parameters."""
    cls = type(estimator)
    names = _PARAM_NAMES.get(cls)
    if names is None:
        names = _PARAM_NAMES[cls] = tuple(cls._get_param_names())
    values = tuple(estimator.__dict__.get(n) for n in names)
    last = _VALIDATED.get(estimator)
    if last is not None and len(last) == len(values) and all(
            a is b for a, b in zip(last, values, strict=True)):
        return
    estimator._validate_params()
    try:
        _VALIDATED[estimator] = values
    except TypeError:  # an estimator that cannot be weakly referenced: validate every call
        pass
