"""Contracts every learning estimator keeps through the shared core.

* Every RowSource kind (numpy, memmap, scipy sparse, torch tensor) gives the same
  fitted model for the same seed.
* A list of batches gives the same model as the array read in order.
* ``callbacks`` see every step and can stop training; ``history_`` /
  ``loss_curve_`` / ``n_steps_`` agree with what ran.
* A ``partial_fit`` that fails on its input leaves the fitted state intact.
* ``score`` equals the criterion recomputed from ``transform`` /
  ``inverse_transform``.
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from skdict import CollapsedDictionaryLearner, KSparseAutoencoder, LCASparseCoder

pytestmark = pytest.mark.usefixtures("one_thread")


def _lca(**kw):
    return LCASparseCoder(n_components=12, alpha=0.2, max_iter=2, batch_size=32,
                          random_state=0, device="cpu", **kw)


def _collapsed(**kw):
    return CollapsedDictionaryLearner(n_components=12, n_nonzero_coefs=3, batch_size=32,
                                      max_iter=2, tol=0.0, random_state=0, device="cpu", **kw)


def _sae(**kw):
    kw.setdefault("max_iter", 2)
    return KSparseAutoencoder(n_components=16, k=3, batch_size=32, random_state=0,
                              device="cpu", **kw)


FACTORIES = {"LCASparseCoder": _lca, "CollapsedDictionaryLearner": _collapsed,
             "KSparseAutoencoder": _sae}


@pytest.fixture
def X(rng):
    return rng.standard_normal((150, 8)).astype(np.float32)


def _kinds(X, tmp_path):
    mm = np.memmap(tmp_path / "x.dat", dtype=X.dtype, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    return {"memmap": np.memmap(tmp_path / "x.dat", dtype=X.dtype, mode="r", shape=X.shape),
            "csr": sp.csr_matrix(X), "torch": torch.from_numpy(X.copy())}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_input_kind_fits_the_same_model(name, X, tmp_path):
    ref = FACTORIES[name]().fit(X).components_
    for kind, Xk in _kinds(X, tmp_path).items():
        got = FACTORIES[name]().fit(Xk).components_
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=kind)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_list_of_batches_equals_the_array_in_order(name, X):
    # a stream draws its initialisation from its first block, an array from all
    # rows: start both from the same dictionary (the autoencoder has no dict_init:
    # one block holding every row, split into batches by the source)
    if name == "KSparseAutoencoder":
        kw, blocks = {}, [X]
    else:
        kw = {"dict_init": FACTORIES[name]().fit(X).components_}
        blocks = [X[i : i + 32] for i in range(0, len(X), 32)]
    a = FACTORIES[name](shuffle=False, **kw).fit(X)
    b = FACTORIES[name](shuffle=False, **kw).fit(blocks)
    np.testing.assert_allclose(b.components_, a.components_, rtol=1e-5, atol=1e-6)
    assert b.n_steps_ == a.n_steps_


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_callbacks_history_and_early_stop(name, X):
    seen = []
    est = FACTORIES[name](callbacks=[lambda m: seen.append(m)]).fit(X)
    n_batches = -(-len(X) // 32)
    assert est.n_steps_ == len(seen) == 2 * n_batches
    assert len(est.history_["loss"]) == est.n_steps_ and len(est.loss_curve_) == est.n_iter_
    np.testing.assert_allclose([m["loss"] for m in seen], est.history_["loss"])
    est = FACTORIES[name](callbacks=[lambda m: m["step"] < 3]).fit(X)
    assert est.n_steps_ == 3


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_failed_partial_fit_leaves_state_intact(name, X):
    est = FACTORIES[name]().partial_fit(X)
    before = {k: np.array(v, copy=True) for k, v in vars(est).items()
              if k.endswith("_") and isinstance(v, np.ndarray)}
    steps = est.n_steps_
    bad = X.copy()
    bad[-1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.partial_fit(bad)
    with pytest.raises(ValueError, match="features"):
        est.partial_fit(X[:, :5])
    assert est.n_steps_ == steps
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(est, k), v, err_msg=k)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_partial_fit_continues_training(name, X):
    est = FACTORIES[name]()
    est.partial_fit(X)
    first = est.components_.copy()
    est.partial_fit(X)
    n_batches = -(-len(X) // 32)
    assert est.n_steps_ == 2 * n_batches
    assert not np.allclose(est.components_, first)


def _fitted_state(est):
    """Every fitted attribute and the training state, pickled for comparison."""
    import pickle

    return {k: pickle.dumps(v) for k, v in vars(est).items()
            if k.endswith("_") or k in ("_train_state", "_resume")}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_failed_fit_mid_stream_keeps_the_previous_model(name, X, rng):
    # validating the new X recorded its feature count before the stream failed
    est = FACTORIES[name]().fit(X)
    before = _fitted_state(est)
    X5 = rng.standard_normal((64, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="features"):
        est.fit(iter([X5[:32], X5[32:, :3]]))
    assert _fitted_state(est) == before
    assert est.transform(X).shape == (len(X), est.components_.shape[0])


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_callback_raising_keeps_the_previous_model(name, X):
    est = FACTORIES[name]().fit(X)
    before = _fitted_state(est)

    def boom(metrics):
        if metrics["step"] >= 2:
            raise RuntimeError("boom")

    est.set_params(callbacks=[boom])
    for method in (est.partial_fit, est.fit):
        with pytest.raises(RuntimeError, match="boom"):
            method(X)
        assert _fitted_state(est) == before


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_failed_first_partial_fit_leaves_the_estimator_unfitted(name, X):
    from sklearn.exceptions import NotFittedError

    est = FACTORIES[name]()
    with pytest.raises(ValueError, match="features"):
        est.partial_fit([X[:32], X[32:64, :5]])
    assert not hasattr(est, "n_features_in_")
    with pytest.raises(NotFittedError):
        est.transform(X)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_tensor_requiring_grad_is_accepted(name, X):
    Xt = torch.from_numpy(X.copy()).requires_grad_(True)
    est = FACTORIES[name]().fit(Xt)
    ref = FACTORIES[name]().fit(X)
    np.testing.assert_allclose(est.components_, ref.components_, rtol=1e-5, atol=1e-6)
    assert est.transform(Xt).shape == (len(X), ref.components_.shape[0])
    assert np.isfinite(est.score(Xt))
    est.partial_fit([Xt[:32], Xt[32:]])


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_partial_fit_refuses_a_changed_n_components(name, X):
    est = FACTORIES[name]().fit(X)
    before = _fitted_state(est)
    est.set_params(n_components=est.components_.shape[0] + 2)
    with pytest.raises(ValueError, match="n_components changed.*call fit"):
        est.partial_fit(X)
    assert _fitted_state(est) == before


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_n_iter_counts_fit_epochs_and_adds_one_per_partial_fit(name, X):
    # the Attributes sections of the three learners say so in the same words
    est = FACTORIES[name]().fit(X)
    assert est.n_iter_ == 2
    est.partial_fit(X)
    est.partial_fit(X[:40])
    assert est.n_iter_ == 4
    doc = type(est).__doc__
    assert "(``partial_fit`` adds 1 per call)" in doc
    assert FACTORIES[name]().partial_fit(X).n_iter_ == 1
