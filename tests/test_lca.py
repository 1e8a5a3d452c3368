"""LCASparseCoder: learning, partial_fit, reproducibility, errors, pipelines."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import SparseCoder as SkSparseCoder
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from skdict import LCASparseCoder, SparseCoder


def _planted(n=1500, P=16, K=24, s=2, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((K, P))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    A = np.zeros((n, K))
    for i in range(n):
        A[i, rng.choice(K, s, replace=False)] = rng.choice([-1, 1], s) * rng.uniform(1, 2, s)
    return A @ D + noise * rng.standard_normal((n, P)), D


@pytest.fixture(scope="module")
def planted():
    return _planted(n=600)


@pytest.fixture(scope="module")
def fitted(planted):
    X, _ = planted
    # LCA inference in fit and transform (the default is the exact lasso)
    return LCASparseCoder(
        n_components=24,
        alpha=0.1,
        max_iter=4,
        batch_size=128,
        fit_algorithm="lca",
        transform_algorithm="lca",
        fit_max_iter=50,
        random_state=0,
        device="cpu",
    ).fit(X)


@pytest.mark.slow
def test_recovers_planted_dictionary():
    X, D = _planted(n=4000, P=16, K=12, s=2)
    est = LCASparseCoder(
        n_components=12,
        alpha=0.05,
        max_iter=30,
        batch_size=64,
        fit_max_iter=50,
        # a window of a quarter epoch: the statistics forget early, mixed atoms
        # (with Mairal's growing memory, or 10000 rows, 2-4 atoms stay duplicated)
        forget_window=1000,
        random_state=0,
        device="cpu",
    ).fit(X)
    cos = np.abs(D @ est.components_.T)
    recovered = (cos.max(1) >= 0.95).mean()
    assert recovered >= 0.9, f"only {recovered:.0%} of atoms recovered"


def test_fitted_attributes(planted, fitted):
    X, _ = planted
    assert fitted.components_.shape == (24, 16)
    np.testing.assert_allclose(np.linalg.norm(fitted.components_, axis=1), 1, atol=1e-10)
    assert fitted.n_iter_ == 4
    assert fitted.n_steps_ == 4 * int(np.ceil(len(X) / 128))
    curve = fitted.loss_curve_
    assert curve.shape == (4,) and curve[-1] < curve[0]
    assert fitted.history_["n_iter"].shape == (fitted.n_steps_,)
    assert (fitted.history_["n_iter"] >= 1).all()
    # the epoch curve is the mean of each epoch's minibatch losses
    per_epoch = fitted.history_["loss"].reshape(4, -1)
    np.testing.assert_allclose(curve, per_epoch.mean(1), rtol=1e-12)
    assert isinstance(fitted.components_, np.ndarray)


def _obj(X, A, D, alpha):
    return 0.5 * ((X - A @ D) ** 2).sum(1) + alpha * np.abs(A).sum(1)


def test_fit_loss_is_the_exact_objective_of_the_minibatch():
    # fit_algorithm="exact" records the solver's objective: with one minibatch,
    # the loss is the mean lasso objective of the exact codes on dict_init
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 12))
    D0 = rng.standard_normal((20, 12))
    D0 /= np.linalg.norm(D0, axis=1, keepdims=True)
    est = LCASparseCoder(n_components=20, alpha=0.2, fit_algorithm="exact", dict_init=D0,
                         batch_size=64, max_iter=1, shuffle=False, dead_window=0,
                         random_state=0, device="cpu").fit(X)
    ref = SkSparseCoder(D0, transform_algorithm="lasso_lars", transform_alpha=0.2).transform(X)
    assert est.loss_curve_.shape == (1,) and est.history_["loss"].shape == (1,)
    np.testing.assert_allclose(est.loss_curve_[0], _obj(X, ref, D0, 0.2).mean(), rtol=1e-10)


def test_forget_window_weights_the_statistics():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64 * 30, 8))
    kw = dict(n_components=10, alpha=0.2, fit_algorithm="exact", batch_size=64, max_iter=1,
              shuffle=False, dead_window=0, random_state=0, device="cpu")
    short = LCASparseCoder(forget_window=128, **kw).fit(X)
    long = LCASparseCoder(forget_window=None, **kw).fit(X)
    # A sums batch means a^T a / b with weights: a window of two batches keeps
    # about 2 of them, Mairal's schedule after t = 30 batches about t / 2 = 15
    ta, tb = np.trace(short._train_state["A"]), np.trace(long._train_state["A"])
    assert 0 < 3 * ta < tb
    with pytest.raises(ValueError, match="forget_window"):
        LCASparseCoder(forget_window=0, **kw).fit(X)


def test_n_steps_and_callbacks_stop_training(planted):
    X, _ = planted
    kw = dict(n_components=8, alpha=0.2, fit_max_iter=20, batch_size=100, random_state=0,
              device="cpu")
    est = LCASparseCoder(n_steps=9, **kw).fit(X)  # 6 minibatches an epoch
    assert est.n_steps_ == 9 and est.n_iter_ == 2 and est.history_["loss"].shape == (9,)
    seen = []

    def stop_at_4(info):
        seen.append(info)
        return info["step"] < 4

    est = LCASparseCoder(max_iter=5, callbacks=[stop_at_4], **kw).fit(X)
    assert est.n_steps_ == 4 and [m["step"] for m in seen] == [1, 2, 3, 4]
    assert set(seen[0]) >= {"step", "epoch", "loss", "n_iter"}
    np.testing.assert_allclose([m["loss"] for m in seen], est.history_["loss"], rtol=1e-12)


def test_transform_is_the_lasso_solution_of_the_learned_dictionary(planted, fitted):
    X, _ = planted
    X = X[:20]
    exact = SparseCoder(fitted.components_, alpha=0.1, device="cpu").transform(X).toarray()
    lca = fitted.transform(X).toarray()

    def obj(A):
        return np.mean(0.5 * ((X - A @ fitted.components_) ** 2).sum(1) + 0.1 * np.abs(A).sum(1))

    assert abs(obj(lca) - obj(exact)) / obj(exact) < 1e-4
    X_hat = fitted.inverse_transform(fitted.transform(X))
    np.testing.assert_allclose(X_hat, lca @ fitted.components_, atol=1e-10)


def test_same_seed_same_dictionary(planted):
    X, _ = planted
    kw = dict(n_components=10, alpha=0.2, max_iter=2, fit_max_iter=20, device="cpu")
    a = LCASparseCoder(random_state=3, **kw).fit(X).components_
    b = LCASparseCoder(random_state=3, **kw).fit(X).components_
    c = LCASparseCoder(random_state=4, **kw).fit(X).components_
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_float32_fit_gives_float32(planted):
    X, _ = planted
    est = LCASparseCoder(8, alpha=0.2, max_iter=1, fit_max_iter=20, device="cpu", random_state=0)
    est.fit(X.astype(np.float32))
    assert est.components_.dtype == np.float32
    assert est.transform(X[:5].astype(np.float32)).dtype == np.float32


def test_partial_fit_streams_and_failure_leaves_state(planted):
    X, _ = planted
    est = LCASparseCoder(12, alpha=0.1, batch_size=100, fit_max_iter=30, random_state=0,
                         device="cpu")
    for chunk in np.array_split(X, 5):
        est.partial_fit(chunk)
    assert est.n_steps_ == sum(int(np.ceil(len(c) / 100)) for c in np.array_split(X, 5))
    assert len(est.loss_curve_) == 5
    before = est.components_.copy()
    steps = est.n_steps_
    with pytest.raises(ValueError, match="features"):
        est.partial_fit(np.ones((10, 3)))
    with pytest.raises(ValueError, match="NaN"):
        bad = X[:10].copy()
        bad[0, 0] = np.nan
        est.partial_fit(bad)
    np.testing.assert_array_equal(est.components_, before)
    assert est.n_steps_ == steps
    # a stream whose third batch is bad fails after two steps: nothing committed
    history = {k: v.copy() for k, v in est.history_.items()}
    bad = X[200:300].copy()
    bad[5, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        est.partial_fit(iter([X[:100], X[100:200], bad]))
    np.testing.assert_array_equal(est.components_, before)
    assert est.n_steps_ == steps and len(est.loss_curve_) == 5
    np.testing.assert_array_equal(est.history_["loss"], history["loss"])
    with pytest.raises(ValueError, match="n_components changed from 12 to 7"):
        est.set_params(n_components=7).partial_fit(X[:100])
    np.testing.assert_array_equal(est.components_, before)


def test_partial_fit_resumes_exactly_after_pickling(planted):
    # the training state (statistics, dead-atom counters, generator) travels with
    # the estimator: continuing a pickled copy equals continuing the original
    X, _ = planted
    est = LCASparseCoder(12, alpha=0.1, batch_size=100, fit_max_iter=30, dead_window=150,
                         random_state=0, device="cpu").fit(X[:300])
    clone = pickle.loads(pickle.dumps(est))
    est.partial_fit(X[300:])
    clone.partial_fit(X[300:])
    np.testing.assert_array_equal(clone.components_, est.components_)
    np.testing.assert_array_equal(clone.history_["loss"], est.history_["loss"])
    # max_iter="auto": 300 rows are far below the row budget, so the 100-pass cap,
    # then one call
    assert clone.n_iter_ == est.n_iter_ == 100 + 1


def test_auto_max_iter_trains_on_a_row_budget(planted, monkeypatch):
    # "auto" makes the fewest whole passes that reach the row budget (1 to 100);
    # an int is still a fixed number of passes
    import skdict.lca

    X, _ = planted
    kw = dict(n_components=8, alpha=0.2, batch_size=100, random_state=0, device="cpu")
    assert LCASparseCoder().max_iter == "auto"
    monkeypatch.setattr(skdict.lca, "AUTO_ROWS", 1000)
    est = LCASparseCoder(**kw).fit(X[:300])
    assert (est.n_iter_, est.n_steps_) == (4, 12)
    est = LCASparseCoder(**kw).fit(X)  # 600 rows: 2 passes reach 1000
    assert (est.n_iter_, est.n_steps_) == (2, 12)
    est = LCASparseCoder(**kw).fit([X[:150], X[150:300]])  # a re-iterable stream
    assert (est.n_iter_, est.n_steps_) == (4, 16)
    monkeypatch.setattr(skdict.lca, "AUTO_ROWS", 500)
    assert LCASparseCoder(**kw).fit(X).n_iter_ == 1  # at least one pass
    monkeypatch.setattr(skdict.lca, "AUTO_ROWS", 1000)
    monkeypatch.setattr(skdict.lca, "AUTO_MAX_PASSES", 3)
    assert LCASparseCoder(**kw).fit(X[:300]).n_iter_ == 3
    assert LCASparseCoder(max_iter=5, **kw).fit(X[:300]).n_iter_ == 5
    # the same passes as the equivalent int, so the same dictionary
    monkeypatch.setattr(skdict.lca, "AUTO_MAX_PASSES", 100)
    np.testing.assert_array_equal(LCASparseCoder(**kw).fit(X[:300]).components_,
                                  LCASparseCoder(max_iter=4, **kw).fit(X[:300]).components_)
    with pytest.raises(ValueError, match="max_iter"):
        LCASparseCoder(max_iter="many", **kw).fit(X)


def test_stream_of_minibatches_matches_the_array(planted):
    # from the same dictionary, an unshuffled array and the list of its batches
    # give the same fit; a generator is one pass (one epoch)
    X, _ = planted
    D0 = LCASparseCoder(8, max_iter=1, random_state=0, device="cpu").fit(X).components_
    kw = dict(n_components=8, alpha=0.2, fit_max_iter=20, batch_size=100, shuffle=False,
              max_iter=2, dict_init=D0, random_state=0, device="cpu")
    a = LCASparseCoder(**kw).fit(X)
    b = LCASparseCoder(**kw).fit([X[i:i + 100] for i in range(0, len(X), 100)])
    np.testing.assert_allclose(b.components_, a.components_, atol=1e-12)
    with pytest.warns(UserWarning, match="one-pass iterator ran out after 6 steps"):
        c = LCASparseCoder(**kw).fit(X[i:i + 100] for i in range(0, len(X), 100))
    assert c.n_iter_ == 1 and c.n_steps_ == 6


def test_dead_atoms_are_resampled():
    # a dictionary init with an atom orthogonal to all data never activates
    rng = np.random.default_rng(0)
    X = np.zeros((600, 4))
    X[:, :3] = rng.standard_normal((600, 3))
    init = np.vstack([np.eye(4)[:3], [[0, 0, 0, 1.0]]])
    est = LCASparseCoder(
        4,
        alpha=0.1,
        dict_init=init,
        max_iter=2,
        batch_size=100,
        dead_window=200,
        random_state=0,
        device="cpu",
    ).fit(X)
    assert est.n_resampled_ >= 1
    assert abs(est.components_[3, 3]) < 0.99
    np.testing.assert_allclose(np.linalg.norm(est.components_, axis=1), 1, atol=1e-12)
    # disabled: the unused atom stays as it was
    off = LCASparseCoder(4, alpha=0.1, dict_init=init, max_iter=2, batch_size=100,
                         dead_window=0, random_state=0, device="cpu").fit(X)
    assert off.n_resampled_ == 0
    np.testing.assert_array_equal(off.components_[3], init[3])


@pytest.mark.parametrize(
    "params, match",
    [
        ({"n_components": 0}, "n_components"),
        ({"alpha": -0.5}, "alpha"),
        ({"device": "nonsense"}, "not a valid device"),
        ({"dict_init": np.ones((3, 3))}, "dict_init has shape"),
        ({"dict_init": np.full((5, 4), np.nan)}, "dict_init contains NaN"),
        ({"dead_window": -1}, "dead_window"),
        ({"threshold": "hard", "fit_algorithm": "exact"}, "fit_algorithm='lca'"),
        ({"threshold": "hard", "transform_algorithm": "exact"}, "threshold='hard'"),
        ({"transform_algorithm": "omp", "transform_n_nonzero_coefs": 6},
         "transform_n_nonzero_coefs=6 exceeds the 5 atoms"),
        ({"n_components": None, "transform_algorithm": "omp", "transform_n_nonzero_coefs": 5},
         "exceeds the 4 atoms"),
    ],
)
def test_bad_parameters(params, match):
    X = np.random.default_rng(0).standard_normal((20, 4))
    with pytest.raises(ValueError, match=match):
        LCASparseCoder(**{"n_components": 5, **params}).fit(X)


def test_sgd_and_hard_threshold_variants(planted):
    X, _ = planted
    est = LCASparseCoder(
        16,
        alpha=0.3,
        threshold="hard",
        dict_update="sgd",
        learning_rate=0.5,
        max_iter=3,
        fit_max_iter=50,
        random_state=0,
        device="cpu",
    ).fit(X)
    codes = est.transform(X[:100])
    assert codes.nnz > 0 and np.abs(codes.data).min() > 0.3
    assert est.loss_curve_[-1] < est.loss_curve_[0]


def test_verbose_progress_bar(planted, capsys):
    X, _ = planted
    LCASparseCoder(4, max_iter=1, fit_max_iter=5, verbose=True, device="cpu", random_state=0).fit(X)
    assert "LCASparseCoder" in capsys.readouterr().err


def test_pickle_round_trip(fitted, planted):
    X, _ = planted
    clone = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(clone.components_, fitted.components_)
    np.testing.assert_array_equal(
        clone.transform(X[:20]).toarray(), fitted.transform(X[:20]).toarray()
    )


def test_torch_input_matches_numpy(planted):
    X, _ = planted
    kw = dict(n_components=6, alpha=0.2, max_iter=1, fit_max_iter=20, random_state=0, device="cpu")
    a = LCASparseCoder(**kw).fit(X).components_
    b = LCASparseCoder(**kw).fit(torch.tensor(X)).components_
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_gridsearch_over_alpha_in_pipeline():
    X, y = load_digits(return_X_y=True)
    X, y = X[:300] / 16.0, y[:300]
    pipe = make_pipeline(
        LCASparseCoder(
            n_components=32,
            max_iter=2,
            fit_max_iter=30,
            transform_algorithm="fista",
            random_state=0,
            device="cpu",
        ),
        LogisticRegression(max_iter=300),
    )
    search = GridSearchCV(pipe, {"lcasparsecoder__alpha": [0.05, 0.1, 0.2]}, cv=2).fit(X, y)
    assert search.best_params_["lcasparsecoder__alpha"] in (0.05, 0.1, 0.2)
    assert search.best_score_ > 0.8


@pytest.mark.cuda
def test_fit_on_cuda_unpickles_on_cpu(planted):
    X, _ = planted
    est = LCASparseCoder(8, alpha=0.2, max_iter=1, fit_max_iter=20, random_state=0,
                         device="cuda").fit(X)
    clone = pickle.loads(pickle.dumps(est))
    assert isinstance(clone.components_, np.ndarray)
    clone.set_params(device="cpu")
    assert clone.transform(X[:10]).shape == (10, 8)


def test_exact_fit_algorithm_is_deterministic_and_matches_converged_lca():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 12))
    kw = dict(n_components=16, alpha=0.3, batch_size=64, random_state=0, device="cpu")
    est = LCASparseCoder(fit_algorithm="exact", max_iter=2, **kw).fit(X)
    np.testing.assert_allclose(np.linalg.norm(est.components_, axis=1), 1, atol=1e-10)
    assert np.all(np.isfinite(est.loss_curve_))
    again = LCASparseCoder(fit_algorithm="exact", max_iter=2, **kw).fit(X)
    np.testing.assert_array_equal(est.components_, again.components_)
    # the exact codes solve the lasso the LCA converges to: same first step
    lca = LCASparseCoder(fit_algorithm="lca", fit_max_iter=3000, inference_tol=1e-10, max_iter=1,
                         **kw).fit(X[:64])
    ex = LCASparseCoder(fit_algorithm="exact", max_iter=1, **kw).fit(X[:64])
    np.testing.assert_allclose(lca.components_, ex.components_, atol=1e-5)


def test_tol_stops_fit_on_the_epoch_objective(rng):
    X = rng.standard_normal((200, 8))
    full = LCASparseCoder(n_components=8, alpha=0.3, max_iter=30, batch_size=50,
                          random_state=0, device="cpu").fit(X)
    assert full.n_iter_ == 30
    early = LCASparseCoder(n_components=8, alpha=0.3, max_iter=30, batch_size=50, tol=1e-2,
                           random_state=0, device="cpu").fit(X)
    assert 2 <= early.n_iter_ < 30
    c = early.loss_curve_
    assert c[-2] - c[-1] < 1e-2 * abs(c[-2])
    assert all(c[i - 1] - c[i] >= 1e-2 * abs(c[i - 1]) for i in range(1, len(c) - 1))


def test_default_algorithms_are_the_exact_lasso_and_lca_for_hard_threshold(planted):
    X, _ = planted
    X = X[:256]
    kw = dict(n_components=8, alpha=0.2, max_iter=1, batch_size=128, random_state=0,
              device="cpu")
    est = LCASparseCoder(**kw).fit(X)
    assert est.fit_algorithm == "auto" and est.transform_algorithm == "auto"
    # "auto" is the exact solver: the same codes (and the same fit) as asking for it
    exact = LCASparseCoder(fit_algorithm="exact", transform_algorithm="exact", **kw).fit(X)
    np.testing.assert_array_equal(est.components_, exact.components_)
    ref = SparseCoder(est.components_, alpha=0.2, device="cpu").transform(X).toarray()
    np.testing.assert_array_equal(est.transform(X).toarray(), ref)
    # the hard threshold has only LCA: "auto" resolves to it in fit and transform
    hard = LCASparseCoder(threshold="hard", fit_max_iter=20, **kw).fit(X)
    lca = LCASparseCoder(threshold="hard", fit_max_iter=20, fit_algorithm="lca",
                         transform_algorithm="lca", **kw).fit(X)
    np.testing.assert_array_equal(hard.components_, lca.components_)
    np.testing.assert_array_equal(hard.transform(X).toarray(), lca.transform(X).toarray())
