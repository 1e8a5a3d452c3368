"""Contract tests of every registered solver, through the registry.

Lasso solvers against scikit-learn's ``LassoLars`` (exact: 1e-6 on codes and
objective; iterative: 1e-4 relative objective), OMP against
``orthogonal_mp_gram``; for all: row independence, float32 in -> float32 out,
positive codes, and operator-only solvers on a matrix-free operator.
"""

import numpy as np
import pytest
import torch
from _matrix_free import MatrixFree
from sklearn.linear_model import LassoLars, orthogonal_mp_gram

from skdict.functional import encode_block
from skdict.operators import DenseOperator
from skdict.solvers import SolverResult, get_solver, register, solver_names

LASSO = solver_names(problem="lasso")
ALL = solver_names()
# iterative solvers need more iterations than the default on these coherent problems
PARAMS = {"ista": {"max_iter": 20000}, "lca": {"max_iter": 20000}}


def _problem(n=40, K=30, P=16, seed=0, scale_atoms=False):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((K, P))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    if scale_atoms:  # atoms need not be unit-norm
        D *= rng.uniform(0.5, 2.0, (K, 1))
    X = rng.standard_normal((n, P))
    return X, D


def _lasso_lars(X, D, alpha, positive=False):
    # scikit-learn's objective is (1 / (2 n_features)) ||x - D^T a||^2 + alpha' ||a||_1
    est = LassoLars(alpha=alpha / X.shape[1], fit_intercept=False, positive=positive,
                    max_iter=2000)
    return est.fit(D.T, X.T).coef_.reshape(X.shape[0], D.shape[0])


def _obj(X, A, D, alpha):
    return 0.5 * ((X - A @ D) ** 2).sum(1) + alpha * np.abs(A).sum(1)


def _encode(name, X, D, dtype=torch.float64, **kw):
    op = DenseOperator(torch.tensor(D, dtype=dtype))
    params = {"alpha": 0.3, "tol": 1e-7, "n_nonzero_coefs": 5, **PARAMS.get(name, {}), **kw}
    return encode_block(torch.tensor(X, dtype=dtype), op, algorithm=name, **params)


def test_registry_lists_every_builtin_with_its_needs():
    assert set(ALL) >= {"exact", "fista", "ista", "lca", "omp"}
    assert get_solver("exact").requires == ("gram",) and get_solver("exact").kind == "exact"
    assert get_solver("omp").requires == ("gram",) and get_solver("omp").problem == "l0"
    for name in ("admm", "fista", "ista", "lca"):
        assert get_solver(name).requires == ("operator",)
        assert get_solver(name).kind == "iterative"
    assert set(solver_names(requires="operator")) == {"admm", "fista", "ista", "lca"}
    with pytest.raises(ValueError, match="Unknown algorithm 'nope'; use one of"):
        get_solver("nope")
    with pytest.raises(ValueError, match="already registered"):
        register("ista")(lambda C, op: None)
    with pytest.raises(ValueError, match="kind must be one of"):
        register("other", kind="magic")


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("name", LASSO)
def test_lasso_solvers_match_lasso_lars(name, positive):
    X, D = _problem(scale_atoms=True)
    alpha = 0.3
    res = _encode(name, X, D, alpha=alpha, positive=positive)
    assert isinstance(res, SolverResult) and res.converged
    A = res.codes.numpy()
    ref = _lasso_lars(X, D, alpha, positive)
    o, o_ref = _obj(X, A, D, alpha), _obj(X, ref, D, alpha)
    if positive:
        assert (A >= 0).all()
    if get_solver(name).kind == "exact":
        np.testing.assert_allclose(A, ref, rtol=0, atol=1e-6)
        assert ((o - o_ref) / o_ref).max() < 1e-6
    else:
        assert np.abs((o - o_ref) / o_ref).max() < 1e-4
        assert o.mean() >= o_ref.mean() * (1 - 1e-12)  # LassoLars is the optimum


@pytest.mark.parametrize("positive", [False, True])
def test_omp_matches_orthogonal_mp_gram(positive):
    X, D = _problem(n=30, K=40, P=20, seed=1)
    res = _encode("omp", X, D, n_nonzero_coefs=6, positive=positive)
    A = res.codes.numpy()
    if positive:
        assert (A >= 0).all() and ((A != 0).sum(1) <= 6).all()
        return
    G, C = D @ D.T, X @ D.T
    ref = orthogonal_mp_gram(G, C.T, n_nonzero_coefs=6).T
    np.testing.assert_allclose(A, ref, rtol=0, atol=1e-9)
    assert ((A != 0).sum(1) == 6).all()


@pytest.mark.parametrize("name", ALL)
def test_row_codes_do_not_depend_on_the_rest_of_the_batch(name):
    X, D = _problem(n=50, seed=2)
    full = _encode(name, X, D).codes.numpy()
    for rows in (slice(0, 1), slice(7, 12), slice(30, 50)):
        alone = _encode(name, X[rows], D).codes.numpy()
        np.testing.assert_allclose(alone, full[rows], rtol=0, atol=1e-9)
    # reversing the batch permutes the codes and changes nothing else
    rev = _encode(name, X[::-1].copy(), D).codes.numpy()
    np.testing.assert_allclose(rev[::-1], full, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_float32_in_float32_out(name):
    X, D = _problem(seed=3)
    r32 = _encode(name, X, D, dtype=torch.float32, tol=1e-5)
    r64 = _encode(name, X, D, dtype=torch.float64, tol=1e-5)
    assert r32.codes.dtype == torch.float32
    if get_solver(name).problem == "lasso":
        o32 = _obj(X, r32.codes.double().numpy(), D, 0.3)
        o64 = _obj(X, r64.codes.numpy(), D, 0.3)
        assert np.abs(o32 - o64).max() / o64.mean() < 1e-4
    else:
        np.testing.assert_allclose(r32.codes.numpy(), r64.codes.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_operator_only_solvers_run_without_a_gram(name):
    X, D = _problem(seed=4)
    Xt, Dt = torch.tensor(X), torch.tensor(D)
    params = {"alpha": 0.3, "tol": 1e-7, **PARAMS.get(name, {})}
    if "gram" in get_solver(name).requires:
        with pytest.raises(ValueError, match="needs an explicit Gram matrix"):
            encode_block(Xt, MatrixFree(Dt), algorithm=name, **params)
        return
    mf = encode_block(Xt, MatrixFree(Dt), algorithm=name, **params)
    dense = encode_block(Xt, DenseOperator(Dt), algorithm=name, **params)
    assert mf.converged
    torch.testing.assert_close(mf.codes, dense.codes, rtol=0, atol=1e-6)
