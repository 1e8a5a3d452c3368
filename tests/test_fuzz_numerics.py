"""Fuzz tests of inputs, numerics at the edges, convergence reporting and
reproducibility across input containers."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning
from torch.utils.data import DataLoader, TensorDataset

from skdict import (
    CollapsedDictionaryLearner,
    KSparseAutoencoder,
    LCASparseCoder,
    SparseCoder,
    SparseTokenSelector,
)
from skdict.functional import sparse_encode

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 6)).astype(np.float32)
DICT = RNG.standard_normal((10, 6))
DICT /= np.linalg.norm(DICT, axis=1, keepdims=True)


# ------------------------------------------------------------------ inputs
def test_dataloader_of_tensordataset_batches_fits_like_a_list_of_arrays():
    """[x] batches of a DataLoader over a TensorDataset are read as the arrays x
    (a stream: initialised from its first batch, like any list of batches)."""
    loader = DataLoader(TensorDataset(torch.from_numpy(X)), batch_size=16)
    batches = [X[i : i + 16] for i in range(0, len(X), 16)]
    for make in (lambda: KSparseAutoencoder(8, k=2, batch_size=16, max_iter=2, shuffle=False,
                                            random_state=0, device="cpu"),
                 lambda: LCASparseCoder(8, alpha=0.1, batch_size=16, max_iter=2,
                                        shuffle=False, random_state=0, device="cpu")):
        a = make().fit(loader).components_
        b = make().fit(batches).components_
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ scale
@FUZZ
@given(exponent=st.integers(-6, 6))
def test_lca_learning_is_scale_equivariant(exponent):
    """Scaling X and alpha by the same factor scales the codes and leaves the
    learned dictionary unchanged (no absolute epsilon such as A_jj > 1e-10)."""
    s = 10.0 ** exponent
    X64 = X.astype(np.float64)
    kw = dict(n_components=8, max_iter=2, batch_size=16, fit_algorithm="exact",
              transform_algorithm="exact", random_state=0, device="cpu")
    a = LCASparseCoder(alpha=0.1, **kw).fit(X64)
    b = LCASparseCoder(alpha=0.1 * s, **kw).fit(X64 * s)
    np.testing.assert_allclose(b.components_, a.components_, atol=1e-8)
    np.testing.assert_allclose(b.transform(X64[:8] * s).toarray() / s,
                               a.transform(X64[:8]).toarray(), atol=1e-8)


@pytest.mark.parametrize("algorithm", ["exact", "fista", "ista", "lca"])
@pytest.mark.parametrize("scale", [1e-19, 1e19, 1e30])
def test_solvers_scale_relative_in_float32(algorithm, scale):
    """float32 data near 1e19-1e30 (squares overflow float32): codes scale with the
    data, as the lasso's do."""
    Xs = (X[:8] * scale).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = sparse_encode(X[:8].astype(np.float64), DICT, algorithm=algorithm, alpha=0.2,
                            max_iter=3000, device="cpu")
        got = sparse_encode(Xs, DICT.astype(np.float32), algorithm=algorithm,
                            alpha=0.2 * scale, max_iter=3000, device="cpu")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got / scale, ref, atol=2e-3)


def test_huge_values_raise_or_learn_never_internal_errors():
    for est in (CollapsedDictionaryLearner(8, n_nonzero_coefs=2, batch_size=32, max_iter=1,
                                           random_state=0, device="cpu"),
                LCASparseCoder(8, alpha=1e19, max_iter=1, batch_size=32, random_state=0,
                               device="cpu"),
                KSparseAutoencoder(8, k=2, n_steps=3, batch_size=32, random_state=0,
                                   device="cpu")):
        try:
            est.fit(X * 1e19)
        except ValueError as exc:
            assert "non-finite" in str(exc) and ("X" in str(exc))
        else:
            assert np.isfinite(est.components_).all()
            assert np.isfinite(est.transform(X * 1e19).data).all()


@FUZZ
@given(tau=st.floats(1e-4, 1.0))
def test_lca_divergence_is_detected(tau):
    lca = LCASparseCoder(8, alpha=0.1, max_iter=1, random_state=0, fit_algorithm="lca",
                         transform_algorithm="lca", device="cpu").fit(X)
    L = float(np.linalg.eigvalsh(lca.components_ @ lca.components_.T).max())
    lca.set_params(tau=tau * L / 2 * 0.5)  # below the stable range
    with pytest.raises(ValueError, match="tau"):
        lca.transform(X)
    with pytest.raises(ValueError, match="tau"):
        LCASparseCoder(8, alpha=0.1, tau=1e-4, max_iter=1, random_state=0,
                       fit_algorithm="lca", device="cpu").fit(X)


@FUZZ
@given(exponent=st.integers(15, 37), method=st.sampled_from(["topk", "threshold", "sparsemax"]))
def test_selector_extreme_float32_tokens(exponent, method):
    """float32 tokens whose dot products overflow: weights are finite, or a clear
    ValueError says so."""
    T = (X / np.abs(X).max() * 10.0 ** exponent * 0.9).astype(np.float32)
    sel = SparseTokenSelector(method=method, max_tokens=4, device="cpu")
    try:
        W = sel.fit(T).transform(T[:5])
    except ValueError as exc:
        assert "X" in str(exc) or "token" in str(exc)
        return
    assert np.isfinite(W.data).all()
    np.testing.assert_allclose(np.asarray(W.sum(axis=1)).ravel(), 1.0, rtol=1e-5)


# ------------------------------------------------------------------ convergence
@pytest.mark.parametrize("algorithm", ["fista", "ista", "lca"])
def test_convergence_warning_when_tolerance_not_met(algorithm):
    with pytest.warns(ConvergenceWarning, match=f"algorithm='{algorithm}'.*max_iter=2"):
        sparse_encode(X, DICT, algorithm=algorithm, alpha=0.05, max_iter=2, device="cpu")
    with pytest.warns(ConvergenceWarning, match="transform_max_iter=2"):
        SparseCoder(DICT, algorithm=algorithm, alpha=0.05, transform_max_iter=2,
                    device="cpu").transform(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        sparse_encode(X[:8], DICT, algorithm=algorithm, alpha=0.3, max_iter=5000, tol=1e-3,
                      device="cpu")
    lca = LCASparseCoder(8, alpha=0.05, max_iter=1, fit_max_iter=2, random_state=0,
                         fit_algorithm="lca", transform_algorithm=algorithm, transform_max_iter=2,
                         device="cpu").fit(X)
    # fit's capped inference is recorded per minibatch, not warned about
    assert set(lca.history_["converged"]) <= {0.0, 1.0}
    assert lca.history_["converged"].min() == 0.0
    with pytest.warns(ConvergenceWarning, match="inference_tol"):
        lca.score(X)


# ------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("shuffle", [True, "blocks", False])
def test_same_seed_same_model_for_every_container(tmp_path, shuffle):
    mm = np.memmap(tmp_path / "x.dat", dtype=np.float32, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    kinds = {"numpy": X, "torch": torch.from_numpy(X.copy()),
             "memmap": np.memmap(tmp_path / "x.dat", dtype=np.float32, mode="r",
                                 shape=X.shape),
             "fortran": np.asfortranarray(X)}
    for make in (lambda: KSparseAutoencoder(8, k=2, n_steps=5, batch_size=16, shuffle=shuffle,
                                            random_state=3, device="cpu"),
                 lambda: LCASparseCoder(8, alpha=0.1, max_iter=2, batch_size=16,
                                        shuffle=shuffle, random_state=3, device="cpu")):
        ref = make().fit(X).components_
        for name, Xk in kinds.items():
            np.testing.assert_array_equal(make().fit(Xk).components_, ref, err_msg=name)


@pytest.mark.parametrize("exponent", [19, 25, 37])
def test_selector_lasso_rejects_overflowing_float32_scores(exponent):
    T = (X / np.abs(X).max() * 10.0 ** exponent * 0.9).astype(np.float32)
    with pytest.raises(ValueError, match="overflow float32"):
        SparseTokenSelector(method="lasso", device="cpu").fit(T)
    sel = SparseTokenSelector(method="lasso", device="cpu").fit(X)
    with pytest.raises(ValueError, match="overflow float32"):
        sel.transform(T[:3])
