"""Sparse coding against a fixed dictionary: :class:`SparseCoder`."""

from __future__ import annotations

import numbers
import weakref

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_feature_names

from ._validation import (
    check_dictionary,
    check_n_nonzero_coefs,
    restore_input_attrs_on_error,
    validate_params_if_changed,
)
from .base import BaseSparseCoder
from .functional import BlockEncoder
from .solvers.registry import get_solver, solver_names

__all__ = ["SparseCoder"]

# Each coder's dictionary operators (device copies, Gram) kept between transform
# calls: at a thousand rows, building them again was a tenth of an exact encode.
# Keyed weakly by the coder (transform must not change its __dict__) and checked
# against a copy of the dictionary, so set_params or an in-place edit rebuilds them.
_OPERATORS = weakref.WeakKeyDictionary()
# atoms up to which the operators are kept: a (K, K) Gram of 4096 atoms is 128 MB
_CACHE_MAX_ATOMS = 4096


class SparseCoder(BaseSparseCoder):
    """Sparse coding of data against a fixed dictionary, on torch.

    Each row ``x`` is encoded as the solution of::

        argmin_a  0.5 * ||x - a @ dictionary||^2 + alpha * ||a||_1

    (scikit-learn's ``SparseCoder`` / ``DictionaryLearning`` convention, SPAMS'
    ``lambda1``), or greedily with ``n_nonzero_coefs`` atoms for ``"omp"``.
    There is nothing to learn: ``fit`` only validates its input.

    Parameters
    ----------
    dictionary : array-like or torch.Tensor of shape (n_components, n_features)
        Atoms as rows. They need not have unit norm.
    algorithm : str, default="exact"
        A registered solver (:func:`skdict.solvers.solver_names`).
        ``"exact"``: active-set solver certified by the KKT conditions (reaches the
        optimum to ~1e-7 relative objective in float64). ``"fista"`` / ``"ista"``:
        proximal gradient stopped on the relative duality gap ``tol``. ``"lca"``:
        the Locally Competitive Algorithm (soft threshold, so its fixed point is
        the lasso solution). ``"omp"``: orthogonal matching pursuit with
        ``n_nonzero_coefs`` atoms (``alpha`` is not used).
    alpha : float, default=1.0
        L1 weight (>= 0).
    n_nonzero_coefs : int, default=None
        Atoms per row for ``"omp"``; None means ``max(1, n_features // 10)``.
    positive_code : bool, default=False
        Constrain codes to be non-negative.
    transform_max_iter : int, default=1000
        Iterations for the iterative algorithms.
    tol : float, default=1e-5
        Relative duality gap at which iterative algorithms stop (floored at
        ``20 * eps`` of the data's dtype).
    device : str or torch.device, default="auto"
        "auto" (CUDA when available), "cpu", "cuda", "cuda:N" or a torch.device.
    sparse_output : bool, default=True
        Return codes as scipy CSR (``csr_matrix``, or ``csr_array`` under
        scikit-learn's ``sparse_interface="sparray"``); dense ndarray otherwise.
    batch_size : int, default=None
        Rows encoded at a time; None picks ~64 MB of dense codes per batch.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The dictionary, as an array.
    n_components_ : int
        Number of atoms.
    n_features_in_ : int
        Number of features (the dictionary's width).
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of ``X`` when it had string column names (a DataFrame).

    See Also
    --------
    LCASparseCoder : learns the dictionary with LCA inference.
    sklearn.decomposition.SparseCoder : the CPU reference.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import SparseCoder
    >>> rng = np.random.default_rng(0)
    >>> D = rng.standard_normal((8, 5))
    >>> D /= np.linalg.norm(D, axis=1, keepdims=True)
    >>> X = rng.standard_normal((4, 5))
    >>> coder = SparseCoder(D, alpha=0.5, device="cpu")
    >>> codes = coder.fit_transform(X)
    >>> codes.shape
    (4, 8)
    """

    _parameter_constraints: dict = {
        **BaseSparseCoder._parameter_constraints,
        "dictionary": ["array-like", torch.Tensor],
        "algorithm": [StrOptions(set(solver_names()))],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "n_nonzero_coefs": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "positive_code": ["boolean"],
        "transform_max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
    }

    def __init__(
        self,
        dictionary,
        *,
        algorithm="exact",
        alpha=1.0,
        n_nonzero_coefs=None,
        positive_code=False,
        transform_max_iter=1000,
        tol=1e-5,
        device="auto",
        sparse_output=True,
        batch_size=None,
    ):
        self.dictionary = dictionary
        self.algorithm = algorithm
        self.alpha = alpha
        self.n_nonzero_coefs = n_nonzero_coefs
        self.positive_code = positive_code
        self.transform_max_iter = transform_max_iter
        self.tol = tol
        self.device = device
        self.sparse_output = sparse_output
        self.batch_size = batch_size

    # The dictionary is the model: these are derived, not learned.
    @property
    def components_(self):
        return check_dictionary(self.dictionary)

    @property
    def n_components_(self):
        return self.components_.shape[0]

    @property
    def n_features_in_(self):
        return self.components_.shape[1]

    def _check_params(self):
        """Cross-parameter checks (ValueError saying what to change)."""
        if get_solver(self.algorithm).problem == "l0":
            check_n_nonzero_coefs(self.n_nonzero_coefs, self.n_components_)

    def _check_ready(self):
        validate_params_if_changed(self)
        self._check_params()
        self._device()

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Validate ``X`` against the dictionary; nothing is learned.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        self
        """
        self._check_ready()
        with restore_input_attrs_on_error(self):
            # the feature count is the dictionary's; the names are the data's
            _check_feature_names(self, X, reset=True)
            self._source(X)  # validates X (shape, finiteness, feature count)
        return self

    def _transform_state(self, device, dtype):
        D = self.components_
        enc = BlockEncoder(
            D,
            self.algorithm,
            device=device,
            dtype=dtype,
            alpha=self.alpha,
            n_nonzero_coefs=self.n_nonzero_coefs,
            positive=self.positive_code,
            max_iter=self.transform_max_iter,
            tol=self.tol,
            param_names={"max_iter": "transform_max_iter"},
        )
        if D.shape[0] <= _CACHE_MAX_ATOMS:
            kept = _OPERATORS.get(self)
            if kept is None or kept[0].dtype != D.dtype or not np.array_equal(kept[0], D):
                kept = _OPERATORS[self] = (D.copy(), {})
            enc._ops = kept[1]
        return enc

    def _encode(self, Xb, encoder):
        return encoder.codes(Xb)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags
