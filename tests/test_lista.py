"""LISTAEncoder, skdict.nn.LISTA and skdict.nn.LCALayer against ISTA, the exact
lasso, LCA and autograd."""

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from skdict import LCASparseCoder, LISTAEncoder, SparseCoder
from skdict.nn import LISTA, LCALayer, alista_weight
from skdict.nn.lista import lipschitz_constant
from skdict.operators import DenseOperator
from skdict.solvers import ista, lasso_objective_dense, lca

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ["lista", "lista_cp", "alista", "lfista"]


def _problem(n=600, K=40, P=20, density=0.1, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((K, P))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    A = (rng.random((n, K)) < density) * rng.standard_normal((n, K))
    X = A @ D + 0.01 * rng.standard_normal((n, P))
    return D.astype(dtype), X.astype(dtype), A


def _ista(X, D, alpha, n_iter):
    Xt, Dt = torch.as_tensor(X), torch.as_tensor(D)
    # the step 1 / L with L the exact largest eigenvalue of D D^T, as LISTA's init
    return ista(Xt @ Dt.T, DenseOperator(Dt), alpha, xnorm2=None, max_iter=n_iter,
                L=lipschitz_constant(Dt)).codes


# ----------------------------------------------------------------- the modules
@pytest.mark.parametrize("variant", ["lista", "lista_cp"])
def test_untrained_layers_are_ista_iterates(variant):
    D, X, _ = _problem(n=50)
    net = LISTA(torch.as_tensor(D), n_layers=6, alpha=0.1, variant=variant)
    layers = net(torch.as_tensor(X), all_layers=True)
    for k, a in enumerate(layers, start=1):
        ref = _ista(X, D, 0.1, k)
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)


def _fista_numpy(X, D, alpha, n_iter):
    """Plain FISTA from zero (Beck & Teboulle 2009, no restart), written out in
    numpy as the closed-form oracle of the untrained learned FISTA."""
    L = np.linalg.eigvalsh(D @ D.T)[-1]
    a = np.zeros((X.shape[0], D.shape[0]))
    y, t, out = a.copy(), 1.0, []
    for _ in range(n_iter):
        z = y - (y @ D - X) @ D.T / L
        a_new = np.sign(z) * np.maximum(np.abs(z) - alpha / L, 0.0)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        y = a_new + (t - 1) / t_new * (a_new - a)
        a, t = a_new, t_new
        out.append(a)
    return out


def _lfista_matches(oracle, rho=0.0, n_layers=8, alpha=0.1):
    """Run an lfista network (per-row step weight ``rho``) and ``oracle(X, D,
    alpha, n_layers)`` on one problem; assert every layer equal. Returns the
    problem, the network and the oracle's iterates."""
    D, X, _ = _problem(n=50)
    net = LISTA(torch.as_tensor(D), n_layers=n_layers, alpha=alpha, variant="lfista")
    with torch.no_grad():
        net.rho.fill_(rho)
        layers = net(torch.as_tensor(X), all_layers=True)
    ref = oracle(X, D, alpha, n_layers)
    for a, r in zip(layers, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), r, rtol=1e-10, atol=1e-12)
    return D, X, net, ref


def test_untrained_lfista_layers_are_fista_iterates():
    D, X, net, ref = _lfista_matches(_fista_numpy)
    # and not ISTA's: momentum changes the iterates from the third on
    assert np.abs(ref[2] - _ista(X, D, 0.1, 3).numpy()).max() > 1e-3
    # FISTA's momentum: 0 for the first two layers, then (t_k - 1) / t_{k+1}
    np.testing.assert_allclose(net.beta.detach().numpy()[:4],
                               [0.0, 0.0, 0.28175352512532087, 0.434042782780302],
                               rtol=1e-12)


def _fista_bb_numpy(X, D, alpha, n_iter, rho, cap=8.0):
    """FISTA whose step and threshold on row i are scaled by ``1 + rho (c_i -
    1)``, ``c_i`` the Barzilai-Borwein ratio ``L ||s||^2 / ||s D||^2`` of the
    row's last move ``s`` clipped to ``[1, cap]``: the oracle of lfista's
    per-row step, written from its definition."""
    L = np.linalg.eigvalsh(D @ D.T)[-1]
    a = prev = np.zeros((X.shape[0], D.shape[0]))
    t = [1.0]
    for _ in range(n_iter):
        t.append((1 + np.sqrt(1 + 4 * t[-1] ** 2)) / 2)
    out = []
    for k in range(n_iter):
        beta = (t[k - 1] - 1) / t[k] if k else 0.0
        g = np.ones((X.shape[0], 1))
        if k:
            s = a - prev
            num, den = (s * s).sum(1), ((s @ D) ** 2).sum(1)
            c = np.ones_like(num)
            moved = den > 0
            c[moved] = np.clip(L * num[moved] / den[moved], 1.0, cap)
            g = (1 + rho * (c - 1))[:, None]
        z = a + beta * (a - prev)
        v = z + g * (X - z @ D) @ D.T / L
        prev, a = a, np.sign(v) * np.maximum(np.abs(v) - g * alpha / L, 0.0)
        out.append(a)
    return out


def test_lfista_per_row_step_matches_its_definition():
    D, X, _, ref = _lfista_matches(
        lambda X, D, alpha, n: _fista_bb_numpy(X, D, alpha, n, 0.5), rho=0.5)
    # the gain acts from the second layer on (the first move is the first layer's)
    plain = _fista_numpy(X, D, 0.1, 8)
    np.testing.assert_allclose(ref[0], plain[0], rtol=1e-12)
    assert np.abs(ref[1] - plain[1]).max() > 1e-3
    # and the reason for it: on this 2x overcomplete dictionary the untrained
    # gain already lowers the lasso objective reached in 8 layers
    def obj(a):
        return (0.5 * ((X - a @ D) ** 2).sum() + 0.1 * np.abs(a).sum())
    assert obj(ref[-1]) < obj(plain[-1])


def test_lfista_per_row_step_finite_gradients_on_rows_that_do_not_move():
    """A zero row never moves (its ratio is 0 / 0): its codes stay zero and
    every gradient stays finite."""
    D, X, _ = _problem(n=20, dtype=np.float32)
    X[:3] = 0.0
    net = LISTA(torch.as_tensor(D), n_layers=6, alpha=0.1, variant="lfista")
    with torch.no_grad():
        net.rho.fill_(1.0)
    x = torch.as_tensor(X)
    out = net(x)
    assert torch.all(out[:3] == 0)
    net.objective(x, out).sum().backward()
    for name, p in net.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_layer_is_first_ista_iterate(variant):
    """n_layers=1 is ISTA's first step from zero (for ALISTA with its own weight:
    soft(gamma x W, theta) with gamma = 1 / ||D W||, theta = alpha gamma)."""
    D, X, _ = _problem(n=30)
    Dt, Xt = torch.as_tensor(D), torch.as_tensor(X)
    net = LISTA(Dt, n_layers=1, alpha=0.2, variant=variant, support_selection=0.3)
    out = net(Xt)
    if variant == "alista":
        W = alista_weight(Dt)
        g = 1 / torch.linalg.matrix_norm(Dt @ W, ord=2)
        z = g * (Xt @ W)
        ref = torch.sign(z) * torch.clamp(z.abs() - 0.2 * g, min=0)
    else:
        ref = _ista(X, D, 0.2, 1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_alista_weight_matches_definition():
    """W minimises ||D W||_F^2 subject to d_i . w_i = 1: each column solves the
    KKT system [[2 D^T D, d_i], [d_i^T, 0]] [w; mu] = [0; 1]."""
    D, _, _ = _problem(K=30, P=12)
    W = alista_weight(torch.as_tensor(D)).numpy()
    np.testing.assert_allclose(np.diag(D @ W), 1.0, rtol=1e-12)
    M = D.T @ D
    P = D.shape[1]
    for i in range(D.shape[0]):
        kkt = np.zeros((P + 1, P + 1))
        kkt[:P, :P] = 2 * M
        kkt[:P, P] = kkt[P, :P] = D[i]
        rhs = np.zeros(P + 1)
        rhs[P] = 1.0
        np.testing.assert_allclose(W[:, i], np.linalg.solve(kkt, rhs)[:P], rtol=1e-8,
                                   atol=1e-10)
    # any other feasible point has a larger objective
    rng = np.random.default_rng(1)
    V = rng.standard_normal(W.shape)
    V -= D.T * (np.sum(D * V.T, 1) / np.sum(D * D, 1))  # keeps d_i . w_i = 1
    assert np.linalg.norm(D @ (W + 1e-3 * V)) > np.linalg.norm(D @ W)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lista_gradcheck(variant):
    D, X, _ = _problem(n=4, K=6, P=4, density=0.5)
    net = LISTA(torch.as_tensor(D), n_layers=3, alpha=0.05, variant=variant,
                support_selection=0.4)
    x = torch.as_tensor(X).requires_grad_(True)
    names = sorted(n for n, _ in net.named_parameters())
    params = [dict(net.named_parameters())[n] for n in names]

    def f(x, *ps):
        return torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (x,))

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params])
    if variant == "lfista":  # through the per-row step too (it starts at weight 0)
        inputs[1 + names.index("rho")].data.fill_(0.5)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_lca_layer_follows_lca_dynamics():
    D, X, _ = _problem(n=20)
    layer = LCALayer(D.shape[1], D.shape[0], alpha=0.1, n_iter=25,
                     dictionary=torch.as_tensor(D * 3.0))  # normalised inside
    out = layer(torch.as_tensor(X))
    Dt = torch.as_tensor(D)
    # the layer's default tau is the exact largest eigenvalue of G
    ref = lca(torch.as_tensor(X) @ Dt.T, DenseOperator(Dt), 0.1, tol=0.0, max_iter=25,
              tau=lipschitz_constant(Dt), check_every=10**9)
    torch.testing.assert_close(out.codes, ref.codes, rtol=1e-10, atol=1e-12)
    r = torch.as_tensor(X) - out.codes @ Dt
    torch.testing.assert_close(out.reconstruction_loss, 0.5 * (r * r).sum(1).mean())
    torch.testing.assert_close(out.sparsity_loss, 0.1 * out.codes.abs().sum(1).mean())
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.sparsity_loss)


def test_lca_layer_converges_to_lasso():
    D, X, _ = _problem(n=10)
    layer = LCALayer(D.shape[1], D.shape[0], alpha=0.1, n_iter=3000,
                     dictionary=torch.as_tensor(D))
    exact = SparseCoder(D, alpha=0.1, device="cpu").transform(X).toarray()
    np.testing.assert_allclose(layer(torch.as_tensor(X)).codes.detach().numpy(), exact,
                               atol=1e-6)


def test_lca_layer_gradcheck_and_learning():
    g = torch.Generator().manual_seed(0)
    # a fixed tau: the default (largest eigenvalue of G) is a constant to autograd
    layer = LCALayer(4, 6, alpha=0.05, n_iter=8, tau=3.0, generator=g, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, generator=g)

    def f(w, x):
        return torch.func.functional_call(layer, {"weight": w}, (x,)).loss

    w = layer.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (w, x.clone().requires_grad_(True)), eps=1e-6,
                                    atol=1e-5)
    # a few Adam steps lower the energy; atoms stay unit-norm
    X = torch.randn(64, 4, dtype=torch.float64, generator=g)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    first = float(layer(X).loss.detach())
    for _ in range(30):
        opt.zero_grad()
        layer(X).loss.backward()
        opt.step()
    assert float(layer(X).loss.detach()) < first
    torch.testing.assert_close(layer.dictionary.norm(dim=1),
                               torch.ones(6, dtype=torch.float64))


def test_modules_bad_arguments():
    D = torch.randn(5, 3)
    with pytest.raises(ValueError, match="n_layers"):
        LISTA(D, n_layers=0)
    with pytest.raises(ValueError, match="variant"):
        LISTA(D, variant="nope")
    with pytest.raises(ValueError, match="lfista"):  # the error lists the variants
        LISTA(D, variant="fista")
    with pytest.raises(ValueError, match="n_iter"):
        LCALayer(3, 5, n_iter=0)
    with pytest.raises(ValueError, match="shape"):
        LCALayer(3, 5, dictionary=torch.randn(4, 3))


# ----------------------------------------------------------------- the estimator
@pytest.fixture(scope="module")
def trained():
    D, X, _ = _problem(n=1200)
    enc = LISTAEncoder(D, n_layers=5, alpha=0.1, max_iter=15, random_state=0,
                       device="cpu").fit(X[:1000])
    return D, X, enc


def test_trained_encoder_beats_ista_on_held_out_rows(trained):
    D, X, enc = trained
    Xh = X[1000:]
    F_lista = lasso_objective_dense(torch.as_tensor(Xh), torch.as_tensor(
        enc.transform(Xh).toarray()), torch.as_tensor(D), 0.1).sum()
    F_ista = lasso_objective_dense(torch.as_tensor(Xh), _ista(Xh, D, 0.1, 5),
                                   torch.as_tensor(D), 0.1).sum()
    exact = SparseCoder(D, alpha=0.1, device="cpu").transform(Xh).toarray()
    F_star = lasso_objective_dense(torch.as_tensor(Xh), torch.as_tensor(exact),
                                   torch.as_tensor(D), 0.1).sum()
    gap_lista = float((F_lista - F_star) / F_star)
    gap_ista = float((F_ista - F_star) / F_star)
    assert gap_lista < 0.5 * gap_ista, (gap_lista, gap_ista)
    # the validation gap is the held-out gap of the last layer, and it shrinks
    assert enc.layer_gap_.shape == (5,) and enc.layer_nmse_ is None
    assert enc.layer_gap_[-1] < enc.layer_gap_[0]
    assert enc.score(Xh) == pytest.approx(-float(F_lista) / len(Xh), rel=1e-10)


def test_trained_lfista_beats_fista_on_held_out_rows():
    # learned FISTA starts as FISTA; training must improve on it, held out
    D, X, _ = _problem(n=1200)
    enc = LISTAEncoder(D, n_layers=5, alpha=0.1, variant="lfista", max_iter=15,
                       random_state=0, device="cpu").fit(X[:1000])
    Xh, Dt = X[1000:], torch.as_tensor(D)

    def F(A):
        return float(lasso_objective_dense(torch.as_tensor(Xh), torch.as_tensor(A), Dt,
                                           0.1).sum())

    F_star = F(SparseCoder(D, alpha=0.1, device="cpu").transform(Xh).toarray())
    gap_lfista = (F(enc.transform(Xh).toarray()) - F_star) / F_star
    gap_fista = (F(_fista_numpy(Xh, D, 0.1, 5)[-1]) - F_star) / F_star
    assert gap_lfista < 0.5 * gap_fista, (gap_lfista, gap_fista)
    assert enc.variant_ == "lfista" and enc.weights_["beta"].shape == (5,)


def test_transform_is_csr_of_the_module(trained):
    D, X, enc = trained
    codes = enc.transform(X[:50])
    assert sp.issparse(codes) and codes.format == "csr"
    assert not np.any(codes.data == 0)
    net = enc.to_module()
    ref = net(torch.as_tensor(X[:50])).numpy()
    np.testing.assert_array_equal(codes.toarray(), ref)
    np.testing.assert_allclose(enc.inverse_transform(codes), ref @ D, rtol=1e-12)


def test_targets_from_y_dense_and_csr_match_exact():
    D, X, _ = _problem(n=300)
    exact = SparseCoder(D, alpha=0.1, device="cpu").transform(X)
    params = dict(n_layers=3, alpha=0.1, max_iter=3, loss="codes", random_state=0,
                  device="cpu")
    a = LISTAEncoder(D, **params).fit(X)
    b = LISTAEncoder(D, **params).fit(X, exact.toarray())
    c = LISTAEncoder(D, **params).fit(X, exact)
    for k in a.weights_:
        np.testing.assert_allclose(b.weights_[k], a.weights_[k], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(c.weights_[k], a.weights_[k], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.layer_gap_, a.layer_gap_, rtol=1e-9)


def test_planted_codes_as_targets():
    D, X, A = _problem(n=900, density=0.05)
    enc = LISTAEncoder(D, n_layers=6, alpha=0.01, n_steps=200, batch_size=64, loss="codes",
                       random_state=0, device="cpu").fit(X[:800], A[:800])
    err = enc.transform(X[800:]).toarray() - A[800:]
    err_ista = _ista(X[800:], D, 0.01, 6).numpy() - A[800:]
    assert np.sum(err**2) < 0.5 * np.sum(err_ista**2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_and_objective_loss(variant):
    D, X, _ = _problem(n=400)
    enc = LISTAEncoder(D, n_layers=4, alpha=0.1, variant=variant, loss="objective",
                       max_iter=6, random_state=0, device="cpu").fit(X)
    assert enc.layer_nmse_ is None
    assert enc.layer_gap_[-1] < enc.layer_gap_[0]
    assert np.all(np.isfinite(enc.history_["loss"]))
    # the fitted encoder pickles, and so does the network it was trained as
    again = pickle.loads(pickle.dumps(enc))
    np.testing.assert_array_equal(again.transform(X[:30]).toarray(),
                                  enc.transform(X[:30]).toarray())
    net = pickle.loads(pickle.dumps(enc.to_module()))
    assert net.variant == variant
    np.testing.assert_array_equal(net(torch.as_tensor(X[:30])).numpy(),
                                  enc.transform(X[:30]).toarray())



@pytest.mark.parametrize(("variant", "lr"), [("lista_cp", 30.0), ("lista", 3.0)])
def test_fit_keeps_the_best_validation_epoch(variant, lr):
    # a learning rate far too large makes passes blow up: fit must end on the
    # best parameters it saw (the untrained network included), restarting from
    # them at a lower rate rather than drifting on from a spike
    D, X, _ = _problem(n=500)
    enc = LISTAEncoder(D, n_layers=4, alpha=0.1, variant=variant, lr=lr, max_iter=6,
                       validation_fraction=0.0, random_state=0, device="cpu").fit(X)
    curve = enc.validation_loss_curve_
    assert curve.shape == (6,) and np.all(np.isfinite(curve))
    # with no row held out the validation rows are all of X (fewer than 1024)
    Xt = torch.as_tensor(X)
    scale = float(0.5 * Xt.pow(2).sum(1).mean())

    def loss(net):
        with torch.no_grad():
            return float(net.objective(Xt, net(Xt)).mean()) / scale

    untrained = loss(LISTA(torch.as_tensor(D), 4, alpha=0.1, variant=variant,
                           support_selection=enc.support_selection_))
    assert curve[0] > 10 * untrained  # the first pass blew up
    assert loss(enc.to_module()) == pytest.approx(min(untrained, curve.min()), rel=1e-9)
    assert curve[-1] < 1.5 * untrained  # and the restarts at lower rates recovered



def test_fit_checks_for_spikes_within_a_long_pass():
    # one pass of 600 steps at a rate that blows up: the validation rows are
    # checked every 256 steps too, so the spike is rolled back (and the rate
    # halved) within the pass, not only at its end
    D, X, _ = _problem(n=600)
    enc = LISTAEncoder(D, n_layers=4, alpha=0.1, variant="lista_cp", lr=30.0, max_iter=1,
                       batch_size=1, validation_fraction=0.0, random_state=0,
                       device="cpu").fit(X)
    assert enc.validation_loss_curve_.shape == (1,)  # one entry per pass
    st = enc._train_state
    groups = st["optimizer"]["param_groups"]
    rates = [g["base_lr"] / (30.0 * st["lr_scale"][k])
             for g, k in zip(groups, sorted(st["lr_scale"]), strict=True)]
    # halved at the check after 256 steps, and again after 512 or at the end
    assert rates == pytest.approx([0.25, 0.25])


def test_check_rolls_back_a_spike_small_against_the_gain_large_against_the_gap():
    # late in training the gain over the untrained network dwarfs the gap to the
    # exact codes' objective: a check whose loss grew that gap by more than half
    # restarts from the best parameters at half the rate, a smaller rise does not
    from skdict.training.lista import _SPIKE_EXCESS, LISTALearner, exact_codes

    D, X, _ = _problem(n=300)
    enc = LISTAEncoder(D, n_layers=12, alpha=0.1, variant="lfista", max_iter=15,
                       random_state=0, device="cpu").fit(X)
    Dt, Xt = torch.as_tensor(D), torch.as_tensor(X)

    def learner_at(shift):
        lr = LISTALearner(enc, Dt, 0.1, 0.0, "cpu", np.float64, variant="lfista")
        lr.val = (Xt, exact_codes(Xt, Dt, 0.1, device="cpu"), None)
        lr.scale, lr.track_best = 1.0, True
        lr.module = enc.to_module(dtype=torch.float64)
        lr.init_val = lr.val_loss(lr.new_module())
        lr.best = lr.val_loss(lr.module)
        lr.best_params = {k: p.clone() for k, p in lr.module.named_parameters()}
        lr.opt = torch.optim.Adam(lr.module.parameters(), lr=1.0)
        lr.opt.param_groups[0]["base_lr"] = 1.0
        with torch.no_grad():
            W = lr.module.W
            g = torch.Generator().manual_seed(0)
            W.add_(shift * W.std() * torch.randn(W.shape, generator=g, dtype=W.dtype))
        return lr

    base = learner_at(0.0)
    floor = base._val_floor(base.module)
    outcomes = set()
    for shift in (0.1, 0.3, 0.5):
        lr = learner_at(shift)
        rise, excess = lr.val_loss(lr.module) - lr.best, lr.best - floor
        assert 0 < rise < 0.25 * (lr.init_val - lr.best)  # the old rule let it pass
        lr._check_best()
        rolled = lr.opt.param_groups[0]["base_lr"] == 0.5
        assert rolled == (rise > _SPIKE_EXCESS * excess), (shift, rise, excess)
        if rolled:
            assert lr.val_loss(lr.module) == lr.best
        outcomes.add(rolled)
    assert outcomes == {False, True}


def test_auto_variant_alista_for_random_lfista_for_learned_dictionaries():
    # ALISTA's fixed weight beats ISTA on a random dictionary and loses to it on
    # one learned from natural patches; "auto" must pick by exactly that test
    from skdict.datasets import load_natural_patches

    X = load_natural_patches(patch_size=6, n_patches=3000, normalize=True, random_state=0,
                             dtype=np.float64)
    X = X[np.linalg.norm(X, axis=1) > 0]
    learned = LCASparseCoder(n_components=72, alpha=0.1, fit_algorithm="exact", max_iter=3,
                             random_state=0).fit(X[:2500]).components_
    Dr, Xr, _ = _problem(n=400, K=60, P=20)
    for D, Xv, expected in [(Dr, Xr, "alista"), (learned, X[2500:], "lfista")]:
        enc = LISTAEncoder(D, n_layers=4, alpha=0.1, max_iter=1, validation_fraction=0.0,
                           random_state=0, device="cpu").fit(Xv)
        assert enc.variant == "auto" and enc.variant_ == expected
        x = torch.as_tensor(Xv)
        with torch.no_grad():
            f = {v: float(net.objective(x, net(x)).sum()) for v in ("alista", "lista_cp")
                 for net in [LISTA(torch.as_tensor(D), 4, alpha=0.1, variant=v,
                                   support_selection=enc.support_selection_)]}
        assert (f["alista"] <= f["lista_cp"]) == (expected == "alista"), f
        # the trained network is of the chosen variant, and so is to_module()
        assert enc.to_module().variant == expected
        assert ("S" in enc.weights_) is False and ("gamma" in enc.weights_) == (
            expected == "alista") and ("beta" in enc.weights_) == (expected == "lfista")


def test_dtypes_and_seed():
    D, X, _ = _problem(n=300)
    params = dict(n_layers=3, alpha=0.1, max_iter=2, random_state=3, device="cpu")
    e32 = LISTAEncoder(D, **params).fit(X.astype(np.float32))
    e64 = LISTAEncoder(D, **params).fit(X)
    assert e32.transform(X.astype(np.float32)).dtype == np.float32
    assert e64.transform(X).dtype == np.float64
    assert all(v.dtype == np.float32 for v in e32.weights_.values())
    np.testing.assert_allclose(e32.transform(X).toarray(), e64.transform(X).toarray(),
                               atol=2e-3)
    again = LISTAEncoder(D, **params).fit(X)
    for k in e64.weights_:
        np.testing.assert_array_equal(again.weights_[k], e64.weights_[k])
    other = LISTAEncoder(D, **{**params, "random_state": 4}).fit(X)
    assert not np.array_equal(other.weights_["theta"], e64.weights_["theta"])


def test_pickle_and_partial_fit(trained):
    D, X, enc = trained
    enc2 = pickle.loads(pickle.dumps(enc))
    np.testing.assert_array_equal(enc2.transform(X[:40]).toarray(),
                                  enc.transform(X[:40]).toarray())
    n = enc2.n_steps_
    enc2.partial_fit(X[:200])
    assert enc2.n_steps_ > n
    # a failing call leaves the fitted state as it was
    before = {k: v.copy() for k, v in enc2.weights_.items()}
    with pytest.raises(ValueError, match="features"):
        enc2.partial_fit(X[:50, :5])
    for k in before:
        np.testing.assert_array_equal(enc2.weights_[k], before[k])
    enc3 = pickle.loads(pickle.dumps(enc2))
    with pytest.raises(ValueError, match="n_layers changed"):
        enc3.set_params(n_layers=3).partial_fit(X[:50])


def test_dictionary_from_fitted_estimator_and_learned():
    D, X, _ = _problem(n=300)
    lca_est = LCASparseCoder(n_components=30, alpha=0.2, max_iter=2, fit_algorithm="exact",
                             random_state=0, device="cpu").fit(X)
    enc = LISTAEncoder(lca_est, n_layers=3, max_iter=2, random_state=0, device="cpu").fit(X)
    assert enc.alpha_ == 0.2
    np.testing.assert_array_equal(enc.components_, lca_est.components_)
    own = LISTAEncoder(n_components=12, n_layers=2, alpha=0.2, max_iter=1, random_state=0,
                       device="cpu").fit(X)
    assert own.components_.shape == (12, X.shape[1])


def test_clear_errors():
    D, X, _ = _problem(n=100)
    with pytest.raises(ValueError, match="dictionary has 10 features"):
        LISTAEncoder(D[:, :10], device="cpu").fit(X)
    with pytest.raises(ValueError, match="n_layers"):
        LISTAEncoder(D, n_layers=0, device="cpu").fit(X)
    with pytest.raises(ValueError, match=r"y must hold target codes of shape"):
        LISTAEncoder(D, max_iter=1, loss="codes", device="cpu").fit(X, np.zeros((100, 7)))
    with pytest.raises(ValueError, match="only loss='codes'"):
        LISTAEncoder(D, loss="objective", device="cpu").fit(X, np.zeros((100, 40)))
    with pytest.raises(ValueError, match="components_"):
        LISTAEncoder(LCASparseCoder(n_components=4), device="cpu").fit(X)
    with pytest.raises(ValueError, match="n_components"):
        LISTAEncoder(D, n_components=3, device="cpu").fit(X)
    with pytest.raises(ValueError, match="one array"):
        LISTAEncoder(D, device="cpu").fit([X[:50], X[50:]])
