"""Convolutional sparse coding: the FFT operator against scipy.signal, the ADMM and
FISTA solvers against each other and the KKT conditions, the estimators."""

import pickle

import numpy as np
import pytest
import scipy.signal as ss
import scipy.sparse as sp
import torch

from skdict import ConvDictionaryLearning, ConvSparseCoder
from skdict.operators import conv_operator, power_iteration
from skdict.solvers import admm, fista

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [((12,), (3, 4)), ((9, 11), (3, 3, 4)), ((3, 9, 11), (3, 3, 3, 4))]


def _circular_ref(z, d, map_shape):
    """Circular convolution: the full linear convolution folded onto the grid."""
    full = np.atleast_2d(ss.convolve(z, d, mode="full"))
    H, W = map_shape
    out = np.zeros((H, W))
    for i in range(full.shape[0]):
        for j in range(full.shape[1]):
            out[i % H, j % W] += full[i, j]
    return out


@pytest.mark.parametrize("boundary", ["circular", "zero"])
@pytest.mark.parametrize("shape, fshape", SHAPES)
def test_operator_matches_scipy_and_is_adjoint(shape, fshape, boundary, rng):
    op = conv_operator(rng.standard_normal(fshape), shape, boundary)
    a = torch.tensor(rng.standard_normal((2, op.n_atoms)))
    x = torch.tensor(rng.standard_normal((2, op.n_features)))
    # <D a, x> = <a, D^T x>
    lhs, rhs = float((op.forward(a) * x).sum()), float((a * op.adjoint(x)).sum())
    assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))
    f4 = op.filters.numpy()
    z = op.maps(a).numpy()[1]
    ref = np.zeros(op.image_shape)
    for c in range(op.n_channels):
        for m in range(op.n_filters):
            if boundary == "zero":
                ref[c] += ss.convolve(z[m], f4[m, c], mode="valid")
            else:
                ref[c] += _circular_ref(z[m], f4[m, c], op.map_shape)
    np.testing.assert_allclose(op.forward(a)[1].numpy().reshape(op.image_shape), ref,
                               rtol=0, atol=1e-12)
    if boundary == "zero":  # the adjoint is the full correlation
        xi = op.images(x).numpy()[0]
        adj = sum(ss.correlate(xi[c], f4[0, c], mode="full") for c in range(op.n_channels))
        np.testing.assert_allclose(op.maps(op.adjoint(x))[0, 0].numpy(), adj, atol=1e-12)
    assert op.map_shape == (op.image_shape[1:] if boundary == "circular" else
                            (op.image_shape[1] + f4.shape[2] - 1,
                             op.image_shape[2] + f4.shape[3] - 1))


@pytest.mark.parametrize("boundary", ["circular", "zero"])
@pytest.mark.parametrize("shape, fshape", SHAPES)
def test_normal_solve_and_lipschitz(shape, fshape, boundary, rng):
    op = conv_operator(rng.standard_normal(fshape), shape, boundary)
    B = torch.tensor(rng.standard_normal((2, op.n_atoms)))
    rho = torch.tensor([0.3, 7.0], dtype=torch.float64)
    X = op.solve_normal(B, rho)
    res = op.normal(X) + rho[:, None] * X - B
    assert float(res.abs().max()) < 1e-9 * float(B.abs().max())
    lam = power_iteration(lambda v: op.normal(v[None])[0], size=op.n_atoms,
                          dtype=torch.float64, n_iter=3000, tol=1e-13) / 1.01
    assert op.lipschitz() >= lam  # a safe step
    if boundary == "circular":  # exact from the per-frequency blocks
        assert op.lipschitz() / 1.01 == pytest.approx(lam, rel=1e-6)


def _kkt(op, X, Z, alpha, tol):
    """max violation of the lasso optimality conditions, relative to alpha."""
    g = op.adjoint(X - op.forward(Z))
    on = Z != 0
    v_on = (g[on] - alpha * torch.sign(Z[on])).abs().max() if bool(on.any()) else 0.0
    v_off = (g[~on].abs() - alpha).clamp_min(0).max()
    return float(max(v_on, v_off)) / alpha


@pytest.mark.parametrize("boundary", ["circular", "zero"])
@pytest.mark.parametrize("shape, fshape", SHAPES)
def test_admm_and_fista_agree_and_satisfy_kkt(shape, fshape, boundary, rng):
    op = conv_operator(rng.standard_normal(fshape) / 3, shape, boundary)
    X = torch.tensor(rng.standard_normal((3, op.n_features)))
    C, xn2, alpha = op.adjoint(X), (X * X).sum(1), 0.4
    ra = admm(C, op, alpha, xnorm2=xn2, tol=1e-10, max_iter=20000)
    rf = fista(C, op, alpha, xnorm2=xn2, tol=1e-10, max_iter=50000)
    assert ra.converged and rf.converged

    def obj(Z):
        R = X - op.forward(Z)
        return 0.5 * (R * R).sum(1) + alpha * Z.abs().sum(1)

    oa, of = obj(ra.codes), obj(rf.codes)
    assert float(((oa - of).abs() / of).max()) < 1e-6
    assert _kkt(op, X, ra.codes, alpha, 1e-6) < 1e-3
    assert _kkt(op, X, rf.codes, alpha, 1e-6) < 1e-3


def test_admm_rows_are_independent_and_positive(rng):
    op = conv_operator(rng.standard_normal((3, 3, 3)), (10, 10))
    X = torch.tensor(rng.standard_normal((5, 100)))
    full = admm(op.adjoint(X), op, 0.3, xnorm2=(X * X).sum(1), tol=1e-9).codes
    one = admm(op.adjoint(X[2:3]), op, 0.3, xnorm2=(X[2:3] ** 2).sum(1), tol=1e-9).codes
    torch.testing.assert_close(one, full[2:3], rtol=0, atol=1e-9)
    pos = admm(op.adjoint(X), op, 0.3, xnorm2=(X * X).sum(1), positive=True, tol=1e-8)
    assert pos.converged and bool((pos.codes >= 0).all()) and bool((pos.codes > 0).any())


# ------------------------------------------------------------------ estimators
def _images(rng, n=4, shape=(12, 12)):
    return rng.standard_normal((n, int(np.prod(shape))))


@pytest.mark.parametrize("algorithm", ["admm", "fista"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coder_dtype_csr_layout_and_roundtrip(algorithm, dtype, rng):
    filters = rng.standard_normal((3, 4, 4))
    X = _images(rng).astype(dtype)
    coder = ConvSparseCoder(filters, alpha=0.3, image_shape=(12, 12), algorithm=algorithm,
                            device="cpu", tol=1e-6)
    codes = coder.fit_transform(X)
    assert sp.isspmatrix_csr(codes) and codes.dtype == dtype
    assert codes.shape == (4, 3 * 12 * 12) and coder.map_shape_ == (12, 12)
    assert codes.has_sorted_indices and np.all(codes.data != 0)
    dense = ConvSparseCoder(filters, alpha=0.3, image_shape=(12, 12), algorithm=algorithm,
                            device="cpu", tol=1e-6, sparse_output=False).fit_transform(X)
    np.testing.assert_allclose(codes.toarray(), dense, atol=1e-6)
    # maps in (filter, row, col) order: the operator's layout
    op = coder._operator("cpu", dtype)
    Xh = op.forward(torch.from_numpy(dense)).numpy()
    np.testing.assert_allclose(coder.inverse_transform(codes), Xh, rtol=1e-5, atol=1e-5)
    assert coder.inverse_transform(codes).dtype == dtype
    # the batch size does not change the codes
    small = ConvSparseCoder(filters, alpha=0.3, image_shape=(12, 12), algorithm=algorithm,
                            device="cpu", tol=1e-6, batch_size=1).fit_transform(X)
    np.testing.assert_allclose(small.toarray(), dense, atol=1e-5)


def test_coder_1d_and_multichannel(rng):
    X1 = rng.standard_normal((3, 40))
    c1 = ConvSparseCoder(rng.standard_normal((4, 5)), alpha=0.3, device="cpu").fit(X1)
    assert c1.image_shape_ == (40,) and c1.transform(X1).shape == (3, 160)
    X3 = rng.standard_normal((2, 3 * 10 * 10))
    c3 = ConvSparseCoder(rng.standard_normal((5, 3, 3, 3)), alpha=0.3, image_shape=(3, 10, 10),
                         boundary="zero", algorithm="fista", device="cpu")
    codes = c3.fit_transform(X3)
    assert c3.map_shape_ == (12, 12) and codes.shape == (2, 5 * 144)
    f = c3.components_
    ref = sum(ss.convolve(codes[0].toarray().reshape(5, 12, 12)[m], f[m, 0], mode="valid")
              for m in range(5))
    np.testing.assert_allclose(c3.inverse_transform(codes)[0].reshape(3, 10, 10)[0], ref,
                               atol=1e-10)


def test_bad_inputs_are_clear_errors(rng):
    f = rng.standard_normal((3, 4, 4))
    with pytest.raises(ValueError, match=r"rows of X have 50 values but image_shape=\(7, 7\)"):
        ConvSparseCoder(f, image_shape=(7, 7), device="cpu").fit(rng.standard_normal((2, 50)))
    with pytest.raises(ValueError, match="larger than the image"):
        ConvSparseCoder(f, image_shape=(3, 3), device="cpu").fit(rng.standard_normal((2, 9)))
    X = rng.standard_normal((2, 64))
    X[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ConvSparseCoder(f, image_shape=(8, 8), device="cpu").fit(X)
    with pytest.raises(ValueError, match="alpha"):
        ConvSparseCoder(f, alpha=-1.0, image_shape=(8, 8), device="cpu").fit(X[1:])
    with pytest.raises(ValueError, match="do not match image_shape"):
        ConvSparseCoder(rng.standard_normal((3, 4)), image_shape=(8, 8), device="cpu").fit(X[1:])
    coder = ConvSparseCoder(f, image_shape=(8, 8), device="cpu").fit(X[1:])
    with pytest.raises(ValueError, match="features"):
        coder.transform(rng.standard_normal((2, 63)))
    with pytest.raises(ValueError, match="filter_shape"):
        ConvDictionaryLearning(2, (3, 3, 3), image_shape=(8, 8), device="cpu").fit(X[1:])
    with pytest.raises(ValueError, match="dict_init has shape"):
        ConvDictionaryLearning(2, (3, 3), image_shape=(8, 8), dict_init=np.ones((2, 4, 4)),
                               device="cpu").fit(X[1:])


def test_dictionary_learning_decreases_the_objective_and_pickles(rng):
    # images made of a few known filters: the learned ones must reconstruct them
    true = rng.standard_normal((3, 5, 5))
    true /= np.linalg.norm(true.reshape(3, -1), axis=1)[:, None, None]
    maps = rng.standard_normal((24, 3, 20, 20)) * (rng.random((24, 3, 20, 20)) < 0.03)
    X = ConvSparseCoder(true, image_shape=(20, 20), device="cpu").fit(
        np.zeros((1, 400))).inverse_transform(maps.reshape(24, -1))
    X += 0.01 * rng.standard_normal(X.shape)
    params = dict(alpha=0.05, image_shape=(20, 20), max_iter=6, forget_window=8,
                  random_state=0, device="cpu")
    cdl = ConvDictionaryLearning(6, (5, 5), **params).fit(X)
    assert cdl.components_.shape == (6, 5, 5)
    np.testing.assert_allclose(np.linalg.norm(cdl.components_.reshape(6, -1), axis=1), 1,
                               atol=1e-6)
    true_obj = ConvSparseCoder(true, alpha=0.05, image_shape=(20, 20), device="cpu").fit(
        X)._objective(X)
    assert cdl.loss_curve_[-1] < 0.8 * cdl.loss_curve_[0]
    assert cdl._objective(X) < 1.35 * true_obj
    assert cdl.n_steps_ == 6 * 6 and cdl.n_iter_ == 6
    # the same seed, the same filters; pickling keeps transform
    again = ConvDictionaryLearning(6, (5, 5), **params).fit(X)
    np.testing.assert_array_equal(again.components_, cdl.components_)
    back = pickle.loads(pickle.dumps(cdl))
    np.testing.assert_allclose(back.transform(X[:2]).toarray(), cdl.transform(X[:2]).toarray())
    # partial_fit continues; a failing one leaves the model as it was
    before = cdl.components_.copy()
    bad = X[:4].copy()
    bad[1, 0] = np.inf
    with pytest.raises(ValueError):
        cdl.partial_fit(bad)
    np.testing.assert_array_equal(cdl.components_, before)
    cdl.partial_fit(X[:8])
    assert cdl.n_steps_ == 36 + 2 and not np.array_equal(cdl.components_, before)
    with pytest.raises(ValueError, match="n_filters changed"):
        cdl.set_params(n_filters=7).partial_fit(X[:4])


def test_dictionary_learning_1d_multichannel_float32(rng):
    X = rng.standard_normal((6, 30)).astype(np.float32)
    cdl = ConvDictionaryLearning(3, (4,), alpha=0.2, max_iter=2, random_state=0,
                                 device="cpu").fit(X)
    assert cdl.components_.shape == (3, 4) and cdl.components_.dtype == np.float32
    assert cdl.transform(X).dtype == np.float32
    X3 = rng.standard_normal((4, 2 * 8 * 8))
    cdl3 = ConvDictionaryLearning(3, (3, 3), alpha=0.2, image_shape=(2, 8, 8), max_iter=2,
                                  boundary="zero", fit_algorithm="fista",
                                  transform_algorithm="fista", random_state=0,
                                  device="cpu").fit(X3)
    assert cdl3.components_.shape == (3, 2, 3, 3) and cdl3.map_shape_ == (10, 10)
    assert cdl3.inverse_transform(cdl3.transform(X3)).shape == X3.shape


def test_dead_filters_are_resampled(rng):
    # isolated spikes: the delta filter explains them, the checkerboard is never used
    X = np.zeros((8, 100))
    X[np.arange(8), rng.integers(0, 100, 8)] = 5.0
    init = np.zeros((2, 3, 3))
    init[0, 1, 1] = 1.0
    init[1] = np.where(np.add.outer(np.arange(3), np.arange(3)) % 2, 1.0, -1.0) / 3
    cdl = ConvDictionaryLearning(2, (3, 3), alpha=1.5, image_shape=(10, 10), dict_init=init,
                                 dead_window=4, max_iter=1, batch_size=2, random_state=0,
                                 device="cpu").fit(X)
    assert cdl.n_resampled_ >= 1
    off = ConvDictionaryLearning(2, (3, 3), alpha=1.5, image_shape=(10, 10), dict_init=init,
                                 dead_window=0, max_iter=1, batch_size=2, random_state=0,
                                 device="cpu").fit(X)
    assert off.n_resampled_ == 0
    np.testing.assert_allclose(off.components_[1], init[1], atol=1e-12)


# ------------------------------------------------------------------ nn layer
def test_nn_layer_is_fista_and_differentiable():
    from skdict.nn import ConvSparseCoding, conv_sparse_coding

    g = torch.Generator().manual_seed(0)
    layer = ConvSparseCoding(2, 3, 3, alpha=0.2, n_iter=1000, generator=g).double()
    x = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z = layer(x)
    assert z.shape == (2, 3, 8, 8)
    # the step is the true spectral norm: the layer converges to the lasso optimum
    op = conv_operator(layer.weight.detach(), (2, 8, 8))
    X = x.reshape(2, -1)
    ref = fista(op.adjoint(X), op, 0.2, xnorm2=(X * X).sum(1), tol=1e-12, max_iter=20000).codes

    def obj(Z):
        R = X - op.forward(Z)
        return 0.5 * (R * R).sum(1) + 0.2 * Z.abs().sum(1)

    assert float(((obj(z.reshape(2, -1)) - obj(ref)) / obj(ref)).abs().max()) < 1e-6
    assert layer.lipschitz((2, 8, 8)) == pytest.approx(op.lipschitz(), rel=1e-5)
    torch.testing.assert_close(layer.reconstruct(z), op.forward(z.reshape(2, -1)).reshape(x.shape))
    # gradients through input, filters and alpha
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    xs = torch.randn(1, 1, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    for boundary in ("circular", "zero"):
        assert torch.autograd.gradcheck(
            lambda xs, w, a, b=boundary: conv_sparse_coding(xs, w, a, 4, boundary=b, L=30.0),
            (xs, w, a))


def test_plot_dictionary_shows_conv_filters(rng):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from skdict.plotting import plot_dictionary

    fig = plot_dictionary(rng.standard_normal((6, 5, 4)))
    assert len(fig.axes) == 6 and fig.axes[0].images[0].get_array().shape == (5, 4)
    fig = plot_dictionary(rng.standard_normal((4, 3, 5, 5)))
    assert fig.axes[0].images[0].get_array().shape == (5, 5, 3)
    fig = plot_dictionary(rng.standard_normal((4, 2, 5, 5)))
    assert fig.axes[0].images[0].get_array().shape == (5, 10)


# ------------------------------------------------------------------ CBPDN (fused ADMM)
def _obj(op, X, Z, alpha):
    R = X - op.forward(Z)
    return 0.5 * (R * R).sum(1) + alpha * Z.abs().sum(1)


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("shape, fshape", SHAPES)
def test_cbpdn_kernels_and_backends_reach_the_fista_optimum(shape, fshape, positive, rng):
    from skdict.operators._fft import fftw_available
    from skdict.solvers.cbpdn import cbpdn

    op = conv_operator(rng.standard_normal(fshape) / 2, shape)
    X = torch.tensor(rng.standard_normal((3, op.n_features)))
    ref = fista(op.adjoint(X), op, 0.3, xnorm2=(X * X).sum(1), positive=positive, tol=1e-12,
                max_iter=50000).codes
    o_ref = _obj(op, X, ref, 0.3)
    combos = [("torch", "torch"), ("torch", "numba")]
    if fftw_available():
        combos += [("fftw", "numba"), ("fftw", "torch")]
    first = None
    for backend, kernels in combos:
        res = cbpdn(op, X, 0.3, positive=positive, tol=1e-9, max_iter=5000, backend=backend,
                    kernels=kernels)
        assert res.converged and bool((res.n_iters < 5000).all())
        assert float(((_obj(op, X, res.codes, 0.3) - o_ref) / o_ref).abs().max()) < 1e-10
        if positive:
            assert bool((res.codes >= 0).all())
        else:
            assert _kkt(op, X, res.codes, 0.3, 1e-6) < 1e-4
        # the same iterations, whichever transforms and kernels
        first = res if first is None else first
        np.testing.assert_array_equal(res.n_iters.numpy(), first.n_iters.numpy())
        torch.testing.assert_close(res.codes, first.codes, rtol=0, atol=1e-8)


def test_cbpdn_warm_start_gives_the_cold_solution(rng):
    from skdict.solvers.cbpdn import cbpdn

    op = conv_operator(rng.standard_normal((4, 3, 3)) / 2, (10, 12))
    X = torch.tensor(rng.standard_normal((3, op.n_features)))
    cold = cbpdn(op, X, 0.3, tol=1e-10, max_iter=5000, return_dual=True, mixed=False)
    # restarting from (y, u, rho) stops at the first check with the same codes
    warm = cbpdn(op, X, 0.3, Y0=cold.codes, U0=cold.dual, rho=cold.rho, tol=1e-10,
                 max_iter=5000, mixed=False)
    assert warm.n_iter == 10 and warm.converged
    torch.testing.assert_close(warm.codes, cold.codes, rtol=0, atol=1e-8)
    # from a perturbed start (another problem's solution) it reaches the same optimum
    other = cbpdn(op, X.flip(0), 0.3, tol=1e-4, return_dual=True)
    again = cbpdn(op, X, 0.3, Y0=other.codes, U0=other.dual, rho=other.rho, tol=1e-10,
                  max_iter=5000)
    torch.testing.assert_close(again.codes, cold.codes, rtol=0, atol=1e-7)
    # float32 first, then float64 (the default): the float64 solution at tight tol
    mixed = cbpdn(op, X, 0.3, tol=1e-10, max_iter=5000)
    assert mixed.codes.dtype == torch.float64 and mixed.converged
    torch.testing.assert_close(mixed.codes, cold.codes, rtol=0, atol=1e-7)
    assert float(mixed.history[-1]) < 1e-10
    # float32 keeps its dtype; the rows stop separately
    r32 = cbpdn(conv_operator(op.filters.float(), (1, 10, 12)), X.float(), 0.3, tol=1e-4)
    assert r32.codes.dtype == torch.float32 and r32.rho.dtype == torch.float32


def test_cbpdn_residual_stop_bounds_the_objective(rng):
    # natural-image-like data: smooth filters and sparse maps plus noise
    from skdict.solvers.cbpdn import cbpdn

    f = rng.standard_normal((8, 5, 5))
    op = conv_operator(f / np.linalg.norm(f.reshape(8, -1), axis=1)[:, None, None], (24, 24))
    Z = torch.tensor(rng.standard_normal((4, op.n_atoms)) * (rng.random((4, op.n_atoms)) < 0.05))
    X = op.forward(Z) + 0.05 * torch.tensor(rng.standard_normal((4, op.n_features)))
    oracle = _obj(op, X, cbpdn(op, X, 0.1, tol=1e-11, max_iter=20000).codes, 0.1)
    for tol, rel in [(1e-3, 1e-3), (1e-4, 1e-5)]:
        res = cbpdn(op, X, 0.1, tol=tol, max_iter=20000)
        assert res.converged and res.history[-1] < tol
        gap = (_obj(op, X, res.codes, 0.1) - oracle) / oracle
        assert float(gap.max()) < rel and float(gap.min()) > -1e-12


def test_coder_default_tol_uses_the_residual_stop(rng):
    filters = rng.standard_normal((3, 4, 4))
    X = _images(rng)
    coder = ConvSparseCoder(filters, alpha=0.3, image_shape=(12, 12), device="cpu").fit(X)
    exact = ConvSparseCoder(filters, alpha=0.3, image_shape=(12, 12), device="cpu",
                            tol=1e-10, transform_max_iter=20000).fit(X)
    assert coder._objective(X) <= exact._objective(X) * (1 + 1e-3)
    assert coder.get_params()["tol"] is None


def test_dictionary_learning_keeps_warm_starts_in_its_state(rng):
    from skdict.training.conv import ConvState

    X = rng.standard_normal((6, 144))
    cdl = ConvDictionaryLearning(3, (3, 3), alpha=0.2, image_shape=(12, 12), max_iter=2,
                                 batch_size=4, random_state=0, device="cpu").fit(X)
    st = cdl._train_state
    # one row per training image: its codes, dual and penalty
    assert st["warm_Y"].shape == (6, 3 * 144) and st["warm_U"].shape == (6, 3 * 144)
    assert st["warm_keys"].shape[0] == 6 and st["warm_rho"].shape == (6,)
    # save / restore: the state rebuilds, and a pickled model continues the same way
    back = ConvState.from_state_dict(st, device="cpu", dtype=torch.float64)
    np.testing.assert_array_equal(back.warm_Y.numpy(), st["warm_Y"])
    twin = pickle.loads(pickle.dumps(cdl))
    cdl.partial_fit(X)
    twin.partial_fit(X)
    np.testing.assert_array_equal(twin.components_, cdl.components_)
    # warm codes are those of the images they are keyed to: the same image, with
    # its rows reordered, keeps its own entry
    before = cdl._train_state["warm_Y"].copy()
    cdl.partial_fit(X[::-1].copy())
    assert cdl._train_state["warm_Y"].shape == before.shape
