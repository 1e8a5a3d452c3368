"""alpha_max and alpha_for_sparsity against the lasso they tune."""

import numpy as np
import pytest

from skdict import SparseCoder
from skdict.model_selection import alpha_for_sparsity, alpha_max

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def problem(rng):
    D = rng.standard_normal((30, 10))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    return D, rng.standard_normal((200, 10))


@pytest.mark.parametrize("positive", [False, True])
def test_alpha_max_is_where_codes_vanish(problem, positive):
    D, X = problem
    hi = alpha_max(D, X, positive=positive)
    C = X @ D.T
    assert hi == pytest.approx((C.max() if positive else np.abs(C).max()), rel=1e-12)
    coder = SparseCoder(D, alpha=hi * 1.0001, positive_code=positive, device="cpu")
    assert coder.transform(X).nnz == 0
    assert coder.set_params(alpha=hi * 0.99).transform(X).nnz > 0


@pytest.mark.parametrize("target", [1.5, 4.0, 8.0])
def test_alpha_for_sparsity_hits_the_target_l0(problem, target):
    D, X = problem
    alpha, hist = alpha_for_sparsity(SparseCoder(D, device="cpu"), X, target_l0=target,
                                     return_history=True, max_samples=None)
    codes = SparseCoder(D, alpha=alpha, device="cpu").transform(X)
    assert codes.nnz / X.shape[0] == pytest.approx(target, rel=0.03)
    assert all(a > 0 for a, _ in hist)


def test_alpha_for_sparsity_errors(problem):
    D, X = problem
    with pytest.raises(ValueError, match="exactly one"):
        alpha_for_sparsity(SparseCoder(D), X)
    with pytest.raises(ValueError, match="target_l0 must be in"):
        alpha_for_sparsity(SparseCoder(D), X, target_l0=31)
    with pytest.raises(ValueError, match="X has 3 features"):
        alpha_for_sparsity(SparseCoder(D), X[:, :3], target_l0=2)


def test_alpha_max_validates_the_dictionary(problem):
    import torch

    D, X = problem
    ref = alpha_max(D, X)
    Dt = torch.as_tensor(D).requires_grad_(True)
    Xt = torch.as_tensor(X).requires_grad_(True)
    assert alpha_max(Dt, Xt) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="dictionary contains NaN"):
        alpha_max(np.full_like(D, np.nan), X)
    with pytest.raises(ValueError, match="dictionary must be 2-D"):
        alpha_max(D[0], X)
