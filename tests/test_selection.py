"""Tests of SparseTokenSelector and the token-selection metrics."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.linear_model import Lasso
from sklearn.model_selection import GridSearchCV

from skdict import SparseTokenSelector
from skdict.metrics import (
    attention_mass_captured,
    budget_adherence,
    output_fidelity,
    realized_nnz,
    recall_at_k,
)
from skdict.solvers import lasso_exact, power_iteration

METHODS = ["lasso", "threshold", "sparsemax", "topk"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=120, d=8, nq=15, seed=0):
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((n, d))
    Q = 2 * rng.standard_normal((nq, d))
    return T, Q


def _softmax(S):
    e = np.exp(S - S.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _simplex_oracle(z):
    """Projection onto the simplex by bisection on tau (not sort-based)."""
    lo, hi = z.max() - 1.0, z.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(z - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(z - 0.5 * (lo + hi), 0)


def test_sparsemax_matches_reference_projection():
    T, Q = _data()
    sel = SparseTokenSelector(method="sparsemax", scale=3.0, device="cpu").fit(T)
    W = sel.transform(Q).toarray()
    S = sel.attention_scores(Q)
    ref = np.array([_simplex_oracle(s) for s in S])
    np.testing.assert_allclose(W, ref, atol=1e-6)
    assert (W.astype(bool) == (ref > 1e-9)).all()


def test_lasso_selection_is_exact_lasso_support():
    T, Q = _data(n=60, d=6, nq=12)
    alpha = 0.4
    sel = SparseTokenSelector(method="lasso", alpha=alpha, empty="zero", device="cpu")
    W = sel.fit(T).transform(Q)
    Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
    G = torch.from_numpy(Tn @ Tn.T)
    res = lasso_exact(torch.from_numpy(Q @ Tn.T), G, alpha, L=power_iteration(G))
    coef = res.codes.numpy()
    assert res.converged
    np.testing.assert_array_equal(W.toarray() != 0, coef != 0)
    # and against scikit-learn's coordinate descent (objective / n_features)
    for i in range(4):
        ls = Lasso(alpha=alpha / Q.shape[1], fit_intercept=False, tol=1e-12,
                   max_iter=100000).fit(Tn.T, Q[i])
        np.testing.assert_allclose(ls.coef_, coef[i], atol=1e-6)
    # weights: softmax of the scores over the support
    S = sel.attention_scores(Q)
    for i in range(len(Q)):
        s = coef[i] != 0
        if s.any():
            np.testing.assert_allclose(W.toarray()[i, s], _softmax(S[i : i + 1, s])[0])


def test_lasso_working_set_over_tiles(monkeypatch):
    import skdict.selection as mod

    T, Q = _data(n=400, d=10, nq=8, seed=1)
    ref = SparseTokenSelector(method="lasso", alpha=0.3, device="cpu").fit(T)
    monkeypatch.setattr(mod, "_LASSO_INIT", 2)
    monkeypatch.setattr(mod, "_LASSO_ADD", 1)
    tiled = SparseTokenSelector(method="lasso", alpha=0.3, tile_size=33, device="cpu")
    W1 = ref.transform(Q)
    W2 = tiled.fit(T).transform(Q)
    np.testing.assert_array_equal(W1.toarray() != 0, W2.toarray() != 0)
    np.testing.assert_allclose(W1.toarray(), W2.toarray(), atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [{"keep_ratio": 0.05}, {"max_tokens": 3},
                                    {"keep_ratio": 0.5, "max_tokens": 2}])
def test_budget_never_exceeded(method, budget):
    T, Q = _data()
    sel = SparseTokenSelector(method=method, alpha=0.1, device="cpu", **budget)
    W = sel.fit(T).transform(Q)
    k = min(int(np.ceil(budget.get("keep_ratio", 1.0) * len(T))),
            budget.get("max_tokens", len(T)))
    assert realized_nnz(W)["max"] <= k
    assert budget_adherence(W, k) == 1.0
    np.testing.assert_allclose(np.asarray(W.sum(1)).ravel(), 1.0, atol=1e-12)
    assert (W.data > 0).all()


def test_threshold_formula_and_empty_rows():
    T, Q = _data()
    sel = SparseTokenSelector(method="threshold", alpha=1.0, device="cpu").fit(T)
    W = sel.transform(Q).toarray()
    S = sel.attention_scores(Q)
    lam = np.abs(S).mean(1, keepdims=True)
    U = np.maximum(S - lam, 0)
    np.testing.assert_allclose(W, U / U.sum(1, keepdims=True), atol=1e-12)
    # nothing passes a huge threshold: argmax fallback, or an empty row
    big = SparseTokenSelector(method="threshold", alpha=1e6, device="cpu").fit(T)
    Wb = big.transform(Q).toarray()
    np.testing.assert_array_equal(Wb.argmax(1), S.argmax(1))
    assert (Wb.sum(1) == 1).all() and ((Wb != 0).sum(1) == 1).all()
    z = big.set_params(empty="zero").transform(Q)
    assert z.nnz == 0 and z.shape == (len(Q), len(T))


def test_topk_is_softmax_over_kept():
    T, Q = _data()
    sel = SparseTokenSelector(method="topk", max_tokens=7, device="cpu").fit(T)
    W = sel.transform(Q).toarray()
    S = sel.attention_scores(Q)
    for i in range(len(Q)):
        top = np.argsort(-S[i])[:7]
        ref = np.zeros(len(T))
        ref[top] = _softmax(S[i : i + 1, top])[0]
        np.testing.assert_allclose(W[i], ref, atol=1e-12)
    full = SparseTokenSelector(method="topk", device="cpu").fit(T).transform(Q)
    np.testing.assert_allclose(full.toarray(), _softmax(S), atol=1e-12)


@pytest.mark.parametrize("method", ["threshold", "sparsemax", "topk"])
@pytest.mark.parametrize("budget", [None, 0.1])
def test_tiling_matches_single_tile(method, budget):
    T, Q = _data(n=500, d=6, nq=9)
    kw = dict(method=method, keep_ratio=budget, alpha=0.5, scale=2.0, device="cpu")
    W1 = SparseTokenSelector(**kw).fit(T).transform(Q)
    W2 = SparseTokenSelector(tile_size=37, batch_size=4, **kw).fit(T).transform(Q)
    np.testing.assert_allclose(W1.toarray(), W2.toarray(), atol=1e-12)


def test_inverse_transform_support_dtype_and_dense_output():
    T, Q = _data()
    V = np.random.default_rng(3).standard_normal((len(T), 5))
    sel = SparseTokenSelector(method="topk", keep_ratio=0.1, device="cpu")
    sel.fit(T, values=V)
    W = sel.transform(Q)
    assert sp.issparse(W) and W.shape == (len(Q), len(T))
    np.testing.assert_allclose(sel.inverse_transform(W), W @ V, atol=1e-12)
    np.testing.assert_allclose(sel.inverse_transform(W.toarray()), W @ V, atol=1e-12)
    sup = sel.get_support(Q)
    for i, s in enumerate(sup):
        np.testing.assert_array_equal(s, np.flatnonzero(W.toarray()[i]))
    W32 = sel.transform(Q.astype(np.float32))
    assert W32.dtype == np.float32
    Wt = sel.transform(torch.from_numpy(Q))
    np.testing.assert_allclose(Wt.toarray(), W.toarray())
    dense = sel.set_params(sparse_output=False).transform(Q)
    np.testing.assert_allclose(dense, W.toarray())


def test_errors():
    T, Q = _data()
    with pytest.raises(ValueError, match="max_tokens=500 exceeds"):
        SparseTokenSelector(max_tokens=500, device="cpu").fit(T)
    with pytest.raises(ValueError, match="values must have shape"):
        SparseTokenSelector(device="cpu").fit(T, values=np.ones((3, 2)))
    sel = SparseTokenSelector(device="cpu").fit(T)
    with pytest.raises(ValueError, match="features"):
        sel.transform(Q[:, :3])
    with pytest.raises(ValueError, match="method"):
        SparseTokenSelector(method="softmax").fit(T)


def test_score_is_fidelity_minus_compute_and_gridsearch():
    T, Q = _data(n=200, d=8, nq=20)
    sel = SparseTokenSelector(method="topk", keep_ratio=0.1, compute_cost=0.0,
                              scale=1.0, device="cpu").fit(T)
    W = sel.transform(Q)
    S = sel.attention_scores(Q)
    rel = output_fidelity(W, S, T, per_query=True)
    assert sel.score(Q) == pytest.approx(1 - rel.mean(), abs=1e-10)
    sel.set_params(compute_cost=0.5)
    assert sel.score(Q) == pytest.approx(1 - rel.mean() - 0.5 * 0.1, abs=1e-10)
    # cost 0: the largest budget wins; with a compute cost an interior one
    grid = {"keep_ratio": [0.02, 0.1, 0.3, 1.0]}
    X = np.vstack([T, Q])
    # fit on the tokens, score the queries against them
    cv = [(np.arange(len(T)), np.arange(len(T), len(X)))]

    gs0 = GridSearchCV(SparseTokenSelector(method="topk", scale=1.0, compute_cost=0.0,
                                           device="cpu"), grid, cv=cv).fit(X)
    assert gs0.best_params_["keep_ratio"] == 1.0
    gs1 = GridSearchCV(SparseTokenSelector(method="topk", scale=1.0, compute_cost=1.0,
                                           device="cpu"), grid, cv=cv).fit(X)
    assert gs1.best_params_["keep_ratio"] in (0.1, 0.3)


def test_many_tokens_tiled_top_k():
    rng = np.random.default_rng(0)
    T = rng.standard_normal((50_000, 16)).astype(np.float32)
    Q = rng.standard_normal((4, 16)).astype(np.float32)
    sel = SparseTokenSelector(method="topk", max_tokens=20, tile_size=4096,
                              device="cpu").fit(T)
    W = sel.transform(Q)
    Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
    S = Q @ Tn.T
    for i in range(len(Q)):
        np.testing.assert_array_equal(np.sort(np.argsort(-S[i])[:20]), W[i].indices)


def test_metrics_against_definitions():
    rng = np.random.default_rng(0)
    S = rng.standard_normal((6, 30))
    V = rng.standard_normal((30, 4))
    A = _softmax(S)
    W = np.zeros_like(S)
    for i in range(6):
        top = np.argsort(-S[i])[:5]
        W[i, top] = A[i, top] / A[i, top].sum()
    W[0, :] = 0
    W[0, [0, 1]] = 0.5
    mass = attention_mass_captured(sp.csr_matrix(W), S, per_query=True)
    np.testing.assert_allclose(mass[1:], np.sort(A[1:], 1)[:, -5:].sum(1))
    assert mass[0] == pytest.approx(A[0, :2].sum())
    rec = recall_at_k(torch.from_numpy(W), S, 5, per_query=True)
    np.testing.assert_allclose(rec[1:], 1.0)
    assert rec[0] == pytest.approx(len({0, 1} & set(np.argsort(-S[0])[:5])) / 5)
    rel = output_fidelity(W, S, V)
    assert rel == pytest.approx(np.linalg.norm(W @ V - A @ V) / np.linalg.norm(A @ V))
    assert output_fidelity(A, S, V) == pytest.approx(0, abs=1e-12)
    nnz = realized_nnz(W)
    assert nnz == {"mean": (2 + 25) / 6, "max": 5, "min": 2}
    assert budget_adherence(W, 4) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="shape"):
        attention_mass_captured(W[:, :5], S)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(W, S, 0)


def test_failed_refit_keeps_the_previous_tokens_and_feature_count():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((20, 6))
    sel = SparseTokenSelector(method="topk", max_tokens=3, device="cpu").fit(tokens)
    with pytest.raises(ValueError, match="values must have shape"):
        sel.fit(rng.standard_normal((10, 4)), values=np.zeros((3, 2)))
    assert sel.n_features_in_ == 6 and sel.tokens_.shape == (20, 6)
    assert sel.transform(tokens[:2]).shape == (2, 20)
