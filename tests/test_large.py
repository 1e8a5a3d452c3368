"""Tests of CollapsedDictionaryLearner and its solvers (routing, active-set least
squares); its sparse statistics are tested in test_updates.py."""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
import torch
from sklearn.linear_model import Lasso

from skdict import CollapsedDictionaryLearner
from skdict.datasets import make_sparse_data
from skdict.solvers.active_lstsq import active_lstsq
from skdict.solvers.decode import topk_decode
from skdict.solvers.routing import ClusterIndex, route_approx, route_dense, route_topk

pytestmark = pytest.mark.usefixtures("one_thread")


def _dict(K, P, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(K, P, generator=g, dtype=dtype)
    return D / D.norm(dim=1, keepdim=True)


# ----------------------------------------------------------------------- routing
@pytest.mark.parametrize("tile_size", [1, 7, 64, 100, 160, 1000])
@pytest.mark.parametrize("positive", [False, True])
def test_route_topk_matches_dense(tile_size, positive):
    D = _dict(300, 12)
    X = torch.randn(50, 12, dtype=torch.float64)
    v, i = route_topk(X, D, 5, tile_size=tile_size, positive=positive)
    v0, i0 = route_dense(X, D, 5, positive=positive)
    assert torch.equal(i, i0)
    torch.testing.assert_close(v, v0)


@pytest.mark.parametrize("positive", [False, True])
def test_route_topk_group_selection_is_exact(positive):
    # the device-agnostic path (GPU): tiles divisible by the group size take the
    # two-stage selection
    from skdict.solvers.routing import _route_topk_torch

    D = _dict(1024, 8, seed=1)
    X = torch.randn(200, 8, dtype=torch.float64)
    for s in (1, 4, 16):
        for tile in (512, 100):
            v, i = _route_topk_torch(X, D, s, tile, positive, 16)
            v0, i0 = route_dense(X, D, s, positive=positive)
            assert torch.equal(i, i0)
            torch.testing.assert_close(v, v0)


def test_route_topk_from_a_worker_thread_uses_the_serial_kernel():
    import threading

    D = _dict(500, 16, seed=5)
    X = torch.randn(40, 16, dtype=torch.float64)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", route_topk(X, D, 5)))
    t.start()
    t.join()
    assert torch.equal(out["r"][1], route_dense(X, D, 5)[1])


def test_running_topk_kernel_float32():
    from skdict.solvers._kernels.select import running_topk

    g = torch.Generator().manual_seed(3)
    S = torch.randn(64, 500, generator=g)
    hv = torch.full((64, 7), float("-inf"))
    hi = torch.zeros((64, 7), dtype=torch.long)
    for c0 in range(0, 500, 120):  # tiles of a wider score matrix
        running_topk(S[:, c0:c0 + 120].contiguous().numpy(), c0, hv.numpy(), hi.numpy(),
                     absval=True)
    v, order = hv.sort(1, descending=True)
    v0, i0 = S.abs().topk(7, dim=1)
    assert torch.equal(hi.gather(1, order), i0)
    torch.testing.assert_close(v, v0)


# ------------------------------------------------- certified bfloat16 screening
def _same_top(v, i, v0, i0, X, D, positive):
    """Equal scores (float32 rounding), and equal atoms except where an atom
    left out scores exactly as one kept (a tie at the cut)."""
    torch.testing.assert_close(v, v0, rtol=1e-5, atol=1e-5)
    S = X.double() @ D.double().T
    S = S if positive else S.abs()
    for r in range(X.shape[0]):
        a, b = set(i[r].tolist()), set(i0[r].tolist())
        if a != b:
            cut = float(S[r, i0[r]].min())
            assert all(abs(float(S[r, j]) - cut) <= 1e-5 * max(1.0, cut) for j in a ^ b)


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("s", [1, 7, 40])
def test_screened_routing_is_exact(positive, s):
    g = torch.Generator().manual_seed(s)
    D = _dict(5000, 48, seed=s, dtype=torch.float32)
    D[4000:4010] = D[:10]  # duplicate atoms: exact ties
    X = torch.randn(300, 48, generator=g) * 3
    X[0] = 0  # every score 0: the shortlist stays empty and the row falls back
    v, i = route_topk(X, D, s, positive=positive, screen=True)
    v0, i0 = route_dense(X, D, s, positive=positive)
    assert v.dtype == torch.float32 and i.shape == (300, s)
    assert (v[:, :-1] >= v[:, 1:]).all()  # sorted
    _same_top(v, i, v0, i0, X, D, positive)


def test_screened_routing_falls_back_on_near_ties(monkeypatch):
    # atoms closer than bfloat16 can tell apart: the certificate must fail on
    # those rows and the float32 path give the exact answer
    import skdict.solvers.routing as routing

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 32, generator=g)
    D = base + 1e-4 * torch.randn(4096, 32, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    X = torch.randn(64, 32, generator=g)
    seen = []
    orig = routing._route_topk_cpu
    monkeypatch.setattr(routing, "_route_topk_cpu",
                        lambda Xs, *a: seen.append(Xs.shape[0]) or orig(Xs, *a))
    v, i = route_topk(X, D, 5, screen=True)
    assert sum(seen) == 64  # no row could be certified
    v0, i0 = route_dense(X, D, 5)
    _same_top(v, i, v0, i0, X, D, False)


def test_screened_routing_certifies_separated_rows(monkeypatch):
    import skdict.solvers.routing as routing

    D = _dict(8192, 64, seed=3, dtype=torch.float32)
    X = D[:100] * 5 + 0.01 * torch.randn(100, 64, generator=torch.Generator().manual_seed(1))
    seen = []
    orig = routing._route_topk_cpu
    monkeypatch.setattr(routing, "_route_topk_cpu",
                        lambda Xs, *a: seen.append(Xs.shape[0]) or orig(Xs, *a))
    v, i = route_topk(X, D, 1, screen=True)
    assert sum(seen) == 0  # each row's own atom wins by far: all certified
    assert torch.equal(i[:, 0], torch.arange(100))


@pytest.mark.parametrize("absval", [True, False])
def test_bfloat16_keys_preserve_order(absval):
    from skdict.solvers._kernels.screen import _key_abs, _key_signed, key_values

    bits = np.arange(1 << 16, dtype=np.uint32)
    vals = (bits << 16).view(np.float32)
    finite = np.isfinite(vals)
    keyof = _key_abs if absval else _key_signed
    keys = np.array([keyof(np.uint16(b)) for b in bits[finite]], dtype=np.uint16)
    v = np.abs(vals[finite]) if absval else vals[finite]
    order = np.lexsort((keys, v))  # -0.0 and +0.0 are equal values
    assert (np.diff(keys[order].astype(np.int64)) >= 0).all()  # monotone
    assert (np.diff(v[np.argsort(keys, kind="stable")]) >= 0).all()
    back = key_values(keys, absval=absval)
    np.testing.assert_array_equal(back[keys != 0] if not absval else back,
                                  (v[keys != 0] if not absval else v))


def test_screen_block_lists_every_key_above_its_floor():
    from skdict.solvers._kernels.screen import _key_abs, finish, screen_block

    rng = np.random.default_rng(0)
    S = rng.integers(0, 1 << 16, size=(30, 1000)).astype(np.uint16)
    m = 12
    bk = np.zeros((30, 4 * m), np.uint16)
    bi = np.full((30, 4 * m), -1, np.int64)
    cnt = np.zeros(30, np.int64)
    fk = np.zeros(30, np.uint16)
    for c0 in range(0, 1000, 300):
        screen_block(S[:, c0:c0 + 300].copy(), c0, bk, bi, cnt, fk, m, absval=True, q=3)
    finish(bk, bi, cnt, fk, m)
    keys = S & 0x7FFF
    for r in range(30):
        listed = set(bi[r, :m][bi[r, :m] >= 0].tolist())
        assert len(listed) <= m
        above = set(np.flatnonzero(keys[r] > fk[r]).tolist())
        assert above <= listed  # nothing above the floor is left out
        assert all(keys[r, j] >= fk[r] for j in listed)
        assert all(int(_key_abs(S[r, j])) == int(keys[r, j]) for j in listed)


@pytest.mark.parametrize("absval", [True, False])
def test_rescore_certify_against_numpy(absval):
    from skdict.solvers._kernels.screen import rescore_certify

    rng = np.random.default_rng(1)
    K, P, n, m, s = 300, 16, 40, 12, 5
    D = rng.standard_normal((K, P)).astype(np.float32)
    X = rng.standard_normal((n, P)).astype(np.float32)
    hi = np.stack([rng.choice(K, m, replace=False) for _ in range(n)]).astype(np.int64)
    hi[:4, 3:] = -1  # three listed atoms, fewer than s: never certified
    X[4, 0] = np.nan  # a NaN score fails the certificate
    exact = np.einsum("rp,rap->ra", X, D[np.maximum(hi, 0)])
    key = np.abs(exact) if absval else exact
    key[hi < 0] = -np.inf
    kth = -np.sort(-key, axis=1)[:, s - 1]
    floor = np.where(np.arange(n) % 2 == 0, kth - 0.2, kth + 0.2).astype(np.float32)
    eps = np.full(n, 0.1, np.float32)
    v, i, ok = rescore_certify(X, D, hi, floor, eps, s, absval=absval)
    for r in range(5, n):
        assert ok[r] == (r % 2 == 0)  # floor + eps below the s-th key, or not
        order = np.argsort(-key[r], kind="stable")[:s]
        np.testing.assert_allclose(v[r], key[r, order], rtol=1e-5, atol=1e-5)
        assert set(i[r].tolist()) == set(hi[r, order].tolist())
    assert not ok[:5].any()


def test_screening_is_chosen_only_where_it_is_certified_and_pays(monkeypatch):
    import skdict.solvers.routing as routing

    monkeypatch.setenv("SKDICT_BF16_SCREEN", "1")
    routing.bf16_native.cache_clear()
    try:
        D = _dict(8192, 16, dtype=torch.float32)
        X = torch.randn(4, 16)
        assert routing._screen_pays(X, D, 16)
        assert not routing._screen_pays(X.double(), D.double(), 16)  # float64
        assert not routing._screen_pays(X, D[:2048], 16)  # small dictionary
        assert not routing._screen_pays(X.requires_grad_(), D, 16)  # autograd
        monkeypatch.setenv("SKDICT_BF16_SCREEN", "0")
        routing.bf16_native.cache_clear()
        assert not routing._screen_pays(X.detach(), D, 16)
    finally:
        routing.bf16_native.cache_clear()


def test_route_topk_rejects_bad_s():
    D = _dict(10, 3)
    with pytest.raises(ValueError, match="between 1 and"):
        route_topk(torch.randn(2, 3, dtype=torch.float64), D, 11)


@pytest.mark.parametrize("positive", [False, True])
def test_route_approx_all_probes_is_exact(positive):
    D = _dict(400, 10, seed=2)
    X = torch.randn(80, 10, dtype=torch.float64)
    index = ClusterIndex(D, 12, generator=torch.Generator().manual_seed(0), positive=positive)
    assert int(index.sizes().sum()) == 400
    assert torch.equal(index.order.sort().values, torch.arange(400))
    _, i = route_approx(X, D, 6, index, n_probes=12, positive=positive)
    _, i0 = route_dense(X, D, 6, positive=positive)
    assert torch.equal(i, i0)


@pytest.mark.parametrize("positive", [False, True])
def test_route_approx_faiss_matches_torch_index(positive):
    pytest.importorskip("faiss")
    D = _dict(600, 10, seed=4).float()
    X = torch.randn(90, 10, dtype=torch.float32)
    index = ClusterIndex(D, 15, generator=torch.Generator().manual_seed(0), positive=positive)
    torch_path = [route_approx(X, D, 6, index, n_probes=p, positive=positive)
                  for p in (15, 3)]
    index.attach_faiss(D)
    v, i = route_approx(X, D, 6, index, n_probes=15, positive=positive)
    v0, i0 = route_dense(X, D, 6, positive=positive)
    assert torch.equal(i, i0) and torch.equal(torch_path[0][1], i0)
    torch.testing.assert_close(v, v0)
    # few probes: the clusters the torch path probes (largest |<x, c>|) are among
    # those FAISS probes (largest <x, c> and largest <-x, c>), so the atoms found
    # score at least as high, rank by rank
    v3, _ = route_approx(X, D, 6, index, n_probes=3, positive=positive)
    assert (v3 >= torch_path[1][0] - 1e-6).all()
    # rows whose probed clusters hold fewer than s atoms fall back to exact routing
    _, i1 = route_approx(X, D, 60, index, n_probes=1, positive=positive)
    assert torch.equal(i1.sort(1).values, route_dense(X, D, 60, positive=positive)[1]
                       .sort(1).values) or (i1 >= 0).all()
    assert all(len(set(r)) == 60 for r in i1.tolist())


def test_approximate_routing_fit_torch_index_without_faiss(monkeypatch):
    import skdict.large as large_mod

    monkeypatch.setattr(large_mod, "faiss_available", lambda: False)
    X, D = _planted(seed=1)
    est = CollapsedDictionaryLearner(64, n_nonzero_coefs=3, batch_size=256, max_iter=4,
                                     tol=0, routing="approximate", n_clusters=8,
                                     n_probes=4, random_state=0, device="cpu").fit(X)
    assert _recovered(est.components_, D) >= 0.85


def test_route_approx_recall_grows_with_probes_and_falls_back():
    D = _dict(2000, 16, seed=3)
    # rows close to atoms: the nearest cluster should hold the best atoms
    X = D[:300] + 0.05 * torch.randn(300, 16, dtype=torch.float64)
    index = ClusterIndex(D, 40, generator=torch.Generator().manual_seed(0))
    _, i0 = route_dense(X, D, 4)
    recalls = []
    for p in (1, 4, 40):
        _, i = route_approx(X, D, 4, index, n_probes=p)
        assert all(len(set(r.tolist())) == 4 for r in i)  # distinct atoms
        recalls.append(float((i[:, :, None] == i0[:, None, :]).any(2).float().mean()))
    assert recalls[0] <= recalls[1] <= recalls[2] == 1.0
    assert (i[:, 0] == torch.arange(300)).all()
    # clusters smaller than s force the exact fallback: still correct
    tiny = ClusterIndex(D[:50], 50, n_iter=0)
    _, i = route_approx(X, D[:50], 5, tiny, n_probes=1)
    _, i0 = route_dense(X, D[:50], 5)
    assert torch.equal(i, i0)


# -------------------------------------------------------------- active lstsq
@pytest.mark.parametrize("s", [1, 2, 7, 8, 64])  # even: the 2 x 2 tiled kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_active_gram_kernel_matches_torch(dtype, s):
    from skdict.solvers.active_lstsq import _active_gram_torch, active_gram

    g = torch.Generator().manual_seed(0)
    D = torch.randn(300, 24, generator=g, dtype=dtype)
    X = torch.randn(50, 24, generator=g, dtype=dtype)
    idx = torch.stack([torch.randperm(300, generator=g)[:s] for _ in range(50)])
    idx[0, -1] = idx[0, 0]  # a repeated atom
    G, c = active_gram(X, D, idx)
    G0, c0 = _active_gram_torch(X, D, idx, 16)
    torch.testing.assert_close(G, G0)
    torch.testing.assert_close(c, c0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_cholesky_matches_torch_and_flags_failed_rows(dtype):
    from skdict.solvers._kernels.chol import ridge_cholesky_solve
    from skdict.solvers.active_lstsq import _spd_solve, _spd_solve_torch

    g = torch.Generator().manual_seed(0)
    M = torch.randn(50, 12, 20, generator=g, dtype=dtype)
    G = M @ M.mT
    G[3, 2, 2] = -5.0  # indefinite: the kernel flags it
    G[4] = float("nan")
    c = torch.randn(50, 12, generator=g, dtype=dtype)
    a, bad = ridge_cholesky_solve(G.numpy(), c.numpy(), 1e-7)
    assert bad.tolist() == [i in (3, 4) for i in range(50)]
    ref = _spd_solve_torch(G, c, 1e-7)
    ok = torch.from_numpy(~bad)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(torch.from_numpy(a)[ok], ref[ok], rtol=tol, atol=tol)
    # failed rows go through the guarded torch path (NaN stays NaN)
    out = _spd_solve(G, c, 1e-7)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol, equal_nan=True)


def test_active_lstsq_matches_numpy():
    D = _dict(50, 20, seed=4)
    X = torch.randn(30, 20, dtype=torch.float64)
    idx = torch.stack([torch.randperm(50)[:6] for _ in range(30)])
    a = active_lstsq(X, D, idx, ridge=0.0).codes
    for r in range(30):
        ref = np.linalg.lstsq(D[idx[r]].numpy().T, X[r].numpy(), rcond=None)[0]
        np.testing.assert_allclose(a[r].numpy(), ref, rtol=1e-9, atol=1e-10)


def test_active_lstsq_rank_deficient_is_finite():
    D = _dict(4, 3)
    D[1] = D[0]
    X = torch.randn(5, 3, dtype=torch.float64)
    idx = torch.tensor([[0, 1, 2]] * 5)
    a = active_lstsq(X, D, idx).codes
    assert torch.isfinite(a).all()
    # the fit is still the least-squares fit on span(D[0], D[2])
    ref = np.linalg.lstsq(D[[0, 2]].numpy().T, X.numpy().T, rcond=None)[0].T
    fit = (a[:, None, :] @ D[idx]).squeeze(1)
    np.testing.assert_allclose(fit.numpy(), ref @ D[[0, 2]].numpy(), atol=1e-6)


def test_active_lstsq_nnls_matches_scipy():
    D = _dict(40, 15, seed=5)
    X = torch.randn(25, 15, dtype=torch.float64)
    idx = torch.stack([torch.randperm(40)[:8] for _ in range(25)])
    res = active_lstsq(X, D, idx, positive=True, ridge=0.0, max_iter=5000, tol=1e-12)
    assert (res.codes >= 0).all()
    for r in range(25):
        ref, _ = scipy.optimize.nnls(D[idx[r]].numpy().T, X[r].numpy())
        np.testing.assert_allclose(res.codes[r].numpy(), ref, atol=1e-7)


def test_active_lstsq_l1_matches_sklearn_lasso():
    D = _dict(40, 15, seed=6)
    X = torch.randn(10, 15, dtype=torch.float64)
    idx = torch.stack([torch.randperm(40)[:6] for _ in range(10)])
    alpha = 0.3
    for positive in (False, True):
        res = active_lstsq(X, D, idx, alpha=alpha, positive=positive, ridge=0.0,
                           max_iter=5000, tol=1e-13)
        for r in range(10):
            # sklearn's Lasso divides the squared loss by n_samples (= P here)
            las = Lasso(alpha=alpha / 15, fit_intercept=False, tol=1e-14,
                        max_iter=100000, positive=positive)
            las.fit(D[idx[r]].numpy().T, X[r].numpy())
            np.testing.assert_allclose(res.codes[r].numpy(), las.coef_, atol=1e-7)


# -------------------------------------------------------------------- estimator
def _planted(n=6000, P=40, K=64, s=3, noise=0.01, seed=0, positive=False):
    X, D, _ = make_sparse_data(n, P, K, s, noise=noise, random_state=seed,
                               dtype=np.float32, positive=positive)
    return X, D


def _recovered(learned, true, thr=0.95):
    C = np.abs(learned @ true.T).max(0)
    return float((C >= thr).mean())


@pytest.fixture(scope="module")
def planted_fit():
    X, D = _planted()
    est = CollapsedDictionaryLearner(64, n_nonzero_coefs=3, batch_size=256, max_iter=10,
                                     tol=0, random_state=0, device="cpu")
    est.fit(X)
    return est, X, D


def test_recovers_planted_dictionary(planted_fit):
    est, X, D = planted_fit
    # over random_state 0..15 between 60 and 64 of the 64 atoms are recovered
    assert _recovered(est.components_, D) >= 0.9
    np.testing.assert_allclose(np.linalg.norm(est.components_, axis=1), 1, atol=1e-5)
    assert est.n_iter_ == 10 and est.loss_curve_.shape == (10,)
    assert est.history_["loss"].shape == (est.n_steps_,) and est.n_steps_ == 10 * 24
    assert est.loss_curve_[-1] < 0.5 * est.loss_curve_[0]


def test_recovers_planted_dictionary_positive_codes():
    X, D = _planted(n=6000, positive=True, seed=1)
    est = CollapsedDictionaryLearner(64, n_nonzero_coefs=3, batch_size=256, max_iter=4,
                                     tol=0, positive_code=True, random_state=0, device="cpu")
    codes = est.fit_transform(X)
    assert codes.data.min() >= 0
    assert _recovered(est.components_, D) >= 0.95


def test_approximate_routing_fit():
    X, D = _planted(seed=1)
    est = CollapsedDictionaryLearner(64, n_nonzero_coefs=3, batch_size=256, max_iter=4,
                                     tol=0, routing="approximate", n_clusters=8,
                                     n_probes=4, random_state=0, device="cpu").fit(X)
    assert _recovered(est.components_, D) >= 0.85
    assert est.cluster_centers_.shape == (8, 40) and est.atom_clusters_.shape == (64,)
    # transform uses the fitted index; with every cluster probed it is exact routing
    exact = CollapsedDictionaryLearner(64, n_nonzero_coefs=3, device="cpu")
    exact.components_, exact.n_features_in_ = est.components_, 40
    est.set_params(n_probes=8)
    np.testing.assert_allclose(est.transform(X[:300]).toarray(),
                               exact.transform(X[:300]).toarray(), atol=1e-5)
    est.set_params(n_probes=1)
    assert est.score(X[:300]) <= exact.score(X[:300]) + 1e-7


def test_transform_inverse_transform_score(planted_fit):
    est, X, _ = planted_fit
    codes = est.transform(X[:500])
    assert sp.issparse(codes) and codes.shape == (500, 64) and codes.dtype == np.float32
    assert codes.getnnz(axis=1).max() <= 3
    np.testing.assert_array_equal(codes.indptr, 3 * np.arange(501))  # no exact zeros here
    Xh = est.inverse_transform(codes)
    mse = float(np.mean((X[:500].astype(np.float64) - Xh) ** 2))
    assert est.score(X[:500]) == pytest.approx(-mse, rel=1e-5)
    # matches the naive decode of the fixed-width codes
    idx = torch.from_numpy(codes.indices.reshape(500, 3).astype(np.int64))
    vals = torch.from_numpy(codes.data.reshape(500, 3))
    ref = topk_decode(idx, vals, torch.from_numpy(est.components_))
    np.testing.assert_allclose(Xh, ref.numpy(), rtol=1e-5, atol=1e-6)
    dense = est.set_params(sparse_output=False).transform(X[:50])
    est.set_params(sparse_output=True)
    np.testing.assert_allclose(dense, codes[:50].toarray())
    # the codes are the least-squares fit on each row's active set
    for r in range(5):
        S = codes[r].indices
        ref = np.linalg.lstsq(est.components_[S].T.astype(np.float64), X[r], rcond=None)[0]
        np.testing.assert_allclose(codes[r].data, ref, rtol=1e-3, atol=1e-4)
    # float64 in -> float64 out
    assert est.transform(X[:10].astype(np.float64)).dtype == np.float64


def test_memmap_torch_and_minibatch_inputs_give_the_same_fit(tmp_path):
    X, _ = _planted(n=1200, K=32, P=16)
    kw = dict(n_components=32, n_nonzero_coefs=3, batch_size=200, max_iter=2, tol=0,
              random_state=0, device="cpu", shuffle=False)
    ref = CollapsedDictionaryLearner(**kw).fit(X)
    path = tmp_path / "X.dat"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)
    for data in (mm, torch.from_numpy(X)):
        est = CollapsedDictionaryLearner(**kw).fit(data)
        np.testing.assert_allclose(est.components_, ref.components_, atol=1e-6)
    # a list of minibatches is re-read each epoch; with dict_init the result
    # equals the array fit started from the same dictionary
    kw_init = dict(kw, dict_init=ref.components_)
    a = CollapsedDictionaryLearner(**kw_init).fit(X)
    b = CollapsedDictionaryLearner(**kw_init).fit([X[i:i + 200] for i in range(0, 1200, 200)])
    np.testing.assert_allclose(a.components_, b.components_, atol=1e-6)
    assert b.n_iter_ == 2
    # a generator is a one-shot stream: a single epoch
    with pytest.warns(UserWarning, match="one-pass iterator ran out after 6 steps"):
        c = CollapsedDictionaryLearner(**kw_init).fit(X[i:i + 200] for i in range(0, 1200, 200))
    assert c.n_iter_ == 1 and c.n_steps_ == 6
    np.testing.assert_allclose(c.transform(X[:5]).toarray(),
                               c.transform(torch.from_numpy(X[:5])).toarray())


def test_partial_fit_continues_and_failure_keeps_state():
    X, _ = _planted(n=800, K=32, P=16)
    est = CollapsedDictionaryLearner(32, n_nonzero_coefs=3, batch_size=100, random_state=0,
                                     device="cpu")
    est.partial_fit(X[:400])
    D1 = est.components_.copy()
    steps = est.n_steps_
    bad = X[400:].copy()
    bad[250, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.partial_fit(bad)
    np.testing.assert_array_equal(est.components_, D1)
    assert est.n_steps_ == steps
    with pytest.raises(ValueError, match="features"):
        est.partial_fit(X[:, :5])
    np.testing.assert_array_equal(est.components_, D1)
    est.partial_fit(X[400:])
    assert est.n_steps_ == steps + 4 and est.history_["loss"].shape == (steps + 4,)
    assert not np.allclose(est.components_, D1)
    est2 = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(est2.transform(X[:20]).toarray(),
                                  est.transform(X[:20]).toarray())
    est2.partial_fit(X[:100])  # the pickled learner keeps its statistics
    est.partial_fit(X[:100])
    np.testing.assert_allclose(est2.components_, est.components_, atol=1e-6)


def test_failing_stream_commits_nothing_and_callbacks_stop():
    X, _ = _planted(n=800, K=32, P=16)
    est = CollapsedDictionaryLearner(32, n_nonzero_coefs=3, batch_size=100, random_state=0,
                                     device="cpu").fit(X)
    before = (est.components_.copy(), est.n_steps_, est.history_["loss"].copy(),
              est.loss_curve_.copy())
    bad = X[200:300].copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.partial_fit(iter([X[:100], X[100:200], bad]))  # fails at its third batch
    np.testing.assert_array_equal(est.components_, before[0])
    assert est.n_steps_ == before[1]
    np.testing.assert_array_equal(est.history_["loss"], before[2])
    np.testing.assert_array_equal(est.loss_curve_, before[3])
    # n_steps: exact step count; a callback returning False stops after its step
    kw = dict(n_components=32, n_nonzero_coefs=3, batch_size=100, random_state=0,
              device="cpu")
    est = CollapsedDictionaryLearner(n_steps=11, **kw).fit(X)
    assert est.n_steps_ == 11 and est.n_iter_ == 2 and est.history_["loss"].shape == (11,)
    seen = []
    est = CollapsedDictionaryLearner(max_iter=5, tol=0, callbacks=[
        lambda info: seen.append(info) or info["step"] < 3], **kw).fit(X)
    assert est.n_steps_ == 3 and [m["step"] for m in seen] == [1, 2, 3]
    np.testing.assert_allclose([m["loss"] for m in seen], est.history_["loss"])


def test_fit_is_reproducible_and_tol_stops_early():
    X, _ = _planted(n=1000, K=32, P=16)
    kw = dict(n_components=32, n_nonzero_coefs=3, batch_size=100, random_state=3,
              device="cpu")
    a = CollapsedDictionaryLearner(max_iter=3, tol=0, **kw).fit(X)
    b = CollapsedDictionaryLearner(max_iter=3, tol=0, **kw).fit(X)
    np.testing.assert_array_equal(a.components_, b.components_)
    c = CollapsedDictionaryLearner(max_iter=50, tol=0.5, **kw).fit(X)
    assert c.n_iter_ < 50


def test_parameter_errors():
    X = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="n_nonzero_coefs=5 exceeds n_components=4"):
        CollapsedDictionaryLearner(4, n_nonzero_coefs=5, device="cpu").fit(X)
    with pytest.raises(ValueError, match="n_candidates=1 is below n_nonzero_coefs=2"):
        CollapsedDictionaryLearner(4, n_nonzero_coefs=2, n_candidates=1, device="cpu").fit(X)
    with pytest.raises(ValueError, match="dict_init has shape"):
        CollapsedDictionaryLearner(4, n_nonzero_coefs=2, dict_init=np.ones((3, 6)),
                                   device="cpu").fit(X)
    with pytest.raises(ValueError, match="routing"):
        CollapsedDictionaryLearner(4, routing="fast", device="cpu").fit(X)
    with pytest.raises(ValueError, match="empty"):
        CollapsedDictionaryLearner(4, n_nonzero_coefs=2, device="cpu").fit(iter([]))
    est = CollapsedDictionaryLearner(4, n_nonzero_coefs=2, max_iter=1, device="cpu").fit(X)
    with pytest.raises(ValueError, match="components"):
        est.inverse_transform(np.zeros((2, 5)))


def test_l1_codes_are_shrunk(planted_fit):
    est, X, _ = planted_fit
    l1 = CollapsedDictionaryLearner(64, n_nonzero_coefs=3, alpha=0.5, device="cpu")
    l1.components_ = est.components_
    l1.n_features_in_ = est.n_features_in_
    c0 = est.transform(X[:200])
    c1 = l1.transform(X[:200])
    assert abs(c1).sum() < abs(c0).sum()
    assert c1.getnnz(axis=1).max() <= 3


# ---------------------------------------------------------------- memory contract
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from skdict import CollapsedDictionaryLearner

    K, P, N, s = 16384, 16, 16384, 4
    budget = 640 * 2**20          # bytes of address space allowed beyond the baseline
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, P)).astype(np.float32)
    # warm up every code path (threads, allocator arenas, lazy imports) on a
    # tiny problem before the limit is set
    CollapsedDictionaryLearner(64, n_nonzero_coefs=s, batch_size=256, max_iter=1,
                               device="cpu").fit(X[:512]).transform(X[:10])
    def vmsize():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    limit = vmsize() + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # the contract: K x K float32 (1 GiB) and N x K float32 (1 GiB) exceed the budget
    for shape in ((K, K), (N, K)):
        try:
            torch.empty(shape, dtype=torch.float32).fill_(0)
        except (RuntimeError, MemoryError):
            pass
        else:
            sys.exit("the budget does not exclude a %s block" % (shape,))
    est = CollapsedDictionaryLearner(K, n_nonzero_coefs=s, tile_size=2048,
                                     batch_size=1024, max_iter=1, random_state=0,
                                     device="cpu")
    est.fit(X)
    codes = est.transform(X)
    assert codes.shape == (N, K) and codes.nnz <= N * s
    Xh = est.inverse_transform(codes)
    score = est.score(X)
    assert np.isfinite(score) and Xh.shape == (N, P)
    print("OK", est.n_steps_, codes.nnz, score)
    """
)


def test_memory_contract_no_dense_K_by_K_or_N_by_K():
    """Fit / transform / inverse_transform / score with K = N = 16,384 under an
    address-space limit of baseline + 640 MiB, set with ``RLIMIT_AS`` in a fresh
    subprocess. Any dense K x K or N x K float32 block (1 GiB each) would fail
    to allocate; the script first checks that such blocks are indeed refused.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("OK")
