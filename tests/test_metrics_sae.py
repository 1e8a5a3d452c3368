import numpy as np
import pytest
import scipy.sparse as sp
import torch

from skdict.metrics import (
    cosine_similarity,
    dead_fraction,
    explained_variance,
    fvu,
    l0,
    relative_reconstruction_bias,
)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6)) + 3.0
    X_hat = X + 0.3 * rng.normal(size=X.shape)
    return X, X_hat


def test_fvu_uses_global_mean(data):
    X, X_hat = data
    expected = ((X - X_hat) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    assert fvu(X, X_hat) == pytest.approx(expected, rel=1e-12)
    assert explained_variance(X, X_hat) == pytest.approx(1 - expected, rel=1e-12)
    # per-batch means would give a different (larger) denominator-based value
    per_batch = sum(((X[i:i + 10] - X_hat[i:i + 10]) ** 2).sum() for i in range(0, 40, 10))
    per_batch /= sum(((X[i:i + 10] - X[i:i + 10].mean(0)) ** 2).sum() for i in range(0, 40, 10))
    assert fvu(X, X_hat) != pytest.approx(per_batch, rel=1e-6)
    assert fvu(torch.from_numpy(X), torch.from_numpy(X_hat)) == pytest.approx(expected)
    assert fvu(X, np.tile(X.mean(0), (40, 1))) == pytest.approx(1.0)
    assert fvu(X, X) == 0.0


def test_fvu_constant_data_and_errors():
    X = np.ones((3, 2))
    assert fvu(X, X) == 0.0
    assert fvu(X, X + 1) == float("inf")
    with pytest.raises(ValueError, match="must match"):
        fvu(X, np.ones((3, 3)))
    with pytest.raises(ValueError, match="2-D"):
        fvu(np.ones(3), np.ones(3))


def test_l0_and_dead_fraction():
    codes = np.array([[0, 1.0, 0, 2.0], [0, 0, 0, 3.0], [0, 0, 0, 0]])
    assert l0(codes) == pytest.approx(1.0)
    assert l0(sp.csr_matrix(codes)) == pytest.approx(1.0)
    assert l0(torch.from_numpy(codes)) == pytest.approx(1.0)
    assert dead_fraction(codes) == pytest.approx(0.5)
    explicit_zero = sp.csr_matrix((np.array([0.0, 1.0]), np.array([0, 1]), np.array([0, 2])),
                                  shape=(1, 3))
    assert dead_fraction(explicit_zero) == pytest.approx(2 / 3)
    assert l0(explicit_zero) == 1.0


def test_cosine_and_bias(data):
    X, X_hat = data
    cos = np.mean(
        [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(X, X_hat, strict=True)]
    )
    assert cosine_similarity(X, X_hat) == pytest.approx(cos, rel=1e-12)
    assert cosine_similarity(X, 2 * X) == pytest.approx(1.0)
    assert relative_reconstruction_bias(X, 0.5 * X) == pytest.approx(0.5)
    assert relative_reconstruction_bias(X, X) == pytest.approx(1.0)
    rrb = (X_hat**2).sum() / (X * X_hat).sum()
    assert relative_reconstruction_bias(X, X_hat) == pytest.approx(rrb)
    with pytest.raises(ValueError, match="undefined"):
        relative_reconstruction_bias(X, np.zeros_like(X))
