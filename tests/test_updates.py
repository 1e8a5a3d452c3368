"""skdict.updates: atoms (init, projection, resampling, forgetting schedule against
scikit-learn), online statistics and BCD (compiled kernels against their torch
references), Hebbian step, sparse statistics."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import MiniBatchDictionaryLearning, sparse_encode

from skdict.updates import (
    OnlineStats,
    SparseStats,
    bcd_update,
    dead_atoms,
    forgetting_factor,
    hebbian_update,
    init_atoms,
    project_unit_norm,
    refresh_atoms,
    resample_dead_atoms,
    statistics_update,
    update_since_used,
)
from skdict.updates.online import bcd_update_torch, statistics_update_torch
from skdict.updates.sparse_stats import batch_cooccurrence

pytestmark = pytest.mark.usefixtures("one_thread")


def _dict(K, P, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(K, P, generator=g, dtype=dtype)
    return D / D.norm(dim=1, keepdim=True)


def _dense_codes(idx, vals, K):
    A = torch.zeros(idx.shape[0], K, dtype=vals.dtype)
    A.scatter_(1, idx, vals)
    return A


# ------------------------------------------------------------ forgetting schedule
@pytest.mark.parametrize("b", [1, 2, 4, 7])
def test_forgetting_factor_is_sklearns_update_inner_stats(b):
    # sklearn's _update_inner_stats on A = 1: A <- beta + (code^T code = 0) / b
    est = MiniBatchDictionaryLearning(n_components=1)
    for step in range(3 * b + 5):
        est._A, est._B = np.ones((1, 1)), np.ones((1, 1))
        est._update_inner_stats(np.zeros((b, 1)), np.zeros((b, 1)), b, step)
        assert forgetting_factor(step, b) == est._A[0, 0], (step, b)


def test_statistics_match_sklearn_minibatch_steps():
    # scikit-learn's A, B after partial_fit steps (both branches of the schedule:
    # steps < b - 1 and after), reproduced from its codes with our update
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6))
    b, K, alpha = 4, 5, 0.3
    D0 = rng.standard_normal((K, 6))
    D0 /= np.linalg.norm(D0, axis=1, keepdims=True)
    est = MiniBatchDictionaryLearning(n_components=K, alpha=alpha, batch_size=b,
                                      fit_algorithm="lars", dict_init=D0.copy(),
                                      random_state=0)
    A = torch.zeros(K, K, dtype=torch.float64)
    B = torch.zeros(K, 6, dtype=torch.float64)
    D_before = D0
    for step in range(8):
        Xb = X[step * b:(step + 1) * b]
        code = sparse_encode(Xb, D_before, algorithm="lasso_lars", alpha=alpha)
        est.partial_fit(Xb)
        statistics_update(A, B, torch.from_numpy(code), torch.from_numpy(Xb),
                          forgetting_factor(step, b))
        np.testing.assert_allclose(A.numpy(), est._A, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(B.numpy(), est._B.T, rtol=1e-10, atol=1e-12)
        D_before = est.components_.copy()
    assert est.n_steps_ == 8 and np.abs(A.numpy()).sum() > 0


def test_forgetting_window_caps_the_memory():
    b = 16
    assert forgetting_factor(0, b) == pytest.approx(1 / (b + 1))
    betas = [forgetting_factor(t, b) for t in range(5000)]
    assert all(0 < x < 1 for x in betas)
    assert all(x <= y for x, y in zip(betas[:-1], betas[1:], strict=True))
    assert betas[-1] > 0.99
    # capped: the steady rate b / (window + 1) once the window is reached
    for t in (100, 1_000, 10_000):
        assert forgetting_factor(t, b, window=200) == pytest.approx((201 - b) / 201)
    assert forgetting_factor(1, b, window=200) == forgetting_factor(1, b)
    assert forgetting_factor(50, b, window=4) == pytest.approx(1 / (b + 1))


# ------------------------------------------------ online statistics and BCD sweep
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_statistics_and_sweep_match_torch_references(dtype):
    g = torch.Generator().manual_seed(0)
    K, P, n = 40, 12, 200
    D = torch.randn(K, P, generator=g, dtype=dtype)
    D /= D.norm(dim=1, keepdim=True)
    codes = torch.randn(n, K, generator=g, dtype=dtype) * (torch.rand(n, K, generator=g) < 0.1)
    codes[:, 5] = 0  # an unused atom: left as is
    X = torch.randn(n, P, generator=g, dtype=dtype)
    A = torch.rand(K, K, generator=g, dtype=dtype) * 0.01
    A = A + A.T
    A[5, :] = 0
    A[:, 5] = 0
    B = torch.rand(K, P, generator=g, dtype=dtype) * 0.01
    A_ref, B_ref = statistics_update_torch(A.clone(), B.clone(), codes, X, 0.9)
    torch.testing.assert_close(A_ref, 0.9 * A + codes.T @ codes / n, rtol=0, atol=1e-6)
    statistics_update(A, B, codes, X, 0.9)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(A, A_ref, rtol=0, atol=tol)
    torch.testing.assert_close(B, B_ref, rtol=0, atol=tol)
    ref = bcd_update_torch(D.clone(), A, B)
    # the reference is the sequential Mairal sweep
    seq = D.clone()
    for j in range(K):
        if A[j, j] > 1e-10:
            d = seq[j] + (B[j] - A[j] @ seq) / A[j, j]
            seq[j] = d / d.norm()
    torch.testing.assert_close(ref, seq, rtol=0, atol=tol)
    out = bcd_update(D.clone(), A, B)
    torch.testing.assert_close(out, ref, rtol=0, atol=10 * tol)
    torch.testing.assert_close(out[5], D[5], rtol=0, atol=0)
    # two passes of the compiled sweep = two passes of the reference
    torch.testing.assert_close(bcd_update(D.clone(), A, B, n_passes=2),
                               bcd_update_torch(D.clone(), A, B, n_passes=2),
                               rtol=0, atol=10 * tol)


def test_bcd_sweep_decreases_the_surrogate():
    # each atom update is the exact minimiser of 0.5 tr(D^T A D) - tr(D^T B) over
    # that atom, followed by the projection: the surrogate does not increase
    g = torch.Generator().manual_seed(1)
    K, P, n = 16, 8, 100
    codes = torch.randn(n, K, generator=g, dtype=torch.float64)
    codes *= torch.rand(n, K, generator=g) < 0.3
    X = torch.randn(n, P, generator=g, dtype=torch.float64)
    A, B = statistics_update(torch.zeros(K, K, dtype=torch.float64),
                             torch.zeros(K, P, dtype=torch.float64), codes, X, 0.0)

    def surrogate(D):
        return float(0.5 * torch.trace(D.T @ A @ D) - torch.trace(D.T @ B))

    D = _dict(K, P, seed=2)
    values = [surrogate(D)]
    for _ in range(4):
        bcd_update(D, A, B)
        values.append(surrogate(D))
    assert all(v1 <= v0 + 1e-12 for v0, v1 in zip(values[:-1], values[1:], strict=True))
    assert values[-1] < values[0]


# -------------------------------------------------------------------- Hebbian
def test_hebbian_update_is_a_projected_gradient_step():
    g = torch.Generator().manual_seed(3)
    D = _dict(10, 6, seed=3)
    X = torch.randn(30, 6, generator=g, dtype=torch.float64)
    codes = torch.randn(30, 10, generator=g, dtype=torch.float64)
    Dg = D.clone().requires_grad_(True)
    loss = 0.5 * ((X - codes @ Dg) ** 2).sum() / 30
    loss.backward()
    step = D - 0.05 * Dg.grad
    expect = step / step.norm(dim=1, keepdim=True)
    out = hebbian_update(D, X, codes, 0.05)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(D, _dict(10, 6, seed=3))  # input left untouched


# --------------------------------------------------------------------- atoms
def test_init_atoms_from_rows_with_gaussian_fallback():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 8, generator=g, dtype=torch.float64) * 3
    rows[2] = 0  # a zero row gives a Gaussian atom
    D = init_atoms(7, 8, rows=rows, generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)
    assert D.shape == (7, 8) and D.dtype == torch.float64
    torch.testing.assert_close(D.norm(dim=1), torch.ones(7, dtype=torch.float64))
    cos = (D[:5] * rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)).sum(1)
    keep = torch.tensor([0, 1, 3, 4])
    assert (cos[keep] > 0.999).all() and (cos[keep] < 1 - 1e-8).all()  # row + small noise
    # the fallback atoms (zero row, rows missing) are far from every data row
    far = torch.tensor([2, 5, 6])
    C = (D[far] @ (rows[keep] / rows[keep].norm(dim=1, keepdim=True)).T).abs()
    assert (C < 0.99).all()
    # same generator state, same atoms; "gaussian" ignores the rows
    again = init_atoms(7, 8, rows=rows, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    torch.testing.assert_close(D, again, rtol=0, atol=0)
    G = init_atoms(7, 8, rows=rows, method="gaussian",
                   generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = torch.randn(7, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(G, ref / ref.norm(dim=1, keepdim=True))
    torch.testing.assert_close(G[far], D[far])  # the same Gaussian fallback
    # more rows than atoms: the first rows are used
    D3 = init_atoms(3, 8, rows=rows, noise=0.0, dtype=torch.float64)
    torch.testing.assert_close(D3[[0, 1]], rows[[0, 1]] / rows[[0, 1]].norm(dim=1,
                                                                              keepdim=True))
    # a given dictionary: normalised, its zero atom replaced by the Gaussian one
    given = rows[:4].clone()
    D4 = init_atoms(4, 8, init=given, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    torch.testing.assert_close(D4[[0, 1, 3]], given[[0, 1, 3]]
                               / given[[0, 1, 3]].norm(dim=1, keepdim=True))
    torch.testing.assert_close(D4[2], G[2])
    with pytest.raises(ValueError, match=r"dict_init has shape \(4, 8\), expected"):
        init_atoms(5, 8, init=given, name="dict_init")
    with pytest.raises(ValueError, match="method"):
        init_atoms(3, 8, method="pca")
    with pytest.raises(ValueError, match="features"):
        init_atoms(3, 4, rows=rows)


def test_project_unit_norm_in_place_or_not_and_fallback():
    M = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    out = project_unit_norm(M)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, 1.0]],
                                                 dtype=torch.float64))
    assert M[0, 0] == 3.0  # not in place
    fb = torch.tensor([[9.0, 9.0], [1.0, 0.0], [9.0, 9.0]], dtype=torch.float64)
    same = project_unit_norm(M, inplace=True, fallback=fb)
    assert same is M
    torch.testing.assert_close(M, torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]],
                                               dtype=torch.float64))


def test_since_used_and_dead_atoms():
    since = torch.tensor([0, 5, 10, 3])
    update_since_used(since, torch.tensor([True, False, False, True]), 4)
    assert since.tolist() == [0, 9, 14, 0]
    assert dead_atoms(since, 10).tolist() == [False, False, True, False]
    assert dead_atoms(since, 9).tolist() == [False, True, True, False]
    assert not dead_atoms(since, 0).any() and not dead_atoms(since, None).any()


def _resample_problem(K=12, P=5):
    D = _dict(K, P)
    R = torch.zeros(8, P, dtype=torch.float64)
    R[3] = torch.arange(1.0, P + 1)
    R[5] = -torch.ones(P)
    return D, R


def test_resampling_replaces_only_dead_atoms_and_zeroes_dense_statistics():
    K, P = 12, 5
    D, R = _resample_problem(K, P)
    D0 = D.clone()
    g = torch.Generator().manual_seed(0)
    A = torch.rand(K, K, generator=g, dtype=torch.float64) + 1
    B = torch.rand(K, P, generator=g, dtype=torch.float64) + 1
    since = torch.tensor([0, 0, 50, 0, 50, 0, 0, 0, 0, 0, 0, 0])
    dead = dead_atoms(since, 20)
    new = resample_dead_atoms(D, dead, R, generator=g, stats=OnlineStats(A, B),
                              since_used=since)
    assert new.tolist() == [2, 4]
    torch.testing.assert_close(D.norm(dim=1), torch.ones(K, dtype=torch.float64))
    keep = torch.ones(K, dtype=torch.bool)
    keep[new] = False
    assert torch.equal(D[keep], D0[keep])
    # the new atoms are the two rows with a residual, normalised
    got = {tuple(np.round(D[k].numpy(), 8)) for k in new.tolist()}
    want = {tuple(np.round((R[r] / R[r].norm()).numpy(), 8)) for r in (3, 5)}
    assert got == want
    assert (A[new] == 0).all() and (A[:, new] == 0).all() and (B[new] == 0).all()
    assert (A[keep][:, keep] > 0).all() and (B[keep] > 0).all()
    assert (since == 0).all()
    # nothing dead: nothing changes
    assert resample_dead_atoms(D, dead_atoms(since, 20), R, generator=g).numel() == 0


def test_resampling_with_more_dead_atoms_than_residual_rows_and_sparse_stats():
    K, P = 12, 5
    D, R = _resample_problem(K, P)
    D0 = D.clone()
    st = SparseStats(K, P, max_nnz=100, dtype=torch.float64)
    idx = torch.tensor([[0, 1], [2, 3], [1, 4]] * 3)
    vals = torch.ones(9, 2, dtype=torch.float64)
    st.update(torch.randn(9, P, dtype=torch.float64), idx, vals, 1.0)
    dead = torch.ones(K, dtype=torch.bool)
    dead[0] = False
    new = resample_dead_atoms(D, dead, R, generator=torch.Generator().manual_seed(0),
                              stats=st)
    assert new.numel() == 2 and 0 not in new.tolist()  # 11 dead, 2 usable rows
    assert torch.equal(D[0], D0[0])
    untouched = torch.ones(K, dtype=torch.bool)
    untouched[new] = False
    assert torch.equal(D[untouched], D0[untouched])
    assert (st.B[new] == 0).all() and (st.diag[new] == 0).all()
    for a in new.tolist():
        assert not ((st.rows == a) | (st.cols == a)).any()
    assert st.nnz > 0  # the entries between live atoms stay
    # random subsets, reproducible with the generator
    again = resample_dead_atoms(D0.clone(), dead, R, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, new)
    # only exact reconstructions: nothing to resample from
    assert resample_dead_atoms(D, dead, torch.zeros(4, P, dtype=torch.float64)).numel() == 0


def test_resampling_takes_the_worst_reconstructed_rows():
    D = _dict(6, 3)
    R = torch.tensor([[0, 0.5, 0], [10.0, 0, 0], [0, 0, 0.01], [0, 0, -3]],
                     dtype=torch.float64)
    dead = torch.zeros(6, dtype=torch.bool)
    dead[[1, 4]] = True
    resample_dead_atoms(D, dead, R)
    torch.testing.assert_close(D[1], torch.tensor([1.0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(D[4], torch.tensor([0, 0, -1.0], dtype=torch.float64))


# ---------------------------------------------------------- sparse statistics
def test_batch_cooccurrence_matches_dense():
    K = 30
    idx = torch.stack([torch.randperm(K)[:4] for _ in range(20)])
    vals = torch.randn(20, 4, dtype=torch.float64)
    diag, r, c, v = batch_cooccurrence(idx, vals, K)
    A = _dense_codes(idx, vals, K)
    G = A.T @ A
    torch.testing.assert_close(diag, G.diagonal())
    assert (r < c).all() and v.numel() <= 20 * 4 * 3 // 2
    U = torch.zeros(K, K, dtype=torch.float64)
    U[r, c] = v
    torch.testing.assert_close(U, torch.triu(G, 1))


def test_sparse_stats_match_dense_online_statistics():
    K, P = 25, 6
    st = SparseStats(K, P, max_nnz=10**6, dtype=torch.float64)
    A_ref = torch.zeros(K, K, dtype=torch.float64)
    B_ref = torch.zeros(K, P, dtype=torch.float64)
    D = _dict(K, P, seed=7)
    for step in range(4):
        X = torch.randn(16, P, dtype=torch.float64)
        idx = torch.stack([torch.randperm(K)[:3] for _ in range(16)])
        vals = torch.randn(16, 3, dtype=torch.float64)
        beta = forgetting_factor(step, 16)
        st.update(X, idx, vals, beta)
        Ad = _dense_codes(idx, vals, K)
        A_ref = beta * A_ref + Ad.T @ Ad
        B_ref = beta * B_ref + Ad.T @ X
    torch.testing.assert_close(st.B, B_ref)
    torch.testing.assert_close(st.diag, A_ref.diagonal())
    off = A_ref - torch.diag(A_ref.diagonal())
    torch.testing.assert_close(st.offdiag_matmul(D), off @ D)
    some = torch.tensor([1, 4, 9, 20])
    torch.testing.assert_close(st.offdiag_matmul(D, atoms=some), (off @ D)[some])
    torch.testing.assert_close(st._offdiag_matmul_torch(D, 7), off @ D)  # device path
    # the dense Jacobi / block-coordinate update, then unit norm
    atoms = torch.tensor([0, 3, 5, 24])
    expect = (B_ref[atoms] - (off @ D)[atoms]) / A_ref.diagonal()[atoms, None]
    expect = expect / expect.norm(dim=1, keepdim=True)
    D2 = D.clone()
    refresh_atoms(D2, st, atoms, preconditioner="jacobi")
    torch.testing.assert_close(D2[atoms], expect)
    others = torch.ones(K, dtype=torch.bool)
    others[atoms] = False
    assert torch.equal(D2[others], D[others])
    # the majorised (Gershgorin) step: d + (B - A d) / (A_kk + sum_j |A_kj|)
    M = A_ref.diagonal() + off.abs().sum(1)
    expect = D[atoms] + (B_ref[atoms] - (A_ref @ D)[atoms]) / M[atoms, None]
    expect = expect / expect.norm(dim=1, keepdim=True)
    D3 = D.clone()
    refresh_atoms(D3, st, atoms, preconditioner="gershgorin")
    torch.testing.assert_close(D3[atoms], expect)
    # a portable round trip
    back = SparseStats.from_state_dict(st.state_dict(), dtype=torch.float64)
    for name in ("B", "diag", "rows", "cols", "vals"):
        assert torch.equal(getattr(back, name), getattr(st, name))
    assert isinstance(st.state_dict()["B"], np.ndarray) and back.max_nnz == st.max_nnz


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("preconditioner", ["jacobi", "gershgorin"])
def test_compiled_refresh_matches_the_torch_path(dtype, preconditioner):
    # CPU float statistics take one compiled pass; a (K, P) view that is not
    # contiguous takes the torch path: both must give the same atoms
    K, P = 40, 7
    g = torch.Generator().manual_seed(3)
    st = SparseStats(K, P, max_nnz=10**6, dtype=dtype)
    for _ in range(3):
        idx = torch.stack([torch.randperm(K, generator=g)[:4] for _ in range(12)])
        st.update(torch.randn(12, P, generator=g, dtype=dtype), idx,
                  torch.randn(12, 4, generator=g, dtype=dtype), 0.9)
    st.reset_atoms(torch.tensor([5]))
    st.diag[5] = 1  # used, but B = 0 and no co-occurrence: norm 0, the old atom is kept
    D = torch.randn(K, P, generator=g, dtype=dtype)
    D = D / D.norm(dim=1, keepdim=True)
    atoms = torch.tensor([0, 3, 5, 11, 24, 39])
    for step, n_iter in ((1.0, 1), (0.5, 2)):
        fast = D.clone()
        refresh_atoms(fast, st, atoms, step=step, n_iter=n_iter, preconditioner=preconditioner)
        wide = torch.zeros(K, 2 * P, dtype=dtype)
        slow = wide[:, ::2]  # not contiguous: the torch path
        slow.copy_(D)
        refresh_atoms(slow, st, atoms, step=step, n_iter=n_iter, preconditioner=preconditioner)
        torch.testing.assert_close(fast, slow)
        if preconditioner == "jacobi":  # Gershgorin keeps a part of the old atom
            assert torch.equal(fast[5], D[5])
        changed = (fast != D).any(1)
        assert changed[[0, 3, 11, 24, 39]].all() and not changed[[1, 2, 38]].any()
    # a non-finite statistic reaches the atom (the learner's check must see it)
    st.B[3, 0] = float("nan")
    fast = D.clone()
    refresh_atoms(fast, st, atoms, preconditioner=preconditioner)
    assert fast[3].isnan().all()


def test_sparse_stats_cap_keeps_largest_entries():
    K = 40
    st = SparseStats(K, 3, max_nnz=15, dtype=torch.float64)
    idx = torch.stack([torch.randperm(K)[:5] for _ in range(10)])
    vals = torch.randn(10, 5, dtype=torch.float64)
    st.update(torch.randn(10, 3, dtype=torch.float64), idx, vals, 1.0)
    assert st.nnz == 15
    _, _, _, v = batch_cooccurrence(idx, vals, K)
    kept = st.vals.abs().sort().values
    torch.testing.assert_close(kept, v.abs().sort().values[-15:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_stats_compiled_kernels_match_torch_reference(dtype):
    # float32 packs (key, value) into one uint64 sort; float64 argsorts the keys.
    # Duplicated atoms within a row, zero codes and the max_nnz pruning included.
    from skdict.updates.sparse_stats import _pairs_torch

    K, n, s, P = 500, 300, 8, 16
    g = torch.Generator().manual_seed(0)
    st = SparseStats(K, P, max_nnz=4000, dtype=dtype)
    ref = SparseStats(K, P, max_nnz=4000, dtype=dtype)
    for _ in range(5):
        idx = torch.randint(0, K, (n, s), generator=g)
        vals = torch.randn(n, s, generator=g, dtype=dtype)
        vals[vals.abs() < 0.1] = 0
        X = torch.randn(n, P, generator=g, dtype=dtype)
        d, r, c, v = batch_cooccurrence(idx, vals, K)
        r2, c2, v2 = _pairs_torch(idx, vals, K)
        assert torch.equal(r, r2) and torch.equal(c, c2)
        torch.testing.assert_close(v, v2)
        st.update(X, idx, vals, 0.9)
        ref.B.mul_(0.9)
        ref.diag.mul_(0.9)
        ref.vals.mul_(0.9)
        ref.B.index_put_((idx.reshape(-1),), (vals[:, :, None] * X[:, None]).reshape(-1, P),
                         accumulate=True)
        ref.diag.add_(d)
        ref._add_offdiag_torch(r2, c2, v2)
        torch.testing.assert_close(st.B, ref.B)
        assert torch.equal(st.rows, ref.rows) and torch.equal(st.cols, ref.cols)
        torch.testing.assert_close(st.vals, ref.vals)
    assert st.nnz == 4000
    # the scatter split over several atom owners (what more threads run)
    from skdict.updates._kernels.stats import _scatter

    B = torch.zeros(K, P, dtype=dtype)
    _scatter[1](B.numpy(), X.numpy(), idx.numpy(), vals.numpy(), 3)
    ref_B = torch.zeros(K, P, dtype=dtype).index_put_(
        (idx.reshape(-1),), (vals[:, :, None] * X[:, None]).reshape(-1, P), accumulate=True)
    torch.testing.assert_close(B, ref_B)


@pytest.mark.parametrize("K", [2, 3, 700, 32768, 65536])
def test_batch_pairs_radix_path_matches_reference_at_every_key_width(K):
    # the packed keys span (K^2 - 1).bit_length() bits: 1 pass up to 11 bits, three
    # of 10-11 bits at K = 32768 / 65536, where the largest atoms give the largest keys
    from skdict.updates.sparse_stats import _pairs_torch

    g = torch.Generator().manual_seed(K)
    n, s = 400, min(K, 6)
    idx = torch.randint(max(0, K - 40), K, (n, s), generator=g)
    idx[::3] = torch.randint(0, K, (len(range(0, n, 3)), s), generator=g)
    vals = torch.randn(n, s, generator=g, dtype=torch.float32)
    vals[vals.abs() < 0.2] = 0
    _, r, c, v = batch_cooccurrence(idx, vals, K)
    r2, c2, v2 = _pairs_torch(idx, vals, K)
    assert torch.equal(r, r2) and torch.equal(c, c2)
    torch.testing.assert_close(v, v2)


def test_radix_sort_of_packed_words_is_a_stable_sort_by_the_key_bits():
    from skdict.updates._kernels.stats import _radix_sort_hi

    rng = np.random.default_rng(0)
    for bits in (1, 9, 22, 30, 32):
        keys = rng.integers(0, 2**bits, 5000, dtype=np.uint64)
        keys[:50] = keys[0]  # ties, whose low words must keep their order
        low = np.arange(5000, dtype=np.uint64)[::-1].copy()
        a = (keys << np.uint64(32)) | low
        out = _radix_sort_hi(a.copy(), np.empty_like(a), bits)
        order = np.argsort(keys, kind="stable")
        np.testing.assert_array_equal(out, a[order])
    same = np.full(10, 7 << 32, dtype=np.uint64) | np.arange(10, dtype=np.uint64)
    np.testing.assert_array_equal(_radix_sort_hi(same.copy(), np.empty_like(same), 3), same)
