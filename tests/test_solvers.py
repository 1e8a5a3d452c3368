"""Solvers against closed forms and scikit-learn at tight tolerances."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import SparseCoder as SkSparseCoder
from sklearn.linear_model import orthogonal_mp_gram

from skdict.operators import GramOperator
from skdict.penalties import L0, L1, NonNegativeL1, TopK
from skdict.solvers import (
    dense_decode,
    fista,
    hard_threshold,
    ista,
    lasso_duality_gap,
    lasso_exact,
    lca,
    omp,
    power_iteration,
    soft_threshold,
    sparse_decode,
    topk_decode,
    topk_threshold,
)


def _problem(n=60, K=40, P=20, seed=0, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((K, P))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = rng.standard_normal((n, P))
    Dt = torch.tensor(D, dtype=dtype)
    Xt = torch.tensor(X, dtype=dtype)
    return X, D, Xt @ Dt.T, Dt @ Dt.T, (Xt * Xt).sum(1)


def _obj(X, A, D, alpha):
    return float(np.mean(0.5 * ((X - A @ D) ** 2).sum(1) + alpha * np.abs(A).sum(1)))


def _sk_codes(X, D, alpha, positive=False):
    coder = SkSparseCoder(
        D, transform_algorithm="lasso_lars", transform_alpha=alpha, positive_code=positive
    )
    return coder.transform(X)


def test_soft_threshold_closed_form():
    u = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    assert torch.equal(soft_threshold(u, 1.0), torch.tensor([-2.0, 0, 0, 0, 0, 0, 2.0]))
    assert torch.equal(
        soft_threshold(u, 1.0, positive=True), torch.tensor([0.0, 0, 0, 0, 0, 0, 2.0])
    )
    assert torch.equal(hard_threshold(u, 0.9), torch.tensor([-3.0, -1.0, 0, 0, 0, 1.0, 3.0]))
    assert torch.equal(
        hard_threshold(u, 0.9, positive=True), torch.tensor([0.0, 0, 0, 0, 0, 1.0, 3.0])
    )


def test_topk_threshold_keeps_k_largest_magnitudes():
    u = torch.tensor([[0.1, -5.0, 2.0, 3.0], [1.0, 2.0, 3.0, -4.0]])
    out = topk_threshold(u, 2)
    assert torch.equal(out, torch.tensor([[0.0, -5.0, 0, 3.0], [0, 0, 3.0, -4.0]]))
    outp = topk_threshold(u, 2, positive=True)
    assert torch.equal(outp, torch.tensor([[0.0, 0, 2.0, 3.0], [0, 2.0, 3.0, 0]]))


def test_penalty_prox_is_the_argmin_and_value_matches():
    # prox(z, s) minimises 0.5 (a - z)^2 + s * penalty(a): compare with a fine grid
    z = torch.tensor([[-2.0, -0.7, 0.2, 0.9, 3.0]], dtype=torch.float64)
    grid = torch.linspace(-4, 4, 80001, dtype=torch.float64)
    grid[40000] = 0.0  # exactly (linspace leaves a rounding residue)
    for pen in (L1(0.5), NonNegativeL1(0.5), L0(1.2), L0(0.9, positive=True)):
        for step in (1.0, 0.25):
            a = pen.prox(z, step)
            vals = 0.5 * (grid[:, None] - z[0]) ** 2 + step * pen.value(grid[:, None, None])
            best = grid[vals.argmin(0)]
            torch.testing.assert_close(a[0], best, rtol=0, atol=2e-4)
    a = torch.tensor([[0.0, -1.5, 2.0]])
    assert float(L1(0.3).value(a)) == pytest.approx(0.3 * 3.5)
    assert float(NonNegativeL1(0.3).value(a)) == float("inf")
    assert float(L0(2.0).value(a)) == pytest.approx(0.5 * 4.0 * 2)
    assert float(TopK(1).value(a)) == float("inf") and float(TopK(2).value(a)) == 0.0
    torch.testing.assert_close(TopK(2).prox(z, 0.1), topk_threshold(z, 2))


def test_l1_dual_scale_makes_the_residual_dual_feasible():
    corr = torch.tensor([[0.2, -0.9, 0.4], [0.1, 0.2, -0.05], [-2.0, 0.6, 0.1]])
    alpha = 0.5
    s = L1(alpha).dual_scale(corr)
    torch.testing.assert_close(s, torch.tensor([alpha / 0.9, 1.0, alpha / 2.0]))
    assert float((s[:, None] * corr).abs().max(1).values.max()) <= alpha + 1e-7
    sp = NonNegativeL1(alpha).dual_scale(corr)  # only positive correlations count
    torch.testing.assert_close(sp, torch.tensor([1.0, 1.0, alpha / 0.6]))


def test_power_iteration_matches_eigvalsh():
    _, _, _, G, _ = _problem()
    L = power_iteration(G)
    lam = float(torch.linalg.eigvalsh(G).max())
    assert lam <= L <= 1.02 * lam


@pytest.mark.parametrize("positive", [False, True])
def test_exact_solver_matches_lasso_lars(positive):
    X, D, C, G, xn = _problem()
    alpha = 0.3
    res = lasso_exact(C, G, alpha, xnorm2=xn, positive=positive)
    assert res.converged
    A = res.codes.numpy()
    ref = _sk_codes(X, D, alpha, positive)
    o, o_ref = _obj(X, A, D, alpha), _obj(X, ref, D, alpha)
    assert (o - o_ref) / o_ref < 1e-6
    if positive:
        assert (A >= 0).all()
    # same solution (unique for random dictionaries in general position)
    np.testing.assert_allclose(A, ref, atol=1e-6)


def test_exact_solver_satisfies_kkt():
    X, D, C, G, xn = _problem(seed=3)
    alpha = 0.2
    A = lasso_exact(C, G, alpha, xnorm2=xn).codes
    corr = C - A @ G  # D r
    on = A != 0
    torch.testing.assert_close(corr[on], alpha * torch.sign(A[on]), rtol=0, atol=1e-8)
    assert float(corr[~on].abs().max()) <= alpha * (1 + 1e-7)
    _, gap = lasso_duality_gap(A, C, A @ G, xn, alpha)
    assert float(gap.max()) < 1e-9


@pytest.mark.parametrize(
    "solver, kwargs",
    [
        (fista, {}),
        (ista, {"max_iter": 5000}),
        (lca, {"max_iter": 5000}),
    ],
)
def test_iterative_solvers_match_lasso_lars(solver, kwargs):
    X, D, C, G, xn = _problem(K=30)
    alpha = 0.5
    res = solver(C, GramOperator(G), alpha, xnorm2=xn, tol=1e-5, **kwargs)
    assert res.converged
    assert res.history and res.history[-1] <= 1e-5
    ref = _sk_codes(X, D, alpha)
    o, o_ref = _obj(X, res.codes.numpy(), D, alpha), _obj(X, ref, D, alpha)
    assert abs(o - o_ref) / o_ref < 1e-4


def test_lca_fixed_point_is_the_lasso_solution():
    X, D, C, G, xn = _problem(n=20, K=30, seed=5)
    alpha = 0.5
    res = lca(C, GramOperator(G), alpha, xnorm2=xn, tol=1e-13, max_iter=20000)
    assert res.converged
    exact = lasso_exact(C, G, alpha, xnorm2=xn).codes
    torch.testing.assert_close(res.codes, exact, rtol=0, atol=1e-6)
    # the potentials satisfy the fixed-point equation u = b - a (G - I)
    u = res.state
    torch.testing.assert_close(u, C - res.codes @ G + res.codes, rtol=0, atol=1e-6)


def test_lca_hard_threshold_codes_exceed_threshold():
    _, _, C, G, _ = _problem(n=20, K=30, seed=1)
    res = lca(C, GramOperator(G), 0.5, threshold="hard", max_iter=3000, tol=1e-9)
    A = res.codes
    assert float(A[A != 0].abs().min()) > 0.5
    assert res.converged


def test_fista_warm_start_from_solution_stops_immediately():
    _, _, C, G, xn = _problem()
    A = lasso_exact(C, G, 0.3, xnorm2=xn).codes
    res = fista(C, GramOperator(G), 0.3, xnorm2=xn, a0=A, tol=1e-8)
    assert res.n_iter <= 10


def test_omp_matches_sklearn_orthogonal_mp_gram():
    X, D, C, G, xn = _problem(n=30, K=50, P=25)
    res = omp(C, G, 6, xnorm2=xn)
    ref = orthogonal_mp_gram(G.numpy(), C.numpy().T, n_nonzero_coefs=6).T
    np.testing.assert_allclose(res.codes.numpy(), ref, atol=1e-9)
    assert ((res.codes != 0).sum(1) == 6).all()


def test_omp_tolerance_stops_rows_early():
    rng = np.random.default_rng(0)
    D = rng.standard_normal((20, 12))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    A_true = np.zeros((5, 20))
    A_true[np.arange(5), rng.integers(0, 20, 5)] = 3.0
    X = A_true @ D
    Dt, Xt = torch.tensor(D), torch.tensor(X)
    res = omp(Xt @ Dt.T, Dt @ Dt.T, 5, xnorm2=(Xt**2).sum(1), tol=1e-10)
    np.testing.assert_allclose(res.codes.numpy(), A_true, atol=1e-10)


def test_duality_gap_positive_away_from_optimum():
    _, _, C, G, xn = _problem()
    A = torch.zeros_like(C)
    primal, gap = lasso_duality_gap(A, C, A @ G, xn, 0.3)
    assert (gap > 0).all()
    torch.testing.assert_close(primal, 0.5 * xn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_decoders_match_dense(dtype):
    g = torch.Generator().manual_seed(0)
    D = torch.randn(50, 7, generator=g, dtype=dtype)
    idx = torch.randint(0, 50, (9, 4), generator=g)
    val = torch.randn(9, 4, generator=g, dtype=dtype)
    ref = dense_decode(idx, val, D)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(topk_decode(idx, val, D), ref, **tol)
    # CSR form of the same codes (duplicates summed like the dense scatter-add)
    A = torch.zeros(9, 50, dtype=dtype).index_put_(
        (torch.arange(9)[:, None].expand(-1, 4), idx), val, accumulate=True
    )
    S = A.to_sparse_coo().coalesce()
    crow = torch.searchsorted(S.indices()[0], torch.arange(10))
    out = sparse_decode(crow, S.indices()[1], S.values(), D)
    torch.testing.assert_close(out, A @ D, **tol)


def test_sparse_decode_gradients():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 12, (4, 3), generator=g)
    val = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, d: topk_decode(idx, v, d), (val, D))
