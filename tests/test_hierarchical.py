"""HierarchicalSparseCoder, its free energy and inference
(skdict.solvers.hierarchical) and the module skdict.nn.HierarchicalSparseCoding."""

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from skdict import HierarchicalSparseCoder, sparse_encode
from skdict.base import lasso_information_criterion
from skdict.hierarchical import hierarchical_information_criterion
from skdict.nn import HierarchicalSparseCoding
from skdict.solvers import lasso_exact
from skdict.solvers.hierarchical import (
    bottom_up_inference,
    free_energy,
    free_energy_grad,
    free_energy_terms,
    joint_inference,
    prediction_errors,
    unrolled_inference,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(D):
    return D / D.norm(dim=1, keepdim=True)


def _model(seed=0, sizes=(12, 20, 6), n=60, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    dicts = [_unit(torch.randn(k, d, generator=g, dtype=dtype))
             for d, k in zip(sizes[:-1], sizes[1:], strict=True)]
    X = torch.randn(n, sizes[0], generator=g, dtype=dtype)
    return X, dicts


def _data(n=240, p=12, seed=0, planted=False):
    """Rows generated top-down by a planted two-level model, plus noise (and the
    planted dictionaries when ``planted``)."""
    rng = np.random.default_rng(seed)
    D1 = rng.standard_normal((16, p))
    D1 /= np.linalg.norm(D1, axis=1, keepdims=True)
    D2 = rng.standard_normal((5, 16)) * (np.arange(16) % 5 == np.arange(5)[:, None])
    D2 /= np.linalg.norm(D2, axis=1, keepdims=True)  # each uses 3 or 4 level-1 atoms
    a2 = rng.standard_normal((n, 5)) * (rng.random((n, 5)) < 0.4) * 3
    a1 = a2 @ D2 + 0.3 * rng.standard_normal((n, 16)) * (rng.random((n, 16)) < 0.2)
    X = a1 @ D1 + 0.05 * rng.standard_normal((n, p))
    return (X, [D1, D2]) if planted else X


@pytest.fixture(scope="module")
def fitted():
    X = _data()
    est = HierarchicalSparseCoder(n_components=(16, 5), alpha=(0.2, 0.1), max_iter=3,
                                  batch_size=64, random_state=0, device="cpu").fit(X)
    return est, X


# ----------------------------------------------------------------- the free energy
def test_one_level_joint_inference_is_the_exact_lasso():
    X, (D,) = _model(sizes=(12, 20))
    ex = lasso_exact(X @ D.T, D @ D.T, 0.3, xnorm2=(X * X).sum(1), tol=1e-12)
    exact = 0.5 * ((X - ex.codes @ D) ** 2).sum(1) + 0.3 * ex.codes.abs().sum(1)
    res = joint_inference(X, [D], [0.3], [1.0], init="zeros", tol=1e-7, max_iter=20000)
    assert res.converged
    F = free_energy(X, res.codes, [D], [0.3], [1.0])
    np.testing.assert_allclose(F.numpy(), exact.numpy(), rtol=0, atol=1e-6)
    assert float((F - exact).min()) > -1e-9  # never below the optimum


def test_one_level_estimator_free_energy_is_the_lasso_objective():
    X = _data()
    est = HierarchicalSparseCoder(n_components=10, alpha=0.3, max_iter=2, batch_size=64,
                                  random_state=0, device="cpu").fit(X)
    D = est.components_[0]
    A = np.asarray(sparse_encode(X, D, alpha=0.3, algorithm="exact", device="cpu"))
    lasso = 0.5 * ((X - A @ D) ** 2).sum(1) + 0.3 * np.abs(A).sum(1)
    np.testing.assert_allclose(est.free_energy(X), lasso, rtol=0, atol=1e-6)
    # the score is then exactly the lasso coders' extended BIC
    n, p = X.shape
    ic = lasso_information_criterion((n, p), (A != 0).sum(), ((X - A @ D) ** 2).sum(), 10)
    assert est.score(X) == pytest.approx(-ic, rel=1e-9)


def test_free_energy_gradient_matches_autograd():
    X, dicts = _model()
    g = torch.Generator().manual_seed(1)
    codes = [torch.randn(X.shape[0], D.shape[0], generator=g, dtype=X.dtype,
                         requires_grad=True) for D in dicts]
    p = [1.3, 0.4]
    F = free_energy(X, codes, dicts, [0.0, 0.0], p).sum()  # the smooth part only
    auto = torch.autograd.grad(F, codes)
    ours = free_energy_grad(prediction_errors(X, codes, dicts), dicts, p)
    for a, b in zip(auto, ours, strict=True):
        np.testing.assert_allclose(b.detach().numpy(), a.numpy(), rtol=1e-12, atol=1e-12)


def test_free_energy_terms_by_hand():
    X, dicts = _model()
    g = torch.Generator().manual_seed(2)
    codes = [torch.randn(X.shape[0], D.shape[0], generator=g, dtype=X.dtype) for D in dicts]
    alpha, p = [0.3, 0.2], [2.0, 0.5]
    terms = free_energy_terms(X, codes, dicts, alpha, p)
    e1 = X - codes[0] @ dicts[0]
    e2 = codes[0] - codes[1] @ dicts[1]
    want1 = 0.5 * 2.0 * (e1**2).sum(1) + 0.3 * codes[0].abs().sum(1)
    want2 = 0.5 * 0.5 * (e2**2).sum(1) + 0.2 * codes[1].abs().sum(1)
    np.testing.assert_allclose(terms[:, 0].numpy(), want1.numpy(), rtol=1e-13)
    np.testing.assert_allclose(terms[:, 1].numpy(), want2.numpy(), rtol=1e-13)
    np.testing.assert_allclose(free_energy(X, codes, dicts, alpha, p).numpy(),
                               (want1 + want2).numpy(), rtol=1e-13)


@pytest.mark.parametrize("init", ["zeros", "bottom_up"])
@pytest.mark.parametrize("positive", [False, True])
def test_free_energy_never_increases_over_iterations(init, positive):
    X, dicts = _model(sizes=(12, 20, 8, 4))
    alpha, p = [0.2, 0.1, 0.05], [1.0, 2.0, 0.5]
    res = joint_inference(X, dicts, alpha, p, init=init, positive=positive, tol=0,
                          max_iter=300)
    h = np.asarray(res.history)
    assert len(h) == 301
    assert np.all(np.diff(h) <= 1e-12 * abs(h[0]))
    assert h[-1] < h[0] - 1e-3 * abs(h[0])  # and it does descend
    # row by row: more iterations never give a row a higher free energy
    prev = None
    for k in (1, 2, 5, 10, 40):
        F = joint_inference(X, dicts, alpha, p, init=init, positive=positive, tol=0,
                            max_iter=k).free_energy
        if prev is not None:
            assert bool((F <= prev + 1e-12).all())
        prev = F
    if positive:
        assert all(bool((c >= 0).all()) for c in res.codes)


def test_joint_inference_stops_on_the_duality_gap():
    X, dicts = _model()
    loose = joint_inference(X, dicts, [0.2, 0.1], [1.0, 1.0], tol=1e-3, max_iter=5000)
    tight = joint_inference(X, dicts, [0.2, 0.1], [1.0, 1.0], tol=1e-7, max_iter=5000)
    assert loose.converged and tight.converged
    assert loose.n_iter < tight.n_iter < 5000
    # the gap bounds the distance to the optimum
    gap_bound = 1e-3 * loose.free_energy
    assert bool((loose.free_energy - tight.free_energy <= gap_bound + 1e-9).all())
    # each row's result does not depend on the other rows of the batch
    half = joint_inference(X[:17], dicts, [0.2, 0.1], [1.0, 1.0], tol=1e-3, max_iter=5000)
    for a, b in zip(half.codes, loose.codes, strict=True):
        np.testing.assert_allclose(a.numpy(), b[:17].numpy(), rtol=1e-10, atol=1e-12)


def test_joint_is_below_bottom_up(fitted):
    est, X = fitted
    F_joint = est.free_energy(X)
    F_bu = est.set_params(inference="bottom_up").free_energy(X)
    est.set_params(inference="joint")
    assert np.all(F_joint <= F_bu + 1e-10)
    # strictly below on two levels: the top-down term reshapes the first level
    assert F_joint.mean() < F_bu.mean() * (1 - 1e-3)
    assert np.mean(F_joint < F_bu - 1e-8) > 0.5


def test_bottom_up_is_one_lasso_per_level():
    X, dicts = _model()
    res = bottom_up_inference(X, dicts, [0.2, 0.3], [1.0, 2.0])
    a1 = np.asarray(sparse_encode(X.numpy(), dicts[0].numpy(), alpha=0.2, device="cpu"))
    a2 = np.asarray(sparse_encode(a1, dicts[1].numpy(), alpha=0.15, device="cpu"))
    np.testing.assert_allclose(res.codes[0].numpy(), a1, atol=1e-10)
    np.testing.assert_allclose(res.codes[1].numpy(), a2, atol=1e-10)


# ------------------------------------------------------------------- the estimator
def test_outputs_are_consistent(fitted):
    est, X = fitted
    levels = est.transform_levels(X)
    assert [c.shape for c in levels] == [(len(X), 16), (len(X), 5)]
    assert all(sp.issparse(c) for c in levels)
    top = est.transform(X)
    np.testing.assert_allclose(top.toarray(), levels[-1].toarray(), rtol=1e-12, atol=1e-14)
    # top-down generation: a_2 D_2 D_1
    D1, D2 = est.components_
    np.testing.assert_allclose(est.inverse_transform(top), top.toarray() @ D2 @ D1,
                               rtol=1e-10, atol=1e-12)
    pred = est.predict_levels(X)
    err = est.prediction_errors(X)
    np.testing.assert_allclose(pred[0] + err[0], X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pred[1] + err[1], levels[0].toarray(), atol=1e-12)
    np.testing.assert_allclose(pred[1], levels[1].toarray() @ D2, atol=1e-12)
    # per-level terms sum to F, and the training curves agree
    terms = est.free_energy(X, per_level=True)
    np.testing.assert_allclose(terms.sum(1), est.free_energy(X), rtol=1e-12)
    np.testing.assert_allclose(terms[:, 0], 0.5 * (err[0] ** 2).sum(1)
                               + 0.2 * np.abs(levels[0].toarray()).sum(1), rtol=1e-10)
    assert est.free_energy_curve_.shape == (3, 2)
    np.testing.assert_allclose(est.free_energy_curve_.sum(1), est.loss_curve_, rtol=1e-12)
    dense = est.set_params(sparse_output=False).transform_levels(X[:7])
    est.set_params(sparse_output=True)
    np.testing.assert_allclose(dense[0], levels[0][:7].toarray(), rtol=1e-12, atol=1e-14)
    for D in est.components_:
        np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1, rtol=1e-10)


def test_training_lowers_the_free_energy():
    X = _data()
    est = HierarchicalSparseCoder(n_components=(16, 5), alpha=(0.2, 0.1), max_iter=6,
                                  batch_size=64, random_state=0, device="cpu").fit(X)
    assert est.loss_curve_[-1] < est.loss_curve_[0]
    assert est.history_["free_energy_2"].shape == (6 * 4,)
    n_steps = est.n_steps_
    est.partial_fit(X[:64])
    assert est.n_steps_ == n_steps + 1 and est.free_energy_curve_.shape == (7, 2)


def test_float32_and_float64():
    X = _data(n=128)
    kw = dict(n_components=(16, 5), alpha=(0.2, 0.1), max_iter=1, batch_size=64,
              random_state=0, device="cpu")
    e64 = HierarchicalSparseCoder(**kw).fit(X)
    e32 = HierarchicalSparseCoder(**kw).fit(X.astype(np.float32))
    assert all(D.dtype == np.float32 for D in e32.components_)
    assert e32.transform(X.astype(np.float32)).dtype == np.float32
    assert e32.free_energy(X.astype(np.float32)).dtype == np.float32
    assert e64.transform(X).dtype == np.float64
    # the same model in both dtypes gives the same free energy
    e64.components_ = [D.astype(np.float64) for D in e32.components_]
    np.testing.assert_allclose(e32.free_energy(X.astype(np.float32)),
                               e64.free_energy(X), rtol=2e-3, atol=1e-4)


def test_pickle_and_same_seed():
    X = _data(n=128)
    kw = dict(n_components=(16, 5), alpha=0.15, max_iter=1, batch_size=64, device="cpu")
    a = HierarchicalSparseCoder(random_state=3, **kw).fit(X)
    b = HierarchicalSparseCoder(random_state=3, **kw).fit(X)
    c = HierarchicalSparseCoder(random_state=4, **kw).fit(X)
    for Da, Db in zip(a.components_, b.components_, strict=True):
        np.testing.assert_array_equal(Da, Db)
    assert not np.allclose(a.components_[1], c.components_[1])
    r = pickle.loads(pickle.dumps(a))
    np.testing.assert_allclose(r.transform(X).toarray(), a.transform(X).toarray(), rtol=1e-12,
                               atol=1e-14)
    r.partial_fit(X)
    a.partial_fit(X)
    np.testing.assert_array_equal(r.components_[1], a.components_[1])


def test_learned_sigma_is_the_running_mse_of_the_prediction_errors():
    X = _data(n=128)
    est = HierarchicalSparseCoder(n_components=(16, 5), alpha=(0.2, 0.1), learn_sigma=True,
                                  forget_window=128, batch_size=128, max_iter=2,
                                  random_state=0, device="cpu").fit(X)
    old = est.sigma_**2
    errors = est.prediction_errors(X)  # with the current precisions, as the next step
    targets = [X, est.transform_levels(X)[0].toarray()]
    beta = 1 / 129  # forgetting of a window of one batch
    want = [beta * o + (1 - beta) * max(np.mean(e**2), 1e-2 * np.mean(t**2) + 1e-12)
            for o, e, t in zip(old, errors, targets, strict=True)]
    est.partial_fit(X)
    np.testing.assert_allclose(est.sigma_**2, want, rtol=1e-3)
    assert est.sigma_.shape == (2,) and not np.allclose(est.sigma_, 1.0)


def test_score_prefers_an_intermediate_alpha():
    X, planted = _data(n=200, planted=True)
    est = HierarchicalSparseCoder(n_components=(16, 5), max_iter=1, batch_size=64,
                                  random_state=0, device="cpu").fit(X[:64])
    est.components_ = planted
    grid = [0.003, 0.03, 0.3, 3.0]
    scores = [est.set_params(alpha=a).score(X) for a in grid]
    F = [est.set_params(alpha=a).free_energy(X).mean() for a in grid]
    assert 0 < int(np.argmax(scores)) < len(grid) - 1, scores
    # the free energy alone always prefers the smallest alpha
    assert int(np.argmin(F)) == 0 and np.all(np.diff(F) > 0)


def test_information_criterion_by_hand():
    n, sizes = 10, (8, 6, 3)
    ic = hierarchical_information_criterion(n, sizes, [4.0, 2.0], [12, 5], [0.0, 8.0])
    want = (8 * np.log(4.0 / 80) + (np.log(8) + 2 * np.log(6)) * 12 / 10
            + 6 * np.log(2.0 / 8.0) + (np.log(6) + 2 * np.log(3)) * 5 / 10)
    assert ic == pytest.approx(want, rel=1e-12)
    # a level whose target is all zero adds nothing
    assert hierarchical_information_criterion(n, sizes, [4.0, 0.0], [12, 0], [0, 0.0]) == \
        pytest.approx(8 * np.log(4.0 / 80) + (np.log(8) + 2 * np.log(6)) * 12 / 10)


@pytest.mark.parametrize("params, match", [
    ({"n_components": ()}, "n_components is empty"),
    ({"n_components": (4, 0)}, "at least one atom"),
    ({"n_components": (4, 2), "alpha": (0.1, 0.2, 0.3)}, "one value per level"),
    ({"n_components": (4, 2), "sigma": (1.0,) * 3}, "one value per level"),
    ({"n_components": (4, 2), "alpha": (0.1, -0.2)}, "> 0 at every level"),
])
def test_bad_parameters(params, match):
    X = _data(n=40)
    with pytest.raises(ValueError, match=match):
        HierarchicalSparseCoder(device="cpu", **params).fit(X)


def test_nan_and_failed_partial_fit_leave_the_state():
    X = _data(n=64)
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        HierarchicalSparseCoder(n_components=(4, 2), device="cpu").fit(bad)
    est = HierarchicalSparseCoder(n_components=(4, 2), max_iter=1, batch_size=32,
                                  random_state=0, device="cpu").fit(X)
    before = [D.copy() for D in est.components_]
    with pytest.raises(ValueError, match="NaN"):
        est.partial_fit(bad)
    for a, b in zip(before, est.components_, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="n_components changed"):
        est.set_params(n_components=(4, 3)).partial_fit(X)


# ------------------------------------------------------------------------ the module
def test_module_matches_the_estimator(fitted):
    est, X = fitted
    model = HierarchicalSparseCoding.from_estimator(est)
    x = torch.as_tensor(X)
    codes = model.encode(x)
    for a, c in zip(codes, est.transform_levels(X), strict=True):
        np.testing.assert_allclose(a.numpy(), c.toarray(), atol=1e-12)
    np.testing.assert_allclose(model.free_energy(x, codes).detach().numpy(),
                               est.free_energy(X), rtol=1e-12)
    np.testing.assert_allclose(model.decode(codes[-1]).detach().numpy(),
                               est.inverse_transform(est.transform(X)), atol=1e-12)
    errs = model.prediction_errors(x, codes)
    for e, f in zip(errs, est.prediction_errors(X), strict=True):
        np.testing.assert_allclose(e.detach().numpy(), f, atol=1e-12)


def test_module_training_loop_and_gradients():
    X = torch.as_tensor(_data(), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    model = HierarchicalSparseCoding(12, (16, 5), alpha=(0.2, 0.1), learn_sigma=True,
                                     max_iter=100, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    first = None
    for _ in range(10):
        codes = model.encode(X)
        loss = model.free_energy(X, codes).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.normalize_()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first
    assert model.log_precisions.grad is not None
    # the gradient of the module's loss with respect to D is autograd's of F
    codes = [c.double() for c in model.encode(X)]
    D = [p.detach().double().requires_grad_() for p in model.dictionaries]
    p = model.precisions.detach().double()
    F = free_energy_terms(X.double(), codes, D, [0.2, 0.1], p, normalizer=True).sum()
    (gD1,) = torch.autograd.grad(F, [D[0]])
    e1 = X.double() - codes[0] @ D[0].detach()
    np.testing.assert_allclose(gD1.numpy(), (-p[0] * codes[0].T @ e1).numpy(), rtol=1e-10,
                               atol=1e-10)


def test_module_differentiable_encode():
    X, dicts = _model(n=8)
    x = X.clone().requires_grad_()
    model = HierarchicalSparseCoding(12, (20, 6), alpha=(0.2, 0.1), dtype=torch.float64,
                                     n_unroll=300)
    with torch.no_grad():
        for P, D in zip(model.dictionaries, dicts, strict=True):
            P.copy_(D)
    codes = model.encode(x, differentiable=True)
    codes[-1].abs().sum().backward()
    assert x.grad is not None and model.dictionaries[0].grad is not None
    # unrolled codes approach the stopped solver's
    ref = joint_inference(X, dicts, [0.2, 0.1], [1.0, 1.0], tol=1e-7, max_iter=5000).free_energy
    F = free_energy(X, [c.detach() for c in codes], dicts, [0.2, 0.1], [1.0, 1.0])
    assert bool((F - ref <= 1e-3 * ref).all())
    same = unrolled_inference(X, dicts, [0.2, 0.1], [1.0, 1.0], n_iter=300)
    np.testing.assert_allclose(same[0].numpy(), codes[0].detach().numpy(), atol=1e-12)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="at least one level"):
        HierarchicalSparseCoding(4, [])
    with pytest.raises(ValueError, match="one value per level"):
        HierarchicalSparseCoding(4, (3, 2), alpha=(0.1, 0.2, 0.3))


def test_exact_solver_keeps_the_callers_torch_threads():
    # the bottom-up levels call the numba homotopy, whose OpenMP runtime torch shares
    X, (D,) = _model(sizes=(12, 20), n=200)
    torch.set_num_threads(1)  # as the one_thread fixture has
    bottom_up_inference(X, [D], [0.1], [1.0])
    assert torch.get_num_threads() == 1



@pytest.mark.cuda
@pytest.mark.parametrize("inference", ["joint", "bottom_up"])
def test_cuda_matches_cpu(fitted, inference):
    est, X = fitted
    cpu = est.set_params(inference=inference, device="cpu").free_energy(X, per_level=True)
    gpu = est.set_params(device="cuda").free_energy(X, per_level=True)
    est.set_params(inference="joint", device="cpu")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-6, atol=1e-8)
    model = HierarchicalSparseCoding.from_estimator(est).to("cuda")
    x = torch.as_tensor(X, device="cuda")
    F = model.free_energy(x, per_level=True).detach().cpu().numpy()
    np.testing.assert_allclose(F, est.free_energy(X, per_level=True), rtol=1e-6, atol=1e-8)
