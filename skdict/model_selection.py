"""Model selection helpers: choosing ``alpha`` for a target sparsity."""

from __future__ import annotations

import copy
import numbers
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils import check_random_state

from ._validation import check_dictionary, feature_probe
from .data.sources import as_source
from .solvers.registry import get_solver

__all__ = ["alpha_for_sparsity", "alpha_max"]


def _dictionary_of(estimator):
    try:
        D = estimator.components_
    except (AttributeError, NotFittedError) as exc:
        raise NotFittedError(
            f"{type(estimator).__name__} has no dictionary yet: fit it first (or use "
            "SparseCoder(dictionary)) before calling alpha_for_sparsity."
        ) from exc
    return np.asarray(D)


def _check_alpha_sets_sparsity(estimator):
    """alpha_for_sparsity bisects on alpha: the codes' sparsity must depend on it."""
    name = type(estimator).__name__
    params = estimator.get_params()
    if "n_nonzero_coefs" in params and "algorithm" not in params:
        raise ValueError(
            f"{name} codes every row with exactly n_nonzero_coefs atoms; alpha does not "
            "change how many: set n_nonzero_coefs to the target instead of calling "
            "alpha_for_sparsity."
        )
    algo = params.get("algorithm", params.get("transform_algorithm"))
    if algo is None:
        raise ValueError(
            f"alpha_for_sparsity tunes the lasso penalty of SparseCoder or LCASparseCoder; "
            f"the sparsity of {name} is not set by alpha (use its own count parameter, "
            "e.g. k)."
        )
    # the algorithm an "auto" setting stands for (LCASparseCoder picks by threshold)
    resolved = getattr(estimator, "_transform_algorithm", algo)
    algo = resolved if isinstance(resolved, str) else algo
    if get_solver(algo).problem == "l0":
        key = "algorithm" if "algorithm" in params else "transform_algorithm"
        count = "n_nonzero_coefs" if key == "algorithm" else "transform_n_nonzero_coefs"
        raise ValueError(
            f"{key}={algo!r} ignores alpha and keeps {count} atoms per row: set {count} "
            "to the target instead of calling alpha_for_sparsity."
        )


def alpha_max(dictionary, X, *, positive=False, device="cpu"):
    """Smallest ``alpha`` for which every row of ``X`` gets the all-zero code.

    It is ``max_i max_j |D_j . x_i|`` (``max D_j . x_i`` with ``positive``).
    """
    D = torch.as_tensor(check_dictionary(dictionary).astype(np.float64), device=device)
    out = 0.0
    src = as_source(X, estimator=feature_probe(D.shape[1], "alpha_max"), reset=False,
                    allow_stream=False)
    for Xb in src.batches(4096, device=device, dtype=np.float64):
        C = Xb @ D.T
        m = C.max() if positive else C.abs().max()
        out = max(out, float(m))
    return out


def alpha_for_sparsity(
    estimator,
    X,
    *,
    target_l0=None,
    target_density=None,
    rtol=0.02,
    max_iter=40,
    max_samples=2000,
    random_state=0,
    return_history=False,
):
    """Find the ``alpha`` whose codes have a target mean number of non-zeros.

    Bisection on ``log(alpha)`` along the lasso path of the estimator's
    dictionary, between ``alpha_max = max |D x|`` (all codes zero) and
    ``1e-6 * alpha_max``. The number of non-zeros of the lasso is monotone in
    ``alpha`` for most dictionaries and near-monotone otherwise; the bisection
    returns the ``alpha`` whose mean L0 is closest to the target among those it
    evaluated.

    Parameters
    ----------
    estimator : SparseCoder or fitted LCASparseCoder (anything with ``alpha``,
        ``components_`` and ``transform``)
        Its dictionary is kept fixed; only ``alpha`` varies (on a copy).
        Estimators whose sparsity alpha does not set (``"omp"``,
        :class:`CollapsedDictionaryLearner`, :class:`KSparseAutoencoder`) raise
        ``ValueError``.
    X : array-like of shape (n_samples, n_features)
        Data whose codes should reach the target.
    target_l0 : float, optional
        Target mean number of non-zeros per row, in ``(0, n_components]``.
    target_density : float, optional
        Target fraction of non-zeros, in ``(0, 1]`` (``target_l0 / n_components``).
        Exactly one of ``target_l0`` and ``target_density`` must be given.
    rtol : float, default=0.02
        Stop when the mean L0 is within ``rtol * target_l0`` of the target.
    max_iter : int, default=40
        Bisection steps.
    max_samples : int or None, default=2000
        Rows of ``X`` (a random subset) used to evaluate sparsity; None uses all.
    random_state : int, RandomState or None, default=0
        For the subset.
    return_history : bool, default=False
        Also return the list of ``(alpha, mean_l0)`` evaluated.

    Returns
    -------
    alpha : float
    history : list of (float, float)
        Only with ``return_history=True``.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import SparseCoder
    >>> from skdict.model_selection import alpha_for_sparsity
    >>> rng = np.random.default_rng(0)
    >>> D = rng.standard_normal((30, 10)); D /= np.linalg.norm(D, axis=1)[:, None]
    >>> X = rng.standard_normal((100, 10))
    >>> alpha = alpha_for_sparsity(SparseCoder(D, device="cpu"), X, target_l0=3)
    >>> round(float((SparseCoder(D, alpha=alpha, device="cpu").transform(X) != 0)
    ...             .sum(1).mean()), 0)
    3.0
    """
    if (target_l0 is None) == (target_density is None):
        raise ValueError("Give exactly one of target_l0 and target_density.")
    D = _dictionary_of(estimator)
    K = D.shape[0]
    if target_density is not None:
        if not (isinstance(target_density, numbers.Real) and 0 < target_density <= 1):
            raise ValueError(f"target_density must be in (0, 1], got {target_density!r}.")
        target_l0 = float(target_density) * K
    if not (isinstance(target_l0, numbers.Real) and 0 < target_l0 <= K):
        raise ValueError(f"target_l0 must be in (0, n_components={K}], got {target_l0!r}.")
    if not hasattr(estimator, "alpha"):
        raise ValueError(f"{type(estimator).__name__} has no 'alpha' parameter to tune.")
    src = as_source(X, estimator=feature_probe(D.shape[1], "alpha_for_sparsity"), reset=False,
                    allow_stream=False)
    Xc, n = src.X, src.n_samples
    if max_samples is not None and n > max_samples:
        rows = np.sort(check_random_state(random_state).choice(n, max_samples, replace=False))
        Xc = Xc[rows] if not isinstance(Xc, torch.Tensor) else Xc[torch.as_tensor(rows)]
    _check_alpha_sets_sparsity(estimator)
    # the estimator's own transform (its algorithm, threshold, tau ...) on a copy
    # that keeps the fitted dictionary; only alpha varies
    est = copy.deepcopy(estimator)
    est.set_params(sparse_output=True)
    positive = bool(est.get_params().get("positive_code", False))
    Xnp = Xc.detach().cpu().numpy() if isinstance(Xc, torch.Tensor) else Xc
    hi = alpha_max(D, Xnp, positive=positive)
    if hi == 0:
        raise ValueError("X is orthogonal to every atom: all codes are zero for any alpha.")
    lo = hi * 1e-6
    history = []

    unconverged = []

    def l0(alpha):
        est.set_params(alpha=alpha)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            codes = est.transform(Xc)
        unconverged.extend(w for w in caught if issubclass(w.category, ConvergenceWarning))
        val = codes.nnz / codes.shape[0]
        history.append((float(alpha), float(val)))
        return val

    best = (np.inf, hi)
    log_lo, log_hi = np.log(lo), np.log(hi)
    for _ in range(max_iter):
        mid = float(np.exp(0.5 * (log_lo + log_hi)))
        val = l0(mid)
        err = abs(val - target_l0)
        if err < best[0]:
            best = (err, mid)
        if err <= rtol * target_l0:
            break
        if val > target_l0:  # too dense: raise alpha
            log_lo = np.log(mid)
        else:
            log_hi = np.log(mid)
    alpha = best[1]
    if unconverged:  # one warning for the search, not one per alpha tried
        warnings.warn(f"alpha_for_sparsity: {unconverged[-1].message}", ConvergenceWarning,
                      stacklevel=2)
    return (alpha, history) if return_history else alpha
