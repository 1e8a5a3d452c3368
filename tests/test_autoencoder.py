import json
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.model_selection import GridSearchCV

from skdict import KSparseAutoencoder
from skdict.losses import AdaptiveSparsityScheduler
from skdict.metrics import fvu
from skdict.solvers import dense_decode, topk_decode
from skdict.solvers.topk import (
    dense_decode_reference,
    dense_encode_reference,
    select_batch_topk,
    select_lifetime,
    select_threshold,
    select_topk,
    sparse_decode_pairs,
    sparse_encode,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _planted(n=3000, K=16, d=24, s=2, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    D = rng.normal(size=(K, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Z = np.zeros((n, K))
    for i in range(n):
        idx = rng.choice(K, s, replace=False)
        Z[i, idx] = rng.uniform(1.0, 2.0, s)
    return (Z @ D).astype(dtype), D, Z


def _small(**kw):
    params = dict(n_components=16, k=2, n_steps=30, batch_size=64, random_state=0,
                  device="cpu")
    params.update(kw)
    return KSparseAutoencoder(**params)


# ------------------------------------------------------------------ sparse kernels
SELECTIONS = {
    "topk": lambda pre: select_topk(pre, 3),
    "batchtopk": lambda pre: select_batch_topk(pre, 3),
    "lifetime": lambda pre: select_lifetime(pre, 0.3),
    "threshold": lambda pre: select_threshold(pre, 0.5),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_sparse_encode_decode_gradcheck(name):
    g = torch.Generator().manual_seed(0)
    B, K, d = 6, 9, 5
    xc = torch.randn(B, d, dtype=torch.float64, generator=g, requires_grad=True)
    W_enc = torch.randn(K, d, dtype=torch.float64, generator=g, requires_grad=True)
    b_enc = torch.randn(K, dtype=torch.float64, generator=g, requires_grad=True)
    W_dec = torch.randn(K, d, dtype=torch.float64, generator=g, requires_grad=True)
    b_dec = torch.randn(d, dtype=torch.float64, generator=g, requires_grad=True)
    with torch.no_grad():
        pre = (xc - b_dec) @ W_enc.T + b_enc
    pairs = SELECTIONS[name](pre)
    pairs.pre_values = None  # recompute the selected pre-activations from the inputs
    assert pairs.nnz > 0

    def f(xc, W_enc, b_enc, W_dec, b_dec):
        vals = sparse_encode(xc, W_enc, b_enc, pairs, b_dec=b_dec)
        return sparse_decode_pairs(vals, W_dec, pairs) + b_dec

    assert torch.autograd.gradcheck(
        f, (xc, W_enc, b_enc, W_dec, b_dec), eps=1e-6, atol=1e-7
    )
    assert torch.autograd.gradcheck(
        lambda *a: sparse_encode(*a, pairs), (xc, W_enc, b_enc), eps=1e-6, atol=1e-7
    )
    vals = torch.randn(pairs.nnz, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, W: sparse_decode_pairs(v, W, pairs), (vals, W_dec), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_sparse_kernels_match_dense_float32(name):
    g = torch.Generator().manual_seed(1)
    B, K, d = 64, 40, 12
    x = torch.randn(B, d, generator=g)
    W_enc = torch.randn(K, d, generator=g)
    b_enc = torch.randn(K, generator=g) * 0.1
    W_dec = torch.randn(K, d, generator=g)
    b_dec = torch.randn(d, generator=g) * 0.5
    with torch.no_grad():
        pre = (x - b_dec) @ W_enc.T + b_enc
    pairs = SELECTIONS[name](pre)
    G = torch.randn(B, d, generator=g)
    results = []
    for variant in ("stored", "pre", "recompute", "dense"):
        ts = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, W_dec, b_dec)]
        saved = pairs.pre_values
        if variant != "stored":
            pairs.pre_values = None
        if variant == "dense":
            vals = dense_encode_reference(ts[0], ts[1], ts[2], pairs, b_dec=ts[4])
            out = dense_decode_reference(vals, ts[3], pairs) + ts[4]
        else:
            vals = sparse_encode(ts[0], ts[1], ts[2], pairs,
                                 pre if variant == "pre" else None, b_dec=ts[4])
            out = sparse_decode_pairs(vals, ts[3], pairs) + ts[4]
        pairs.pre_values = saved
        (out * G).sum().backward()
        results.append([out.detach()] + [t.grad for t in ts])
    for res in results[:3]:
        for a, b in zip(res, results[3], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_selections():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.1, 0.2, 5.0, 4.0]])
    p = select_topk(pre, 2)
    assert sorted(zip(p.row.tolist(), p.col.tolist(), strict=True)) == [
        (0, 0), (0, 2), (1, 2), (1, 3)
    ]
    p = select_batch_topk(pre, 2)  # 4 largest of the batch
    assert sorted(zip(p.row.tolist(), p.col.tolist(), strict=True)) == [
        (0, 0), (0, 2), (1, 2), (1, 3)
    ]
    p = select_batch_topk(torch.tensor([[9.0, 8.0, 7.0], [0.0, 1.0, 0.5]]), 1)
    assert p.row.tolist() == [0, 0]  # rows may get more or fewer than k
    p = select_lifetime(pre, 0.5)  # each column keeps its top 1 of 2 rows
    assert sorted(zip(p.col.tolist(), p.row.tolist(), strict=True)) == [
        (0, 0), (1, 1), (2, 1), (3, 1)
    ]
    assert (p.row[1:] >= p.row[:-1]).all()  # sorted by row


def test_topk_decode_matches_dense():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (30, 4), generator=g)
    val = torch.randn(30, 4, generator=g)
    D = torch.randn(50, 7, generator=g)
    torch.testing.assert_close(topk_decode(idx, val, D), dense_decode(idx, val, D))


# ------------------------------------------------------------------ learning
def test_recovers_planted_dictionary():
    X, D, _ = _planted(n=4000, K=16, d=24, s=2)
    sae = KSparseAutoencoder(
        n_components=32, k=2, n_steps=1500, batch_size=256, lr=3e-3, random_state=0,
        device="cpu", normalize_input=False, b_dec_init="zeros",
    ).fit(X)
    cos = np.abs(D @ sae.components_.T).max(axis=1)
    assert np.mean(cos > 0.95) >= 0.9, cos
    assert sae.score(X) > 0.9
    assert sae.history_["fvu"][-1] < sae.history_["fvu"][0]


@pytest.mark.parametrize(
    "sparsity", ["topk", "batchtopk", "matryoshka", "jumprelu", "l1", "kl", "lifetime"]
)
def test_sparsity_modes_learn(sparsity):
    X, _, _ = _planted(n=1000, K=16, d=24, s=2, dtype=np.float32)
    sae = _small(n_components=16, sparsity=sparsity, n_steps=150, lr=3e-3).fit(X)
    assert sae.components_.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sae.components_, axis=1), 1, rtol=1e-5)
    codes = sae.transform(X)
    assert sp.issparse(codes) and codes.shape == (1000, 16)
    assert codes.dtype == np.float32
    if sparsity in ("topk", "lifetime"):
        assert codes.getnnz(axis=1).max() <= 2
    if sparsity in ("batchtopk", "matryoshka", "jumprelu"):
        assert sae.threshold_.shape == (16,) and (sae.threshold_ > 0).all()
        assert 0.5 < codes.getnnz(axis=1).mean() < 6
    if sparsity in ("batchtopk", "matryoshka"):
        assert np.unique(sae.threshold_).size == 1  # one global threshold
    assert sae.score(X) > 0.3
    for key in ("loss", "fvu", "l0", "dead_fraction", "aux_loss", "k"):
        assert sae.history_[key].shape == (150,)
    assert sae.n_steps_ == 150


def test_transform_inverse_score_and_metrics():
    X, _, _ = _planted(n=600, dtype=np.float32)
    sae = _small(n_steps=100, lr=3e-3).fit(X)
    codes = sae.transform(X)
    assert codes.getnnz(axis=1).max() <= 2
    X_hat = sae.inverse_transform(codes)
    X_hat_dense = sae.inverse_transform(codes.toarray())
    np.testing.assert_allclose(X_hat, X_hat_dense, rtol=1e-5, atol=1e-5)
    # score is 1 - FVU with the global mean
    assert sae.score(X) == pytest.approx(1 - fvu(X, X_hat), rel=1e-4, abs=1e-5)
    dense = _small(n_steps=100, lr=3e-3, sparse_output=False).fit(X).transform(X)
    np.testing.assert_allclose(dense, codes.toarray(), rtol=1e-6)


def test_gridsearch_over_k():
    X, _, _ = _planted(n=400, s=3)
    gs = GridSearchCV(_small(n_steps=60, lr=3e-3), {"k": [1, 3]}, cv=2).fit(X)
    assert gs.best_params_ == {"k": 3}


# ------------------------------------------------------------------ inputs
def test_input_kinds(tmp_path):
    X, _, _ = _planted(n=256, dtype=np.float32)
    ref = _small().fit(X)
    # torch tensor (stays a tensor), sparse and memmap give working fits
    t = _small().fit(torch.from_numpy(X))
    assert t.components_.shape == ref.components_.shape
    mm = np.memmap(tmp_path / "x.dat", dtype=np.float32, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    ro = np.memmap(tmp_path / "x.dat", dtype=np.float32, mode="r", shape=X.shape)
    m = _small().fit(ro)
    assert m.n_features_in_ == X.shape[1] and m.n_steps_ == 30
    s = _small().fit(sp.csr_matrix(X))
    assert s.score(X) > 0
    # iterables of batches: a generator (one pass) and a list (re-iterable)
    gen = (X[i : i + 64] for i in range(0, 256, 64))
    with pytest.warns(UserWarning, match="one-pass iterator ran out after 4 steps"):
        g = _small(n_steps=None, max_iter=3).fit(gen)
    assert g.n_steps_ == 4
    lst = [X[i : i + 64] for i in range(0, 256, 64)]
    li = _small(n_steps=None, max_iter=3).fit(lst)
    assert li.n_steps_ == 12
    lt = _small(n_steps=5).fit([torch.from_numpy(b) for b in lst])
    assert lt.n_steps_ == 5
    assert ref.transform(torch.from_numpy(X)).shape == (256, 16)


def test_memmap_with_nan_is_rejected(tmp_path):
    X, _, _ = _planted(n=128, dtype=np.float32)
    X[100, 3] = np.nan
    mm = np.memmap(tmp_path / "x.dat", dtype=np.float32, mode="w+", shape=X.shape)
    mm[:] = X
    with pytest.raises(ValueError, match="NaN"):
        _small(n_steps=5).fit(mm)


def test_3d_input_asks_to_reshape():
    X = np.zeros((4, 5, 6))
    with pytest.raises(ValueError, match="reshape"):
        _small().fit(X)
    with pytest.raises(ValueError, match="reshape"):
        _small().fit(torch.zeros(4, 5, 6))


def test_k_larger_than_n_components():
    with pytest.raises(ValueError, match="k=20 exceeds n_components=16"):
        _small(k=20).fit(np.ones((10, 3)))


def test_partial_fit_continues_and_failed_call_keeps_state():
    X, _, _ = _planted(n=256)
    sae = _small(batch_size=64)
    sae.partial_fit(X)
    assert sae.n_steps_ == 4
    W = sae.components_.copy()
    sae.partial_fit(X)
    assert sae.n_steps_ == 8 and sae.history_["loss"].shape == (8,)
    assert not np.allclose(W, sae.components_)
    W = sae.components_.copy()
    with pytest.raises(ValueError, match="features"):
        sae.partial_fit(X[:, :5])
    with pytest.raises(ValueError):
        sae.partial_fit(np.full_like(X, np.nan))
    np.testing.assert_array_equal(W, sae.components_)
    assert sae.n_steps_ == 8


def test_reproducible_and_pickle():
    X, _, _ = _planted(n=256)
    a = _small().fit(X)
    b = _small().fit(X)
    np.testing.assert_array_equal(a.components_, b.components_)
    np.testing.assert_array_equal(a.encoder_weight_, b.encoder_weight_)
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c.transform(X).toarray(), a.transform(X).toarray())


def test_auxk_and_dead_tracking():
    X, _, _ = _planted(n=512, K=4, s=1)  # few real atoms: many latents die
    sae = _small(n_components=32, k=1, n_steps=40, dead_window=128, lr=3e-3).fit(X)
    assert sae.tokens_since_fired_.shape == (32,)
    assert sae.dead_fraction_ == pytest.approx(
        np.mean(sae.tokens_since_fired_ >= 128)
    )
    dead_hist = sae.history_["dead_fraction"]
    assert dead_hist[0] == 0.0  # nothing can be dead before 128 tokens
    assert dead_hist.max() > 0
    assert (sae.history_["aux_loss"][dead_hist > 0] > 0).all()
    no_aux = _small(n_components=32, k=1, n_steps=40, dead_window=128, aux_coef=0.0,
                    lr=3e-3).fit(X)
    assert (no_aux.history_["aux_loss"] == 0).all()


def test_k_schedule_anneals_k():
    X, _, _ = _planted(n=256)
    sched = AdaptiveSparsityScheduler(8, 2, warmup_steps=20)
    sae = _small(k=2, n_steps=30, k_schedule=sched).fit(X)
    ks = sae.history_["k"]
    assert ks[0] == 8 and ks[-1] == 2
    assert (np.diff(ks) <= 0).all()
    assert sched.progress_ == 0  # the user's scheduler is not mutated


def test_geometric_median_init_and_autocast():
    X, _, _ = _planted(n=256, dtype=np.float32)
    sae = _small(b_dec_init="geometric_median", autocast="bfloat16").fit(X)
    assert np.isfinite(sae.components_).all()
    assert sae.score(X) > -1


# ------------------------------------------------------------------ io
def test_save_load_roundtrip(tmp_path):
    X, _, _ = _planted(n=256, dtype=np.float32)
    sae = _small(sparsity="batchtopk", n_steps=20).fit(X)
    sae.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["params"]["sparsity"] == "batchtopk"
    back = KSparseAutoencoder.load(tmp_path / "m")
    np.testing.assert_array_equal(back.threshold_, sae.threshold_)
    np.testing.assert_array_equal(back.transform(X).toarray(), sae.transform(X).toarray())
    # training continues from the saved optimizer state
    back.partial_fit(X)
    assert back.n_steps_ == 24
    with pytest.raises(ValueError, match="not found"):
        KSparseAutoencoder.load(tmp_path / "nothing")
    assert KSparseAutoencoder.load(tmp_path / "m", device="cpu").device == "cpu"
    # overrides are checked like set_params / fit would: a clear ValueError, not a
    # TypeError from __init__ or a bad value found only at the next fit
    with pytest.raises(ValueError, match="Invalid parameter 'bogus'"):
        KSparseAutoencoder.load(tmp_path / "m", bogus=1)
    with pytest.raises(ValueError, match="'batch_size' parameter"):
        KSparseAutoencoder.load(tmp_path / "m", batch_size=0)


_FITTED = ("components_", "encoder_weight_", "encoder_bias_", "decoder_bias_", "threshold_",
           "tokens_since_fired_")


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "jumprelu"])
def test_save_load_resumes_exactly(tmp_path, sparsity):
    """fit 2N steps == fit N steps, save, load, partial_fit (N more steps): the
    optimizer moments, variant buffers, k schedule and batch order are saved."""
    X, _, _ = _planted(n=256, dtype=np.float32)  # 4 batches of 64: one epoch = N = 4
    sched = AdaptiveSparsityScheduler(6, 2, warmup_steps=6)
    # lr_decay=0: a fit of 8 steps decays over its own end, not over the 4th step
    kw = dict(sparsity=sparsity, batch_size=64, dead_window=100, lr=3e-3, lr_decay=0.0,
              k_schedule=sched if sparsity == "topk" else None)
    full = _small(n_steps=8, **kw).fit(X)
    half = _small(n_steps=4, **kw).fit(X)
    half.save(tmp_path / "m")
    back = KSparseAutoencoder.load(tmp_path / "m").partial_fit(X)
    for attr in _FITTED:
        np.testing.assert_allclose(getattr(back, attr), getattr(full, attr), rtol=1e-6,
                                   atol=1e-6, err_msg=attr)
    for name, h in full.history_.items():
        np.testing.assert_allclose(back.history_[name], h, rtol=1e-5, atol=1e-6, err_msg=name)
    assert back.n_steps_ == 8
    # the same without disk: a pickled model resumes too
    again = pickle.loads(pickle.dumps(half)).partial_fit(X)
    np.testing.assert_allclose(again.components_, full.components_, rtol=1e-6, atol=1e-6)


def test_callbacks_stop_early_and_see_metrics():
    X, _, _ = _planted(n=256)
    seen = []

    def cb(metrics):
        seen.append(metrics)
        return metrics["step"] < 3

    sae = _small(n_steps=20, callbacks=[cb]).fit(X)
    assert sae.n_steps_ == 3 and sae.history_["loss"].shape == (3,)
    assert [m["step"] for m in seen] == [1, 2, 3]
    assert {"loss", "fvu", "l0", "dead_fraction", "aux_loss", "k"} <= set(seen[0])
    assert seen[-1]["loss"] == pytest.approx(sae.history_["loss"][-1])


def test_epochs_loss_curve_and_dead_window_zero():
    X, _, _ = _planted(n=256)
    sae = _small(n_steps=None, max_iter=3, dead_window=0).fit(X)
    assert sae.n_iter_ == 3 and sae.n_steps_ == 12
    assert sae.loss_curve_.shape == (3,)
    np.testing.assert_allclose(sae.loss_curve_[0], sae.history_["loss"][:4].mean())
    assert sae.dead_fraction_ == 0.0 and (sae.history_["aux_loss"] == 0).all()
    sae.partial_fit(X)
    assert sae.n_iter_ == 4 and sae.loss_curve_.shape == (4,)


def test_to_saelens_folds_input_scale(tmp_path):
    X, _, _ = _planted(n=256, dtype=np.float32)
    sae = _small(normalize_input=True).fit(X * 7.0)
    assert sae.input_scale_ != 1.0
    sae.to_saelens(tmp_path / "s")
    back = KSparseAutoencoder.from_saelens(tmp_path / "s")
    assert back.input_scale_ == 1.0
    np.testing.assert_allclose(back.transform(X * 7.0).toarray(),
                               sae.transform(X * 7.0).toarray(), rtol=1e-5, atol=1e-5)
    assert back.score(X * 7.0) == pytest.approx(sae.score(X * 7.0), rel=1e-5)


def _write_saelens(path, W_enc, W_dec, b_enc, b_dec, cfg):
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec},
        str(path / "sae_weights.safetensors"),
    )


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_from_saelens(tmp_path, apply_b_dec):
    rng = np.random.default_rng(0)
    d_in, d_sae, k = 10, 40, 4
    W_enc = rng.normal(size=(d_in, d_sae)).astype(np.float32)
    W_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    b_enc = rng.normal(size=d_sae).astype(np.float32) * 0.1
    b_dec = rng.normal(size=d_in).astype(np.float32)
    cfg = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "apply_b_dec_to_input": apply_b_dec, "k": k}
    _write_saelens(tmp_path / "sae", W_enc, W_dec, b_enc, b_dec, cfg)
    sae = KSparseAutoencoder.from_saelens(tmp_path / "sae", device="cpu")
    X = rng.normal(size=(50, d_in)).astype(np.float32)
    # reference: SAELens' TopK forward written out in numpy
    pre = ((X - b_dec) if apply_b_dec else X) @ W_enc + b_enc
    Z = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(Z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    codes = sae.transform(X)
    np.testing.assert_allclose(codes.toarray(), Z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sae.inverse_transform(codes), Z @ W_dec + b_dec,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="Invalid parameter 'bogus'"):
        KSparseAutoencoder.from_saelens(tmp_path / "sae", bogus=1)
    with pytest.raises(ValueError, match="'k' parameter"):
        KSparseAutoencoder.from_saelens(tmp_path / "sae", k=0)


def test_from_saelens_errors(tmp_path):
    with pytest.raises(ValueError, match="cfg.json"):
        KSparseAutoencoder.from_saelens(tmp_path)
    z = np.zeros((3, 5), np.float32)
    _write_saelens(tmp_path / "j", z, z.T.copy(), np.zeros(5, np.float32),
                   np.zeros(3, np.float32), {"architecture": "gated"})
    with pytest.raises(ValueError, match="not supported"):
        KSparseAutoencoder.from_saelens(tmp_path / "j")


def test_pair_dot_native_matches_gather():
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(40, 25, generator=g, dtype=torch.float64)
    A = torch.randn(40, 6, generator=g, dtype=torch.float64)
    B = torch.randn(25, 6, generator=g, dtype=torch.float64)
    for pairs in (select_topk(pre, 3), select_batch_topk(pre, 2), select_lifetime(pre, 0.2)):
        ref = (A[pairs.row] * B[pairs.col]).sum(1)
        torch.testing.assert_close(pairs.pair_dot(A, B), ref)
        torch.testing.assert_close(pairs._pair_dot_gather(A, B, chunk=7), ref)


@pytest.mark.parametrize("param, before, after", [
    ("sparsity", "topk", "jumprelu"), ("sparsity", "l1", "batchtopk"),
    ("optimizer", "adam", "sgd"),
])
def test_partial_fit_refuses_a_changed_training_state_parameter(tmp_path, param, before,
                                                                after):
    # the saved optimizer moments / variant buffers belong to the fitted settings:
    # continuing with others was a raw KeyError ('log_threshold', 'threshold', 'momentum')
    X, _, _ = _planted(n=128, dtype=np.float32)
    sae = _small(n_steps=2, **{param: before}).fit(X)
    sae.save(tmp_path / "m")
    state = pickle.dumps({k: v for k, v in vars(sae).items() if k.endswith("_")})
    sae.set_params(**{param: after})
    with pytest.raises(ValueError, match=f"{param} changed from '{before}' to '{after}'"):
        sae.partial_fit(X)
    assert pickle.dumps({k: v for k, v in vars(sae).items() if k.endswith("_")}) == state
    with pytest.raises(ValueError, match=f"{param} changed"):
        KSparseAutoencoder.load(tmp_path / "m", **{param: after}).partial_fit(X)
    sae.set_params(**{param: before}).partial_fit(X)  # the fitted settings continue
    assert sae.n_steps_ == 4
    sae.set_params(**{param: after}).fit(X)  # fit starts over with the new ones
    assert sae.n_steps_ == 2
    sae.partial_fit(X)


def test_training_step_matches_direction_parametrised_reference():
    """Three Adam steps of the learner equal a dense autograd reference of the
    model whose decoder rows are ``V / ||V||`` with the norms folded into the
    encoder (SAELens' TopK with ``rescale_acts_by_decoder_norm``), each tensor's
    gradient divided by its norm before the step, and the fitted
    arrays are that model with unit decoder rows."""
    from skdict._backend import make_generator
    from skdict.data.sources import as_source
    from skdict.training.sae import DECODER_INIT_NORM, SAELearner, effective_params

    X, _, _ = _planted(n=256, K=16, d=24, s=2)
    est = KSparseAutoencoder(n_components=16, k=3, lr=1e-2, dead_window=0, device="cpu",
                             normalize_input=False, batch_size=256)
    src = as_source(X, estimator=est, reset=True)
    learner = SAELearner(est, est._variant(), torch.device("cpu"), torch.float64)
    state = learner.init_state(src, make_generator(0, "cpu"))
    P0 = {k: v.clone() for k, v in state.params.items()}
    np.testing.assert_allclose(P0["W_dec"].norm(dim=1), DECODER_INIT_NORM, rtol=1e-12)
    x = torch.as_tensor(X)
    for _ in range(3):
        learner.step(state, x)

    ref = {k: v.clone().requires_grad_(True) for k, v in P0.items()}
    opt = torch.optim.Adam(list(ref.values()), lr=1e-2)
    for _ in range(3):
        n = ref["W_dec"].norm(dim=1)
        pre = ((x - ref["b_dec"]) @ ref["W_enc"].T + ref["b_enc"]) * n
        vals, idx = pre.topk(3, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
        x_hat = (z / n) @ ref["W_dec"] + ref["b_dec"]
        loss = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():  # Adam steps on each tensor's unit-norm gradient
            for v in ref.values():
                v.grad /= v.grad.norm()
        opt.step()
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(state.params[key], ref[key].detach(), rtol=1e-9,
                                   atol=1e-12)
    # the fitted model: unit decoder rows, same codes and reconstructions
    learner.finish(state)
    Q = effective_params(state.params)
    np.testing.assert_allclose(Q["W_dec"].norm(dim=1), 1.0, rtol=1e-12)
    with torch.no_grad():
        n = ref["W_dec"].norm(dim=1)
        pre = ((x - ref["b_dec"]) @ ref["W_enc"].T + ref["b_enc"]) * n
        pre_q = (x - Q["b_dec"]) @ Q["W_enc"].T + Q["b_enc"]
    torch.testing.assert_close(pre_q, pre, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
def test_sparse_pair_dot_on_cuda_equals_the_gather():
    # the native kernel needs the pair-to-bag map on CUDA (an empty one read out of bounds)
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 500, generator=g)
    pairs = select_topk(pre.cuda(), 9)
    A, B = torch.randn(64, 32, generator=g), torch.randn(500, 32, generator=g)
    ref = (A[pairs.row.cpu()] * B[pairs.col.cpu()]).sum(1)
    got = pairs.pair_dot(A.cuda(), B.cuda())
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_sparse_training_on_cuda_matches_cpu(sparsity):
    X = np.random.default_rng(0).standard_normal((1024, 48)).astype(np.float32)
    kw = dict(n_components=96, k=6, n_steps=4, batch_size=256, sparsity=sparsity,
              random_state=0)
    cpu = KSparseAutoencoder(device="cpu", **kw).fit(X)
    gpu = KSparseAutoencoder(device="cuda", **kw).fit(X)
    np.testing.assert_allclose(gpu.components_, cpu.components_, rtol=1e-3, atol=1e-4)
    assert abs(gpu.score(X) - cpu.score(X)) < 1e-3


# ------------------------------------------------------------------ learning-rate schedule
def test_lr_factor_is_constant_then_linear_to_near_zero():
    from skdict.training.optim import lr_factor

    got = [lr_factor(i, 10, 0.3) for i in range(10)]
    assert got == [1.0] * 7 + [0.75, 0.5, 0.25]
    # 0.3 * 10 is 3 decay steps despite rounding; 1.0 decays every step
    assert [lr_factor(i, 4, 1.0) for i in range(4)] == [0.8, 0.6, 0.4, 0.2]
    assert [lr_factor(i, 5, 0.0) for i in range(5)] == [1.0] * 5
    assert lr_factor(3, None, 0.5) == 1.0  # unknown length: constant
    assert lr_factor(0, 1, 0.2) == 0.5  # a one-step run still decays that step


def test_fit_decays_lr_over_the_known_number_of_steps():
    X, _, _ = _planted(n=256)
    sae = _small(n_steps=10, lr=1e-2, lr_decay=0.3).fit(X)
    np.testing.assert_allclose(sae.history_["lr"], 1e-2 * np.array([1] * 7 + [.75, .5, .25]),
                               rtol=1e-12)
    # max_iter passes over an array of known length: 2 passes of 4 batches
    sae = _small(n_steps=None, max_iter=2, lr=1e-2, lr_decay=0.5).fit(X)
    np.testing.assert_allclose(sae.history_["lr"],
                               1e-2 * np.array([1] * 4 + [.8, .6, .4, .2]), rtol=1e-12)
    # a list of blocks has a known length (blocks of 100, 100, 56 rows: 2 + 2 + 1
    # batches of 64); a generator does not, and keeps the rate
    sae = _small(n_steps=None, max_iter=1, lr=1e-2, lr_decay=0.4).fit(
        [X[:100], X[100:200], X[200:]])
    np.testing.assert_allclose(sae.history_["lr"], 1e-2 * np.array([1] * 3 + [2 / 3, 1 / 3]),
                               rtol=1e-12)
    sae = _small(n_steps=None, max_iter=1, lr=1e-2, lr_decay=0.5).fit(
        b for b in np.array_split(X, 4))
    np.testing.assert_allclose(sae.history_["lr"], 1e-2, rtol=1e-12)


def test_lr_decay_zero_is_the_constant_rate():
    X, _, _ = _planted(n=256)
    a = _small(n_steps=8, lr=1e-2, lr_decay=0.0).fit(X)
    np.testing.assert_allclose(a.history_["lr"], 1e-2, rtol=1e-12)
    b = _small(n_steps=8, lr=1e-2, lr_decay=0.5).fit(X)
    # same first half of the run, then smaller steps
    np.testing.assert_array_equal(a.history_["loss"][:5], b.history_["loss"][:5])
    assert not np.allclose(a.components_, b.components_)


@pytest.mark.parametrize("how", ["fitted", "pickled", "saved"])
def test_partial_fit_after_a_decayed_fit_trains_at_the_set_rate(how, tmp_path):
    """The optimizer state saved by fit carries the decayed rate of its last
    step; partial_fit (unknown horizon) trains at ``lr`` again, and a changed
    ``lr`` takes effect."""
    X, _, _ = _planted(n=256)
    sae = _small(n_steps=8, lr=1e-2, lr_decay=0.5).fit(X)
    assert sae.history_["lr"][-1] == pytest.approx(0.2e-2)
    if how == "pickled":
        sae = pickle.loads(pickle.dumps(sae))
    elif how == "saved":
        sae.save(tmp_path / "m")
        sae = KSparseAutoencoder.load(tmp_path / "m")
    sae.partial_fit(X)
    np.testing.assert_allclose(sae.history_["lr"][8:], 1e-2, rtol=1e-12)
    sae.set_params(lr=3e-3).partial_fit(X)
    np.testing.assert_allclose(sae.history_["lr"][12:], 3e-3, rtol=1e-12)
    assert sae.n_steps_ == 16


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_lr_decay_out_of_range(bad):
    with pytest.raises(ValueError, match="lr_decay"):
        _small(lr_decay=bad).fit(np.ones((8, 3)))


# ------------------------------------------------------------------ finiteness per batch
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_nan_row_is_named_and_failed_fit_keeps_the_model(kind):
    X, _, _ = _planted(n=256, dtype=np.float32)
    sae = _small(n_steps=4).fit(X)
    W, n_in = sae.components_.copy(), sae.n_features_in_
    bad = np.concatenate([X, X[:, :1]], axis=1)  # another feature count...
    bad[137, 5] = np.inf  # ...and a non-finite row
    bad = bad if kind == "numpy" else torch.from_numpy(bad)
    with pytest.raises(ValueError, match=r"NaN or infinity \(row 137\)"):
        sae.fit(bad)
    np.testing.assert_array_equal(W, sae.components_)
    assert sae.n_features_in_ == n_in and sae.n_steps_ == 4
    nan = X.copy()
    nan[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"\(row 3\)"):
        sae.partial_fit(nan if kind == "numpy" else torch.from_numpy(nan))
    np.testing.assert_array_equal(W, sae.components_)
    with pytest.raises(ValueError, match="NaN"):  # transform checks all of X
        sae.transform(nan)


def test_rows_read_by_training_are_checked_as_read():
    """With more rows than the initialisation sample, a non-finite row is found
    by the batch that reads it (and the error names it)."""
    import skdict.training.sae as S

    X, _, _ = _planted(n=512, dtype=np.float32)
    X[400, 1] = np.nan
    old = S._INIT_ROWS
    S._INIT_ROWS = 16  # a sample that (with this seed) misses row 400
    try:
        with pytest.raises(ValueError, match=r"\(row 400\)"):
            _small(n_steps=None, max_iter=1, shuffle=False).fit(X)
        # two steps in row order never read it
        sae = _small(n_steps=2, shuffle=False).fit(X)
        assert np.isfinite(sae.components_).all()
    finally:
        S._INIT_ROWS = old


@pytest.mark.parametrize("kind", ["numpy", "torch", "list"])
def test_fit_leaves_the_input_untouched_and_scale_is_the_rms(kind):
    X, _, _ = _planted(n=256, dtype=np.float32)
    X = 3.0 * X + 1.0
    ref = X.copy()
    data = {"numpy": X, "torch": torch.from_numpy(X), "list": [X[:128], X[128:]]}[kind]
    sae = _small(n_steps=2).fit(data)
    np.testing.assert_array_equal(X, ref)  # the sample is scaled in place, not X
    rows = 128 if kind == "list" else 256  # a stream's sample is its first batch
    rms = np.sqrt((ref[:rows].astype(np.float64) ** 2).sum(1).mean() / ref.shape[1])
    assert sae.input_scale_ == pytest.approx(rms, rel=1e-6)


def test_normalize_grads_gives_unit_norm_gradients_and_keeps_zero_ones():
    from skdict.training.optim import normalize_grads

    a = torch.tensor([3.0, 4.0], requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    c = torch.ones(2, requires_grad=True)  # no gradient
    a.grad, b.grad = torch.tensor([3.0, -4.0]), torch.zeros(3)
    normalize_grads([a, b, c])
    torch.testing.assert_close(a.grad, torch.tensor([0.6, -0.8]))
    assert torch.equal(b.grad, torch.zeros(3)) and c.grad is None
