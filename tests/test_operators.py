"""The dictionary-operator protocol and its dense implementation."""

import numpy as np
import pytest
import torch
from _matrix_free import MatrixFree

import skdict.operators.dense as dense_mod
from skdict.functional import encode_codes
from skdict.operators import DenseOperator, GramOperator, as_operator, power_iteration


def _D(K=30, P=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, P, generator=g, dtype=dtype)


def test_dense_adjoint_identity_and_normal():
    D = _D()
    op = DenseOperator(D)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 30, generator=g, dtype=torch.float64)
    x = torch.randn(7, 12, generator=g, dtype=torch.float64)
    lhs = (op.forward(a) * x).sum()
    rhs = (a * op.adjoint(x)).sum()
    assert abs(float(lhs - rhs)) <= 1e-12 * abs(float(lhs))
    torch.testing.assert_close(op.normal(a), op.adjoint(op.forward(a)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.gram(), D @ D.T, rtol=0, atol=0)
    assert op.gram() is op.gram()  # cached
    assert (op.n_atoms, op.n_features, op.dtype, op.device) == (30, 12, torch.float64, D.device)


def test_gram64_is_computed_from_the_float64_dictionary():
    D = _D(dtype=torch.float32)
    op = DenseOperator(D)
    G64 = op.gram64()
    assert G64.dtype == torch.float64 and op.gram().dtype == torch.float32
    torch.testing.assert_close(G64, D.double() @ D.double().T, rtol=0, atol=0)
    op64 = DenseOperator(D.double())
    assert op64.gram64() is op64.gram()
    # the exact kernel's float32 passes: the float64 Gram rounded (not the float32 GEMM)
    G32 = op.gram64_f32()
    assert G32.dtype == torch.float32 and op.gram64_f32() is G32
    torch.testing.assert_close(G32, G64.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_lipschitz_matches_eigvalsh(dtype):
    D = _D(K=50, P=20, seed=2, dtype=dtype)
    op = DenseOperator(D)
    lam = float(np.linalg.eigvalsh((D.double() @ D.double().T).numpy()).max())
    L = op.lipschitz()
    assert lam <= L <= 1.02 * lam
    assert op.lipschitz() == L


def test_lipschitz_is_lazy_exact_path_never_computes_it(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("power iteration should not run for the exact solver")

    monkeypatch.setattr(dense_mod, "power_iteration", boom)
    D = _D()
    X = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    encode_codes(X, as_operator(D), algorithm="exact", alpha=0.1)
    with pytest.raises(AssertionError, match="should not run"):
        encode_codes(X, as_operator(D), algorithm="fista", alpha=0.1)


def test_matrix_free_defaults_match_the_dense_operator():
    D = _D(K=25, P=10, seed=4)
    mf, dense = MatrixFree(D), DenseOperator(D)
    a = torch.randn(3, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mf.normal(a), dense.normal(a))
    lam = float(np.linalg.eigvalsh((D @ D.T).numpy()).max())
    assert lam <= mf.lipschitz() <= 1.02 * lam
    assert not mf.has_gram
    with pytest.raises(TypeError, match="no explicit Gram"):
        mf.gram()


def test_gram_operator_has_no_synthesis_map():
    G = _D() @ _D().T
    op = GramOperator(G, L=5.0)
    assert op.lipschitz() == 5.0 and op.gram() is G
    with pytest.raises(TypeError, match="no forward"):
        op.forward(torch.zeros(1, 30, dtype=torch.float64))
    assert power_iteration(G) == GramOperator(G).lipschitz()


def test_as_operator_dtypes_devices_and_no_copy():
    D = _D()
    op = as_operator(D)
    assert op.D.data_ptr() == D.data_ptr()  # already there: not copied
    assert as_operator(op) is op
    op32 = as_operator(D.numpy(), "cpu", np.float32)
    assert op32.dtype == torch.float32
    assert as_operator(np.arange(6).reshape(2, 3)).dtype == torch.float64
    assert as_operator(D.numpy().astype(np.float32)).dtype == torch.float32
    with pytest.raises(ValueError, match="2-D"):
        DenseOperator(torch.zeros(3))
