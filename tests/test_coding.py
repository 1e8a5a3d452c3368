"""SparseCoder and the shared base: oracles, dtypes, CSR structure, errors."""

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import sklearn
import torch
from sklearn.decomposition import SparseCoder as SkSparseCoder
from sklearn.model_selection import GridSearchCV

from skdict import SparseCoder


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    D = rng.standard_normal((30, 20))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = rng.standard_normal((80, 20))
    return X, D


def _obj(X, A, D, alpha):
    A = A.toarray() if sp.issparse(A) else A
    return float(np.mean(0.5 * ((X - A @ D) ** 2).sum(1) + alpha * np.abs(A).sum(1)))


@pytest.mark.parametrize(
    "algorithm, rel", [("exact", 1e-6), ("fista", 1e-4), ("ista", 1e-4), ("lca", 1e-4)]
)
def test_algorithms_agree_with_sklearn_lasso_lars(problem, algorithm, rel):
    X, D = problem
    alpha = 0.5
    ref = SkSparseCoder(D, transform_algorithm="lasso_lars", transform_alpha=alpha).transform(X)
    kw = {"transform_max_iter": 5000} if algorithm in ("ista", "lca") else {}
    codes = SparseCoder(D, algorithm=algorithm, alpha=alpha, device="cpu", **kw).transform(X)
    o, o_ref = _obj(X, codes, D, alpha), _obj(X, ref, D, alpha)
    assert abs(o - o_ref) / o_ref < rel


def test_omp_agrees_with_sklearn(problem):
    X, D = problem
    ref = SkSparseCoder(D, transform_algorithm="omp", transform_n_nonzero_coefs=4).transform(X)
    codes = SparseCoder(D, algorithm="omp", n_nonzero_coefs=4, device="cpu").transform(X)
    np.testing.assert_allclose(codes.toarray(), ref, atol=1e-9)


def test_positive_codes_agree_with_sklearn(problem):
    X, D = problem
    ref = SkSparseCoder(
        D, transform_algorithm="lasso_lars", transform_alpha=0.3, positive_code=True
    ).transform(X)
    codes = SparseCoder(D, alpha=0.3, positive_code=True, device="cpu").transform(X)
    assert codes.data.min() > 0
    np.testing.assert_allclose(codes.toarray(), ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algorithm", ["exact", "fista", "omp"])
def test_dtype_preserved_and_csr_canonical(problem, dtype, algorithm):
    X, D = problem
    coder = SparseCoder(D, algorithm=algorithm, alpha=0.3, device="cpu")
    codes = coder.transform(X.astype(dtype))
    assert sp.isspmatrix_csr(codes) and codes.dtype == dtype
    assert codes.has_sorted_indices
    for i in range(codes.shape[0]):
        cols = codes.indices[codes.indptr[i] : codes.indptr[i + 1]]
        assert np.all(np.diff(cols) > 0)
    assert np.all(codes.data != 0)  # no explicit zeros
    dense = SparseCoder(
        D, algorithm=algorithm, alpha=0.3, device="cpu", sparse_output=False
    ).transform(X.astype(dtype))
    assert isinstance(dense, np.ndarray) and dense.dtype == dtype
    np.testing.assert_array_equal(codes.toarray(), dense)
    X_hat = coder.inverse_transform(codes)
    assert X_hat.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(X_hat, dense @ D.astype(dtype), rtol=tol, atol=tol)
    np.testing.assert_allclose(coder.inverse_transform(dense), X_hat, rtol=tol, atol=tol)


def test_sparse_interface_sparray(problem):
    X, D = problem
    with sklearn.config_context(sparse_interface="sparray"):
        codes = SparseCoder(D, alpha=0.3, device="cpu").transform(X)
    assert isinstance(codes, sp.csr_array)


def test_batching_does_not_change_codes(problem):
    X, D = problem
    a = SparseCoder(D, alpha=0.3, device="cpu").transform(X)
    b = SparseCoder(D, alpha=0.3, device="cpu", batch_size=7).transform(X)
    np.testing.assert_allclose(a.toarray(), b.toarray(), atol=1e-12)


def test_torch_and_sparse_inputs_match_numpy(problem):
    X, D = problem
    coder = SparseCoder(D, alpha=0.3, device="cpu")
    ref = coder.transform(X).toarray()
    np.testing.assert_allclose(coder.transform(torch.tensor(X)).toarray(), ref, atol=1e-12)
    Xs = sp.csr_matrix(np.where(np.abs(X) > 1, X, 0))
    np.testing.assert_allclose(
        coder.transform(Xs).toarray(), coder.transform(Xs.toarray()).toarray(), atol=1e-12
    )
    # a torch dictionary works like a numpy one
    coder_t = SparseCoder(torch.tensor(D), alpha=0.3, device="cpu")
    np.testing.assert_allclose(coder_t.transform(X).toarray(), ref, atol=1e-12)


def test_inverse_transform_accepts_torch_and_csr_array(problem):
    X, D = problem
    coder = SparseCoder(D, alpha=0.3, device="cpu")
    codes = coder.transform(X)
    ref = codes.toarray() @ D
    np.testing.assert_allclose(coder.inverse_transform(sp.csr_array(codes)), ref, atol=1e-12)
    np.testing.assert_allclose(
        coder.inverse_transform(torch.tensor(codes.toarray())), ref, atol=1e-12
    )


@pytest.mark.parametrize(
    "X, match",
    [
        (np.array([[np.nan, 0.0]]), "NaN"),
        (np.array([[np.inf, 0.0]]), "infinity"),
        (np.zeros(2), "2-D"),
        (np.zeros((2, 2, 2)), "reshape"),
        (np.zeros((0, 2)), "0 sample"),
        (np.zeros((3, 5)), "5 features, but SparseCoder is expecting 2"),
        (torch.zeros(3, 5), "5 features, but SparseCoder is expecting 2"),
        (torch.tensor([[float("nan"), 0.0]]), "NaN"),
        (torch.zeros(2, 2, 2), "reshape"),
    ],
)
def test_bad_input_errors(X, match):
    coder = SparseCoder(np.eye(2), device="cpu")
    with pytest.raises(ValueError, match=match):
        coder.transform(X)
    with pytest.raises(ValueError, match=match):
        coder.fit(X)


def test_bad_parameters():
    X = np.ones((3, 2))
    with pytest.raises(ValueError, match="alpha"):
        SparseCoder(np.eye(2), alpha=-1.0, device="cpu").fit(X)
    with pytest.raises(ValueError, match="not a valid device"):
        SparseCoder(np.eye(2), device="tpu:0").fit(X)
    with pytest.raises(ValueError, match="dictionary contains NaN"):
        SparseCoder(np.array([[np.nan, 1.0]]), device="cpu").fit(X)
    with pytest.raises(ValueError, match="n_nonzero_coefs=5 exceeds"):
        SparseCoder(np.eye(2), algorithm="omp", n_nonzero_coefs=5, device="cpu").fit(X)
    with pytest.raises(ValueError, match="codes have 3 columns"):
        SparseCoder(np.eye(2), device="cpu").inverse_transform(np.ones((2, 3)))
    with pytest.raises(ValueError, match="'algorithm' parameter of SparseCoder must be a str"):
        SparseCoder(np.eye(2), algorithm="lasso_lars", device="cpu").fit(X)


def test_every_registered_solver_is_an_algorithm_and_encodes():
    from skdict.solvers import solver_names

    rng = np.random.default_rng(0)
    D = rng.standard_normal((6, 4))
    X = rng.standard_normal((5, 4))
    ref = SparseCoder(D, alpha=0.2, device="cpu", sparse_output=False).fit_transform(X)
    for name in solver_names():
        coder = SparseCoder(D, algorithm=name, alpha=0.2, n_nonzero_coefs=2, tol=1e-9,
                            transform_max_iter=50000, device="cpu")
        codes = coder.fit_transform(X)
        assert codes.shape == (5, 6)
        if name != "omp":  # every lasso solver reaches the exact codes
            np.testing.assert_allclose(codes.toarray(), ref, rtol=0, atol=1e-6)
        else:
            assert (codes.getnnz(axis=1) == 2).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        SparseCoder(np.eye(2), device="cuda").fit(np.ones((3, 2)))


def test_set_output_pandas_requires_dense():
    pytest.importorskip("pandas")
    coder = SparseCoder(np.eye(3), device="cpu")
    with pytest.raises(ValueError, match="sparse_output=False"):
        coder.set_output(transform="pandas")
    coder = SparseCoder(np.eye(3), alpha=0.1, device="cpu", sparse_output=False)
    df = coder.set_output(transform="pandas").fit_transform(np.eye(3) * 2)
    assert list(df.columns) == ["sparsecoder0", "sparsecoder1", "sparsecoder2"]


def test_pickle_round_trip(problem):
    X, D = problem
    coder = SparseCoder(D, alpha=0.3, device="cpu").fit(X)
    clone = pickle.loads(pickle.dumps(coder))
    np.testing.assert_array_equal(coder.transform(X).toarray(), clone.transform(X).toarray())


def test_score_is_minus_extended_bic(problem):
    X, D = problem
    coder = SparseCoder(D, alpha=0.3, device="cpu")
    codes = coder.transform(X).toarray()
    n, p = X.shape
    rss = ((X - codes @ D) ** 2).sum()
    nnz = (codes != 0).sum()
    K = D.shape[0]
    expected = -(p * np.log(rss / (n * p)) + (np.log(p) + 2 * np.log(K)) * nnz / n)
    assert coder.score(X) == pytest.approx(expected, rel=1e-10)


def test_gridsearch_without_y_picks_interior_alpha():
    """On data with a known sparsity the BIC score is not monotone in alpha."""
    rng = np.random.default_rng(0)
    K, P, s, n = 48, 32, 3, 300
    D = rng.standard_normal((K, P))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    A = np.zeros((n, K))
    for i in range(n):
        A[i, rng.choice(K, s, replace=False)] = rng.choice([-1, 1], s) * rng.uniform(1, 2, s)
    X = A @ D + 0.05 * rng.standard_normal((n, P))
    grid = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    search = GridSearchCV(SparseCoder(D, device="cpu"), {"alpha": grid}, cv=3).fit(X)
    best = search.best_params_["alpha"]
    assert best not in (grid[0], grid[-1])
    scores = search.cv_results_["mean_test_score"]
    assert scores[0] < scores.max() and scores[-1] < scores.max()


@pytest.mark.cuda
def test_cuda_matches_cpu_and_pickles_to_cpu(problem):
    X, D = problem
    cpu = SparseCoder(D, alpha=0.3, device="cpu").transform(X).toarray()
    coder = SparseCoder(D, alpha=0.3, device="cuda")
    gpu = coder.transform(torch.tensor(X, device="cuda")).toarray()
    np.testing.assert_allclose(gpu, cpu, atol=1e-8)
    clone = pickle.loads(pickle.dumps(coder))
    clone.set_params(device="cpu")
    np.testing.assert_allclose(clone.transform(X).toarray(), cpu, atol=1e-12)


def test_fit_on_a_dataframe_keeps_and_checks_feature_names():
    import warnings

    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    D = rng.standard_normal((6, 4))
    df = pd.DataFrame(rng.standard_normal((5, 4)), columns=list("abcd"))
    coder = SparseCoder(D, alpha=0.1, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "X has feature names, but ... fitted without"
        coder.fit(df)
        coder.transform(df)
    np.testing.assert_array_equal(coder.feature_names_in_, list("abcd"))
    with pytest.raises(ValueError, match="feature names should match"):
        coder.transform(df.rename(columns={"a": "z"}))
    with pytest.raises(ValueError, match="3 features"):
        coder.fit(df.iloc[:, :3])
    np.testing.assert_array_equal(coder.feature_names_in_, list("abcd"))
    assert not hasattr(coder.fit(df.to_numpy()), "feature_names_in_")


def test_transform_after_a_transform_sees_every_change(problem):
    """The operators and the parameter validation kept between transform calls
    never serve a stale dictionary or let an invalid parameter through."""
    from sklearn.utils._param_validation import InvalidParameterError

    X, D = problem
    D = D.copy()
    coder = SparseCoder(D, alpha=0.1, device="cpu")
    first = coder.transform(X).toarray()
    before = dict(coder.__dict__)
    np.testing.assert_array_equal(coder.transform(X).toarray(), first)
    assert coder.__dict__.keys() == before.keys()  # transform keeps nothing on the coder

    D[:3] = -D[:3]  # edited in place: the codes of those atoms flip sign
    flipped = coder.transform(X).toarray()
    fresh = SparseCoder(D.copy(), alpha=0.1, device="cpu").transform(X).toarray()
    np.testing.assert_array_equal(flipped, fresh)
    np.testing.assert_allclose(flipped[:, :3], -first[:, :3], atol=1e-12)

    coder.set_params(dictionary=D[::-1].copy())  # a new dictionary: reversed atoms
    np.testing.assert_allclose(coder.transform(X).toarray(), fresh[:, ::-1], atol=1e-12)

    coder.alpha = -1.0  # assigned directly, not through set_params
    with pytest.raises(InvalidParameterError, match="alpha"):
        coder.transform(X)
    coder.alpha = 0.1
    with pytest.raises(ValueError, match="NaN"):
        coder.transform(np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X))
    with pytest.raises(ValueError, match="19 features, but SparseCoder is expecting 20"):
        coder.transform(X[:, :19])
