"""Correctness of the fast paths (no timing asserts): the compiled homotopy and the
active-set lasso solver (chunks, warm starts, float32, positive), the
``fit_algorithm`` option of LCASparseCoder, and the benchmark helpers."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import SparseCoder as SkSparseCoder

from skdict import LCASparseCoder
from skdict.solvers import lasso_duality_gap, lasso_exact


def _problem(n=80, K=48, P=16, seed=0, dtype=torch.float64, coherent=False):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((K, P))
    if coherent:  # overcomplete and correlated atoms, like patch dictionaries
        D = D + 2.0 * rng.standard_normal((1, P))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = rng.standard_normal((n, P))
    Dt, Xt = torch.tensor(D, dtype=dtype), torch.tensor(X, dtype=dtype)
    return X, D, Xt @ Dt.T, Dt @ Dt.T


def _obj(X, A, D, alpha):
    return 0.5 * ((X - A @ D) ** 2).sum(1) + alpha * np.abs(A).sum(1)


METHODS = ["homotopy", "active_set"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("coherent", [False, True])
@pytest.mark.parametrize("positive", [False, True])
def test_exact_matches_lasso_lars_per_row(coherent, positive, method):
    X, D, C, G = _problem(coherent=coherent, seed=1)
    alpha = 0.15
    res = lasso_exact(C, G, alpha, positive=positive, method=method)
    assert res.converged
    if method == "homotopy":  # every row certified by the kernel itself
        assert res.history == [0]
    ref = SkSparseCoder(D, transform_algorithm="lasso_lars", transform_alpha=alpha,
                        positive_code=positive).transform(X)
    o, o_ref = _obj(X, res.codes.numpy(), D, alpha), _obj(X, ref, D, alpha)
    assert np.all((o - o_ref) / o_ref < 1e-9)
    # the certificate: duality gap ~ 0 for every row
    A = res.codes
    _, gap = lasso_duality_gap(A, C, A @ G, (torch.tensor(X) ** 2).sum(1), alpha, positive)
    assert float(gap.max()) < 1e-10


def test_chunk_size_does_not_change_codes():
    _, _, C, G = _problem(n=130, coherent=True)
    a = lasso_exact(C, G, 0.1, chunk_size=7, method="active_set").codes
    b = lasso_exact(C, G, 0.1, chunk_size=1000, method="active_set").codes
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)  # same optimum, rounding only
    # and the homotopy kernel lands on the same optimum
    h = lasso_exact(C, G, 0.1, method="homotopy").codes
    torch.testing.assert_close(h, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_rows_are_independent_of_the_batch(method):
    _, _, C, G = _problem(n=60, coherent=True, seed=4)
    full = lasso_exact(C, G, 0.1, method=method).codes
    for i in (0, 17, 59):
        one = lasso_exact(C[i : i + 1], G, 0.1, method=method).codes
        torch.testing.assert_close(one[0], full[i], rtol=0, atol=1e-9)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_homotopy_threads_do_not_change_codes(n_threads):
    _, _, C, G = _problem(n=97, coherent=True, seed=6)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(n_threads)
        a = lasso_exact(C, G, 0.1, method="homotopy").codes
    finally:
        torch.set_num_threads(prev)
    b = lasso_exact(C, G, 0.1, method="homotopy").codes
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def _kernel_fails(monkeypatch, rows):
    """Make the compiled kernel report ``rows`` uncertified, as a kernel that
    stopped early would: halved codes and a wrong objective on those rows."""
    from skdict.solvers._kernels import lars as _lars_kernel

    real = _lars_kernel.lars_lasso_rows

    def fails(*args, **kw):
        out = list(real(*args, **kw))
        out[1][rows] *= 0.5
        out[3][rows] = False
        if len(out) > 4:
            out[4][rows] = 123.0
        return tuple(out)

    monkeypatch.setattr(_lars_kernel, "lars_lasso_rows", fails)


def test_homotopy_falls_back_to_the_active_set_for_uncertified_rows(monkeypatch):
    _, _, C, G = _problem(n=40, coherent=True, seed=7)
    _kernel_fails(monkeypatch, [3, 11])
    res = lasso_exact(C, G, 0.1, method="homotopy")
    assert res.converged and res.history == [2]
    ref = lasso_exact(C, G, 0.1, method="active_set").codes
    torch.testing.assert_close(res.codes, ref, rtol=0, atol=1e-9)


def test_compact_output_is_sorted_padded_and_matches_dense():
    from skdict.solvers.exact import lasso_exact_compact

    _, _, C, G = _problem(n=50, coherent=True, seed=8)
    idx, val, _, ok, n_bad = lasso_exact_compact(C, G, 0.1)
    assert ok and n_bad == 0
    nz = val != 0
    # supports strictly increasing, padding (index 0, value 0) only at the end
    for i in range(idx.shape[0]):
        k = int(nz[i].sum())
        assert bool(nz[i, :k].all()) and not bool(nz[i, k:].any())
        assert bool((idx[i, 1:k] > idx[i, : k - 1]).all()) and not bool(idx[i, k:].any())
    dense = torch.zeros_like(C).scatter_add_(1, idx, val)
    ref = lasso_exact(C, G, 0.1, method="active_set").codes
    torch.testing.assert_close(dense, ref, rtol=0, atol=1e-9)


def test_homotopy_rejects_cuda_tensors_clearly():
    _, _, C, G = _problem(n=4)
    with pytest.raises(ValueError, match="method"):
        lasso_exact(C, G, 0.1, method="fast")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU tensors only"):
            lasso_exact(C.cuda(), G.cuda(), 0.1, method="homotopy")


@pytest.mark.parametrize("start", ["solution", "perturbed", "wrong_support"])
def test_warm_start_reaches_the_same_optimum(start):
    _, _, C, G = _problem(coherent=True, seed=2)
    alpha = 0.1
    ref = lasso_exact(C, G, alpha)
    if start == "solution":
        a0 = ref.codes
    elif start == "perturbed":
        a0 = ref.codes * 1.3
    else:
        a0 = torch.roll(ref.codes, 3, dims=1)
    res = lasso_exact(C, G, alpha, a0=a0, method="active_set")
    assert res.converged
    torch.testing.assert_close(res.codes, ref.codes, rtol=0, atol=1e-9)
    if start == "solution":
        assert res.n_iter <= 2


@pytest.mark.parametrize("method", METHODS)
def test_float32_reaches_float64_objective(method):
    X, D, C64, G64 = _problem(n=200, coherent=True, seed=3)
    alpha = 0.1
    a64 = lasso_exact(C64, G64, alpha).codes.numpy()
    r32 = lasso_exact(C64.float(), G64.float(), alpha, gram64=G64, method=method)
    assert r32.converged and r32.codes.dtype == torch.float32
    o64 = _obj(X, a64, D, alpha).mean()
    o32 = _obj(X, r32.codes.double().numpy(), D, alpha).mean()
    assert abs(o32 - o64) / o64 < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_zero_and_duplicate_atoms(method):
    X, D, _, _ = _problem(n=30, K=20, seed=5)
    D = np.vstack([D, D[:3], np.zeros((1, D.shape[1]))])  # duplicates + a zero atom
    Dt, Xt = torch.tensor(D), torch.tensor(X)
    C, G = Xt @ Dt.T, Dt @ Dt.T
    res = lasso_exact(C, G, 0.2, method=method)
    A = res.codes.numpy()
    assert np.all(A[:, -1] == 0)
    ref = SkSparseCoder(D[:20], transform_algorithm="lasso_lars",
                        transform_alpha=0.2).transform(X)
    o, o_ref = _obj(X, A, D, 0.2), _obj(X, ref, D[:20], 0.2)
    assert np.all((o - o_ref) / o_ref < 1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_alpha_above_max_correlation_gives_zero_codes(method):
    _, _, C, G = _problem()
    res = lasso_exact(C, G, float(C.abs().max()) * 1.01, method=method)
    assert res.converged and not bool(res.codes.any())


def test_fit_algorithm_validation():
    X = np.random.default_rng(0).standard_normal((50, 6))
    with pytest.raises(ValueError, match="fit_algorithm"):
        LCASparseCoder(n_components=4, threshold="hard", fit_algorithm="exact",
                       transform_algorithm="lca", device="cpu").fit(X)
    with pytest.raises(ValueError):
        LCASparseCoder(n_components=4, fit_algorithm="omp", device="cpu").fit(X)


def test_olshausen_metrics_recognise_a_gabor():
    from benchmarks.olshausen import summarize

    yy, xx = np.mgrid[0:12, 0:12]
    gabor = np.exp(-((yy - 6) ** 2 + (xx - 6) ** 2) / (2 * 1.5**2)) * np.cos(0.5 * np.pi * xx)
    s = summarize(gabor.reshape(1, -1))
    assert s["Gabor-like"] == 1.0 and abs(s["median peak (cyc/patch)"] - 3.0) < 0.3
    noise = summarize(np.random.default_rng(0).standard_normal((20, 144)))
    assert noise["Gabor-like"] < 0.2
    # the least-squares Gabor fit finds an oblique, elongated Gabor (any phase)
    from benchmarks.olshausen import _gabor_basis, gabor_fit

    q = [5.3, 6.2, np.log(1.3), np.log(2.4), 0.6, 0.2]
    assert gabor_fit(_gabor_basis(q, 12) @ [0.7, -0.4]) > 0.97
    assert gabor_fit(gabor) > 0.99


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_objective_by_product(method, positive, dtype):
    # with xnorm2, each row's objective comes with the codes; it must equal the
    # objective computed from the reconstruction
    X, D, C, G = _problem(n=60, coherent=True, seed=3, dtype=dtype)
    Xt = torch.tensor(X, dtype=dtype)
    res = lasso_exact(C, G, 0.12, xnorm2=(Xt * Xt).sum(1), positive=positive, method=method)
    assert res.objective is not None and res.objective.dtype == dtype
    direct = _obj(X, res.codes.double().numpy(), D, 0.12)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(res.objective.double().numpy(), direct, rtol=tol, atol=tol)
    assert lasso_exact(C, G, 0.12, method=method).objective is None  # only when asked


def test_exact_objective_of_rows_finished_by_fallback(monkeypatch):
    # rows the kernel does not certify get their objective from the active-set codes
    X, D, C, G = _problem(n=40, coherent=True, seed=4)
    _kernel_fails(monkeypatch, slice(None, None, 2))
    Xt = torch.tensor(X)
    res = lasso_exact(C, G, 0.1, xnorm2=(Xt * Xt).sum(1), method="homotopy")
    np.testing.assert_allclose(res.objective.numpy(), _obj(X, res.codes.numpy(), D, 0.1),
                               rtol=1e-12)


def test_encode_block_objective_only_when_asked():
    from skdict.functional import encode_block
    from skdict.operators import as_operator

    X, D, _, _ = _problem(n=30, seed=5)
    op = as_operator(D, torch.device("cpu"), torch.float64)
    Xt = torch.tensor(X)
    assert encode_block(Xt, op, algorithm="exact", alpha=0.1).objective is None
    res = encode_block(Xt, op, algorithm="exact", alpha=0.1, objective=True)
    np.testing.assert_allclose(res.objective.numpy(), _obj(X, res.codes.numpy(), D, 0.1),
                               rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("alpha", [0.03, 0.1, 0.4])
def test_kernel_cheap_certificate_agrees_with_the_fresh_residual(dtype, positive, alpha):
    # most rows are certified on the path's own correlations; the verdict, the
    # codes and the objective must be those of the fresh float64 residual check,
    # and every certified row must satisfy the KKT conditions on a fresh residual
    from skdict.solvers._kernels.lars import lars_lasso_rows

    X, D, C, G = _problem(n=300, K=64, P=16, coherent=True, seed=11)
    C = C.numpy().astype(dtype)
    G = G.numpy()
    fast = lars_lasso_rows(C, G, alpha, positive=positive, kkt_tol=1e-6, return_objective=True)
    fresh = lars_lasso_rows(C, G, alpha, positive=positive, kkt_tol=1e-6, return_objective=True,
                            fresh_certificate=True)
    for a, b in zip(fast[:4], fresh[:4], strict=True):
        np.testing.assert_array_equal(a, b)
    # the objective's a.G.a from alpha ||a||_1 on the face vs from the fresh residual
    np.testing.assert_allclose(fast[4], fresh[4], rtol=1e-12 if dtype == np.float64 else 1e-5,
                               atol=1e-12)
    idx, val, _, ok, _ = fast
    assert ok.all()
    A = np.zeros((C.shape[0], G.shape[0]))
    np.add.at(A, (np.arange(A.shape[0])[:, None], idx), val.astype(np.float64))  # pads add 0
    r = C.astype(np.float64) - A @ G
    inactive = A == 0
    worst = np.where(inactive, r if positive else np.abs(r), 0).max()
    slack = 1e-6 if dtype == np.float64 else 1e-4
    assert worst <= alpha * (1 + slack)


def test_compact_fixed_width_matches_boolean_masking():
    from skdict.data._compact import compact_fixed_width

    rng = np.random.default_rng(0)
    idx = np.sort(rng.integers(0, 300, (40, 9)), axis=1)
    val = rng.standard_normal((40, 9))
    val[rng.random((40, 9)) < 0.6] = 0
    val[5] = 0  # an empty row
    for v in (val, val.astype(np.float32)):
        data, cols, counts = compact_fixed_width(idx, v, 300)
        mask = v != 0
        np.testing.assert_array_equal(data, v[mask])
        np.testing.assert_array_equal(cols, idx[mask])
        np.testing.assert_array_equal(counts, mask.sum(1))
        assert cols.dtype == np.int32 and data.dtype == v.dtype and counts[5] == 0
    # strided input (a column slice), dtype conversion, no rows
    data, cols, counts = compact_fixed_width(idx[:, :4], val[:, :4], 300, np.float32)
    np.testing.assert_array_equal(data, val[:, :4][val[:, :4] != 0].astype(np.float32))
    assert compact_fixed_width(idx[:0], val[:0], 300)[2].shape == (0,)
    # rows whose non-zeros all come first (the exact kernel's): read up to the first zero
    lead = -np.sort(-np.abs(val), axis=1)  # non-zeros first, zeros trailing
    for v in (lead, lead.astype(np.float32)):
        got = compact_fixed_width(idx, v, 300, leading=True)
        want = compact_fixed_width(idx, v, 300)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
    with pytest.raises(ValueError, match="one shape"):
        compact_fixed_width(idx, val[:, :3], 300)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_transform_blocks_do_not_change_codes(monkeypatch, dtype):
    # the CPU exact path encodes a batch in row blocks (correlations <= 4 MB);
    # blocks of a few rows must give the same CSR and dense codes as one block
    import skdict.functional as functional
    from skdict import SparseCoder

    X, D, _, _ = _problem(n=203, K=40, P=12, coherent=True, seed=5)
    X, D = X.astype(dtype), D.astype(dtype)
    one = SparseCoder(D, alpha=0.1).transform(X)
    monkeypatch.setattr(functional, "_EXACT_BLOCK_BYTES", 64 * 40 * np.dtype(dtype).itemsize)
    coder = SparseCoder(D, alpha=0.1)
    many = coder.transform(X)
    assert many.dtype == dtype and many.has_sorted_indices
    assert (many.data != 0).all()
    # (the GEMM of a short block may round the correlations differently)
    atol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(many.toarray(), one.toarray(), rtol=0, atol=atol)
    coder.set_params(sparse_output=False)
    np.testing.assert_array_equal(coder.transform(X), many.toarray())
    ref = SkSparseCoder(D.astype(np.float64), transform_algorithm="lasso_lars",
                        transform_alpha=0.1).transform(X.astype(np.float64))
    X64, D64 = X.astype(np.float64), D.astype(np.float64)
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(_obj(X64, one.toarray().astype(np.float64), D64, 0.1),
                               _obj(X64, ref, D64, 0.1), rtol=rtol)


def test_exact_float32_fused_and_gemm_correlations_agree(monkeypatch):
    # float32 calls of at most _FUSED_MAX_ROWS rows form the correlations in the
    # kernel's workers, larger ones by one GEMM: the two give the same codes up
    # to the correlations' rounding, each as good as scikit-learn's lasso_lars
    import skdict.functional as functional
    from skdict import SparseCoder

    X, D, _, _ = _problem(n=203, K=40, P=12, coherent=False, seed=6)
    X, D = X.astype(np.float32), D.astype(np.float32)
    assert X.shape[0] <= functional._FUSED_MAX_ROWS
    fused = SparseCoder(D, alpha=0.1).transform(X)
    monkeypatch.setattr(functional, "_FUSED_MAX_ROWS", 0)
    gemm = SparseCoder(D, alpha=0.1).transform(X)
    assert fused.dtype == gemm.dtype == np.float32
    np.testing.assert_allclose(fused.toarray(), gemm.toarray(), rtol=0, atol=1e-4)
    X64, D64 = X.astype(np.float64), D.astype(np.float64)
    ref = SkSparseCoder(D64, transform_algorithm="lasso_lars",
                        transform_alpha=0.1).transform(X64)
    for codes in (fused, gemm):
        np.testing.assert_allclose(_obj(X64, codes.toarray().astype(np.float64), D64, 0.1),
                                   _obj(X64, ref, D64, 0.1), rtol=1e-5)


def _kkt_violation(C, G, idx, val, alpha, positive):
    """Largest relative KKT violation of each row (inactive atoms above alpha,
    active atoms off ``alpha * sign``), on a fresh float64 residual."""
    A = np.zeros((C.shape[0], G.shape[0]))
    np.add.at(A, (np.arange(A.shape[0])[:, None], idx), val.astype(np.float64))
    r = C.astype(np.float64) - A @ G
    act = A != 0
    inactive = np.where(act, 0.0, r if positive else np.abs(r)) - alpha
    active = np.where(act, np.abs(r - alpha * np.sign(A)), 0.0)
    return np.maximum(inactive.max(1), active.max(1)) / alpha


def _near_duplicates(seed=0, n=1000, pairs=96, P=48):
    # pairs of atoms 1e-4 apart: the lasso puts large opposite coefficients on a
    # pair only where that pays, and the path must order near-ties correctly;
    # returns X, D, C = X D^T, G = D D^T
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((pairs, P))
    D = np.vstack([D, D + 1e-4 * rng.standard_normal(D.shape)])
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = rng.standard_normal((n, P))
    return X, D, X @ D.T, D @ D.T


@pytest.mark.parametrize("positive", [False, True])
def test_kernel_float32_passes_give_the_float64_codes(positive):
    # the path's passes in float32 only find the support; the coefficients come
    # from the float64 face solve, so codes and objective match float64 passes
    from skdict.solvers._kernels.lars import lars_lasso_rows

    X, D, C, G = _problem(n=400, K=64, P=16, coherent=True, seed=12)
    C, G = C.numpy(), G.numpy()
    out = {pd: lars_lasso_rows(C, G, 0.05, positive=positive, kkt_tol=1e-7, pass_dtype=pd,
                               return_objective=True) for pd in (np.float32, np.float64)}
    (i3, v3, _, ok3, f3), (i6, v6, _, ok6, f6) = out[np.float32], out[np.float64]
    assert ok3.all() and ok6.all() and v3.dtype == np.float64
    # each row: its non-zeros first, then padding (what compact_fixed_width(leading=True) reads)
    nz = v3 != 0
    np.testing.assert_array_equal(nz, np.arange(nz.shape[1]) < nz.sum(1, keepdims=True))
    np.testing.assert_array_equal(i3, i6)
    np.testing.assert_allclose(v3, v6, rtol=0, atol=1e-12)
    np.testing.assert_allclose(f3, f6, rtol=1e-12, atol=1e-12)
    assert (_kkt_violation(C, G, i3, v3, 0.05, positive) <= 1e-7).all()
    with pytest.raises(ValueError, match="pass_dtype must be float32 or float64"):
        lars_lasso_rows(C, G, 0.05, pass_dtype=np.int32)
    # a caller's cached rounding of G (the operator's gram64_f32) gives the same codes
    kept = lars_lasso_rows(C, G, 0.05, positive=positive, kkt_tol=1e-7, return_objective=True,
                           gram_pass=G.astype(np.float32))
    for a, b in zip(kept, out[np.float32], strict=True):
        np.testing.assert_array_equal(a, b)
    for bad in (G, G[:, :-1].astype(np.float32)):
        with pytest.raises(ValueError, match="gram_pass must be G in float32"):
            lars_lasso_rows(C, G, 0.05, gram_pass=bad)


@pytest.mark.parametrize("pass_dtype", [np.float32, np.float64])
def test_kernel_certificate_checks_the_active_atoms(pass_dtype):
    # with nearly collinear atoms a float32 path can end on a wrong support whose
    # inactive correlations are all within alpha while an active atom's residual
    # correlation has the wrong sign; such a row must not be certified
    from skdict.solvers._kernels.lars import lars_lasso_rows

    _, _, C, G = _near_duplicates()
    alpha = 0.2 * np.abs(C).max(1).mean()
    idx, val, _, ok, fpart = lars_lasso_rows(C, G, alpha, kkt_tol=1e-7, pass_dtype=pass_dtype,
                                             return_objective=True)
    assert ok.mean() > 0.9  # (float32: the uncertified rows go to the caller's fallback)
    assert (_kkt_violation(C[ok], G, idx[ok], val[ok], alpha, False) <= 1e-7).all()


def test_serial_and_parallel_kernels_keep_separate_cache_entries():
    # numba's on-disk cache is keyed by the function's name and first line, not by
    # parallel=: compiled from the same function, the serial row loop (compiled
    # first, e.g. by a one-thread call) was loaded for the parallel one, which
    # then ran on one thread. Each variant must have its own index file.
    import skdict.solvers._kernels.lars as lk

    paths = {d._cache._cache_file._index_path for d in (lk._lars_batch, lk._lars_batch_serial)}
    assert len(paths) == 2
    assert lk._lars_batch_serial.py_func.__code__ is lk._lars_batch.py_func.__code__


def test_kernel_retries_uncertified_float32_rows_with_float64_passes(monkeypatch):
    from skdict.solvers._kernels import lars as lk

    _, _, C, G = _near_duplicates(seed=3, n=2000)
    alpha = 0.05 * np.abs(C).max(1).mean()
    opts = (alpha, False, 8 * G.shape[0], 1e-7, lk._WINDOW_MIN, G.shape[0] + 1, 1, False)
    ok32 = lk._run(C, C[:0, :0], G, G.astype(np.float32), *opts)[4]
    ok64 = lk._run(C, C[:0, :0], G, G, *opts)[4]
    assert (~ok32).sum() >= lk._RETRY_MIN_ROWS
    assert (ok64 & ~ok32).any()  # rows only float64 passes certify
    idx, val, _, ok = lk.lars_lasso_rows(C, G, alpha, kkt_tol=1e-7, n_threads=1)
    np.testing.assert_array_equal(ok, ok32 | ok64)
    assert (_kkt_violation(C[ok], G, idx[ok], val[ok], alpha, False) <= 1e-7).all()
    # fewer uncertified rows than the threshold: left to the caller (no retry)
    monkeypatch.setattr(lk, "_RETRY_MIN_ROWS", int((~ok32).sum()) + 1)
    _, _, _, ok = lk.lars_lasso_rows(C, G, alpha, kkt_tol=1e-7, n_threads=1)
    np.testing.assert_array_equal(ok, ok32)


def _tied_atoms(seed=0, n=300, groups=12, copies=12, P=24):
    # groups of atoms a relative 1e-8 to 1e-3 apart, plus exact and sign-flipped
    # copies: many atoms reach the common level at nearly (or exactly) the same
    # step length, within float32 rounding of one another
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((groups, P))
    scales = np.logspace(-8, -3, copies - 2)
    D = [B]
    for s in scales:
        D.append(B + s * rng.standard_normal(B.shape))
    D.append(B.copy())
    D.append(-B)
    D = np.vstack(D)
    D = D[rng.permutation(len(D))]
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = rng.standard_normal((n, groups)) @ B + 0.3 * rng.standard_normal((n, P))
    return X, D, X @ D.T, D @ D.T


@pytest.mark.parametrize("pass_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("data", ["tied", "coherent"])
def test_kernel_join_bracket_keeps_the_path(data, positive, pass_dtype):
    # the bracket of the join times in the working dtype (every step with
    # window_min=0) may only drop atoms that cannot join first: the path, step
    # for step, is the one of the exact test of every flagged atom (window_min=K)
    from skdict.solvers._kernels.lars import lars_lasso_rows

    if data == "tied":
        _, _, C, G = _tied_atoms()
        alphas = [0.3, 0.03, 0.003]
    else:
        _, _, C, G = _problem(n=300, K=96, P=24, coherent=True, seed=7)
        C, G = C.numpy(), G.numpy()
        alphas = [0.1, 0.01, 0.002]
    for alpha in alphas:
        kw = dict(positive=positive, kkt_tol=1e-7, pass_dtype=pass_dtype, n_threads=1,
                  return_objective=True)
        full = lars_lasso_rows(C, G, alpha, window_min=G.shape[0], **kw)
        bracket = lars_lasso_rows(C, G, alpha, window_min=0, **kw)
        default = lars_lasso_rows(C, G, alpha, **kw)
        assert full[3].mean() > 0.5  # (near-duplicates: some rows for the fallback)
        for a, b, c in zip(full, bracket, default, strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("K,P,n", [(45, 13, 103), (64, 16, 64), (7, 3, 5)])
def test_kernel_computes_correlations_per_chunk(K, P, n):
    # with the dictionary, the kernel forms X D^T itself, chunk by chunk (4 x 2
    # register tiles, an odd last atom, rows left over): same codes as from C
    from skdict.solvers._kernels.lars import _corr_rows, lars_lasso_rows

    X, D, C, G = _problem(n=n, K=K, P=P, coherent=True, seed=K)
    C, G = C.numpy(), G.numpy()
    out = np.full((n, K), np.nan)
    _corr_rows(X, D, 0, n, out)
    np.testing.assert_allclose(out, C, rtol=0, atol=1e-13)
    part = np.full((n - 3, K), np.nan)
    _corr_rows(X, D, 3, n, part)  # a chunk starting inside the matrix
    np.testing.assert_allclose(part, C[3:], rtol=0, atol=1e-13)
    for nt in (1, 2):
        ref = lars_lasso_rows(C, G, 0.05, kkt_tol=1e-7, n_threads=nt, return_objective=True)
        got = lars_lasso_rows(X, G, 0.05, kkt_tol=1e-7, n_threads=nt, return_objective=True,
                              dictionary=D)
        # (C from the tiles and from BLAS differ in the last bits: codes to 1e-10)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-10)
        np.testing.assert_array_equal(got[3], ref[3])
        np.testing.assert_allclose(got[4], ref[4], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="dictionary must have shape"):
        lars_lasso_rows(X, G, 0.05, dictionary=D[:, :-1])
    with pytest.raises(ValueError, match="columns but G"):
        lars_lasso_rows(X, G, 0.05)


def test_compact_with_dictionary_finishes_uncertified_rows(monkeypatch):
    # rows the kernel cannot certify are finished by the active set on X D^T
    from skdict.solvers.exact import lasso_exact_compact

    X, D, C, G = _problem(n=40, coherent=True, seed=9)
    _kernel_fails(monkeypatch, [2, 17])
    idx, val, _, conv, n_bad, fpart = lasso_exact_compact(
        torch.tensor(X), G, 0.1, dictionary=torch.tensor(D), return_objective=True)
    assert conv and n_bad == 2
    dense = torch.zeros_like(C).scatter_add_(1, idx, val)
    ref = lasso_exact(C, G, 0.1, method="active_set").codes
    torch.testing.assert_close(dense, ref, rtol=0, atol=1e-9)
    A = dense.numpy()
    np.testing.assert_allclose(fpart.numpy() + 0.5 * (X * X).sum(1), _obj(X, A, D, 0.1),
                               rtol=1e-10)


def test_exact_transform_with_nearly_collinear_atoms_is_certified():
    # end to end: rows the float32-pass kernel leaves uncertified (below the
    # retry threshold) are finished by the active set; every row meets the KKT
    from skdict import SparseCoder

    X, D, C, G = _near_duplicates(seed=2, n=300, pairs=40, P=20)
    alpha = 0.05 * np.abs(C).max(1).mean()
    A = SparseCoder(D, alpha=alpha).transform(X).toarray()
    idx = np.argsort(A == 0, axis=1, kind="stable")  # non-zeros first
    val = np.take_along_axis(A, idx, 1)
    assert (_kkt_violation(C, G, idx, val, alpha, False) <= 1e-6).all()


@pytest.mark.parametrize("pass_dtype", [np.float32, np.float64])
def test_kernel_long_paths_with_many_drops_match_lasso_lars(pass_dtype):
    # small alpha on a coherent dictionary: supports near the rank and paths with
    # many drops (each downdates the Cholesky factor of the active Gram); every
    # row certified on a fresh residual and at lasso_lars' objective
    from skdict.solvers._kernels.lars import lars_lasso_rows

    X, D, C, G = _problem(n=120, K=64, P=32, coherent=True, seed=5)
    alpha = 0.004
    idx, val, steps, ok = lars_lasso_rows(C.numpy(), G.numpy(), alpha, fresh_certificate=True,
                                          pass_dtype=pass_dtype)
    assert ok.all()
    nnz = (val != 0).sum(1)
    assert nnz.mean() > 25 and (steps - nnz).mean() > 10  # ~15 drops a row
    A = np.zeros((len(X), D.shape[0]))
    np.add.at(A, (np.arange(len(X))[:, None], idx), val)
    ref = SkSparseCoder(D, transform_algorithm="lasso_lars", transform_alpha=alpha).transform(X)
    o, o_ref = _obj(X, A, D, alpha), _obj(X, ref, D, alpha)
    assert np.all((o - o_ref) / o_ref < 1e-9)
