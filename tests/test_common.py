"""scikit-learn's estimator checks over every public skdict estimator.

Each estimator is listed in ``INSTANCES`` with small settings so the checks run
fast on CPU; ``EXPECTED_FAILED`` lists, per estimator, the checks that are
expected to fail and why.
"""

import numpy as np
import pytest
from sklearn.utils.estimator_checks import (
    estimator_checks_generator,
    parametrize_with_checks,
)

import skdict
from skdict import SparseCoder

_rng = np.random.RandomState(0)

# estimator instances (small and fast) -- one entry per public estimator
INSTANCES = []

# {estimator class name: {check name: reason}}
EXPECTED_FAILED = {}


def _register(est, expected=None):
    INSTANCES.append(est)
    if expected:
        EXPECTED_FAILED[type(est).__name__] = expected


# ---------------------------------------------------------------------- SparseCoder
# SparseCoder's dictionary fixes n_features, and each check uses data of its own
# width, so (as scikit-learn does for its SparseCoder) each check gets a
# dictionary of the width it uses.
_SPARSE_CODER_WIDTH = {
    "check_estimators_overwrite_params": 2,
    "check_estimators_fit_returns_self": 2,
    "check_readonly_memmap_input": 2,
    "check_n_features_in_after_fitting": 4,
    "check_positive_only_tag_during_fit": 4,
    "check_estimators_dtypes": 5,
    "check_dtype_object": 10,
    "check_transformers_unfitted_stateless": 5,
    "check_fit2d_1sample": 10,
    "check_fit2d_1feature": 1,
    "check_fit_idempotent": 2,
    "check_fit_check_is_fitted": 2,
}
_SPARSE_CODER_XFAIL = {
    "check_n_features_in": (
        "n_features_in_ is defined by the fixed dictionary before fit, as for "
        "scikit-learn's SparseCoder"
    ),
}


def _sparse_coder_checks():
    for algorithm in ["exact", "fista", "omp"]:
        base = SparseCoder(_rng.normal(size=(5, 3)), algorithm=algorithm, device="cpu")
        for _, check in estimator_checks_generator(base, legacy=True):
            name = getattr(check, "func", check).__name__
            width = _SPARSE_CODER_WIDTH.get(name, 3)
            est = SparseCoder(_rng.normal(size=(5, width)), algorithm=algorithm, device="cpu")
            marks = []
            if name in _SPARSE_CODER_XFAIL:
                marks = [pytest.mark.xfail(reason=_SPARSE_CODER_XFAIL[name], strict=True)]
            yield pytest.param(est, check, id=f"SparseCoder-{algorithm}-{name}", marks=marks)


@pytest.mark.parametrize("estimator, check", list(_sparse_coder_checks()))
def test_sparse_coder_sklearn_checks(estimator, check):
    check(estimator)


# ---------------------------------------------------------------------- the others
try:  # each family registers its small instances in tests/_instances.py
    from _instances import EXPECTED as _EXP
    from _instances import INSTANCES as _INST
except ImportError:  # pragma: no cover
    _INST, _EXP = [], {}

for _est in _INST:
    _register(_est, _EXP.get(type(_est).__name__))


@parametrize_with_checks(
    INSTANCES, expected_failed_checks=lambda est: EXPECTED_FAILED.get(type(est).__name__, {})
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def test_every_public_estimator_is_checked():
    from sklearn.base import BaseEstimator

    public = {
        name
        for name in skdict.__all__
        if isinstance(getattr(skdict, name), type)
        and issubclass(getattr(skdict, name), BaseEstimator)
    }
    checked = {type(e).__name__ for e in INSTANCES} | {"SparseCoder"}
    assert public <= checked, f"estimators without sklearn checks: {public - checked}"


def _documented_attributes(cls):
    from numpydoc.docscrape import ClassDoc

    return {n.strip() for a in ClassDoc(cls)["Attributes"] for n in a.name.split(",")}


@pytest.mark.parametrize("est", INSTANCES, ids=lambda e: type(e).__name__)
def test_every_fitted_attribute_is_documented(est):
    pytest.importorskip("numpydoc")
    pd = pytest.importorskip("pandas")
    from sklearn.base import clone

    est = clone(est)
    if isinstance(est, SparseCoder):
        est.set_params(dictionary=_rng.standard_normal((6, 5)))
    X = pd.DataFrame(_rng.standard_normal((40, 5)), columns=[f"f{i}" for i in range(5)])
    est.fit(X)
    public = {k for k in vars(est) if k.endswith("_") and not k.startswith("_")}
    public |= {k for k in ("components_", "n_components_", "n_features_in_")
               if isinstance(getattr(type(est), k, None), property)}
    assert "feature_names_in_" in public
    assert public <= _documented_attributes(type(est)), sorted(public - _documented_attributes(
        type(est)))
