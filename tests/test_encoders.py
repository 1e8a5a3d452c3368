"""Contract tests of the sparse-autoencoder variants (skdict.encoders)."""

import json

import numpy as np
import pytest
import torch

from skdict import KSparseAutoencoder
from skdict.encoders import encoder_for_saelens, encoder_names, get_encoder
from skdict.encoders.base import preactivations
from skdict.encoders.jumprelu import jumprelu, reference_loss, step
from skdict.encoders.matryoshka import prefix_sizes_for
from skdict.losses import batch_variance, fvu_loss

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ("topk", "batchtopk", "matryoshka", "jumprelu", "l1", "kl", "lifetime")
PARAMS = {"k": 3, "alpha": 0.05, "rho": 0.1, "bandwidth": 0.5, "prefix_sizes": (2, 5)}


def _variant(name, K=12):
    v = get_encoder(name)(K, **{p: PARAMS[p] for p in get_encoder(name).params})
    v.check_params()
    return v


def _params(K=12, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    P = {
        "W_enc": torch.randn(K, d, generator=g, dtype=dtype),
        "b_enc": 0.1 * torch.randn(K, generator=g, dtype=dtype),
        "W_dec": torch.randn(K, d, generator=g, dtype=dtype),
        "b_dec": 0.3 * torch.randn(d, generator=g, dtype=dtype),
    }
    x = torch.randn(8, d, generator=g, dtype=dtype)
    return P, x


def _planted(n=2000, K=16, d=24, s=2, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.normal(size=(K, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Z = np.zeros((n, K))
    for i in range(n):
        Z[i, rng.choice(K, s, replace=False)] = rng.uniform(1.0, 2.0, s)
    return (Z @ D).astype(np.float32)


def test_registry():
    assert set(encoder_names()) == set(VARIANTS)
    with pytest.raises(ValueError, match="unknown sparsity 'nope'"):
        get_encoder("nope")
    assert encoder_for_saelens("jumprelu").name == "jumprelu"
    assert encoder_for_saelens("standard").name == "l1"
    assert encoder_for_saelens("matryoshka_batchtopk").name == "matryoshka"
    with pytest.raises(ValueError, match="'gated' is not supported"):
        encoder_for_saelens("gated")
    # the estimator's options are the registry
    opts = KSparseAutoencoder._parameter_constraints["sparsity"][0].options
    assert opts == set(VARIANTS)


def test_new_variant_is_one_class_and_one_registration():
    """A variant defined outside the package (here: ReLU codes of the ``k``
    largest pre-activations of the batch's first half of latents) trains, encodes
    and exports once registered."""
    from skdict.encoders import SelectingEncoder, register, unregister
    from skdict.solvers.topk import select_topk

    @register
    class FirstHalfTopK(SelectingEncoder):
        name = "first_half_topk"
        params = ("k",)
        saelens_architecture = "topk"

        def select(self, pre, k, buffers):
            masked = pre.clone()
            masked[:, self.n_components // 2:] = float("-inf")
            return select_topk(masked, k)

        def encode(self, pre, threshold, k):
            pre = pre.clone()
            pre[:, self.n_components // 2:] = float("-inf")
            return super().encode(pre, threshold, k)

        def saelens_config(self):
            return {"k": int(self.k)}

    try:
        X = _planted(n=500)
        sae = _fit("first_half_topk", n_components=16, k=2, n_steps=30).fit(X)
        codes = sae.transform(X)
        assert codes.indices.max() < 8 and codes.getnnz(axis=1).max() <= 2
        assert sae.score(X) > 0
    finally:
        unregister("first_half_topk")
    with pytest.raises(ValueError, match="sparsity"):
        _fit("first_half_topk").fit(X)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_gradcheck(name):
    """Gradients of every variant's training outputs (reconstructions and
    penalty) w.r.t. the input and all four weight tensors, float64, at a fixed
    selection (the selection and thresholds are piecewise constant)."""
    variant = _variant(name)
    P, x = _params()
    extra = variant.init_parameters(P, x)
    if "log_threshold" in extra:  # it starts at one of the pre-activations: move off it
        extra["log_threshold"] = extra["log_threshold"] + 0.01
        gap = (preactivations(x, P) - torch.exp(extra["log_threshold"])).abs().min()
        assert gap > 1e-4
    inputs = (x, P["W_enc"], P["b_enc"], P["W_dec"], P["b_dec"])
    inputs = tuple(t.clone().requires_grad_(True) for t in inputs)

    def f(x, W_enc, b_enc, W_dec, b_dec):
        Q = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, **extra}
        with torch.no_grad():
            pre = preactivations(x, Q)
        out = variant.forward(x, Q, 3, variant.init_buffers(Q), pre if variant.sparse else None)
        return (*out.reconstructions, out.penalty)

    out = f(*inputs)
    assert out[-2].shape == x.shape
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_jumprelu_reference_pseudo_gradient():
    """The dense reference implements the documented straight-through gradient:
    d/dtheta of sum(g * jumprelu) = -(theta/eps) sum_i g_i rect((pre_i - theta)/eps)."""
    pre = torch.tensor([[0.9, 1.2, 0.1], [1.05, 0.5, 0.3], [2.0, 0.96, -1.0]],
                       dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 0.25], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
    eps = 0.2
    z = jumprelu(pre, theta, eps)
    np.testing.assert_array_equal(z.detach().numpy(),
                                  [[0, 1.2, 0], [1.05, 0, 0.3], [2.0, 0, 0]])
    gp, gt = torch.autograd.grad((z * g).sum(), (pre, theta))
    # window |pre - theta| < 0.1: (0,0) 0.9, (1,0) 1.05, (2,1) 0.96, (1,2) 0.3
    np.testing.assert_allclose(gt.numpy(), [-(1.0 / eps) * (1 + 4), -(1.0 / eps) * 8,
                                            -(0.25 / eps) * 6])
    np.testing.assert_array_equal(gp.numpy(), g.numpy() * (pre > theta).numpy())
    h = step(pre, theta, eps)
    gp, gt = torch.autograd.grad((h * g).sum(), (pre, theta))
    np.testing.assert_allclose(gt.numpy(), [-(1 + 4) / eps, -8 / eps, -6 / eps])
    assert (gp == 0).all()


def test_jumprelu_sparse_training_matches_dense_reference():
    """The sparse training path (active pairs + kernel-window pairs) gives the
    same loss and the same gradients, thresholds included, as the dense
    straight-through reference."""
    K, d = 40, 7
    P, _ = _params(K=K, d=d, seed=3)
    x = torch.randn(64, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    variant = get_encoder("jumprelu")(K, k=6, alpha=0.02, bandwidth=0.4)
    P["log_threshold"] = variant.init_parameters(P, x)["log_threshold"]
    P["log_threshold"] += 0.3 * torch.randn(K, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(5))
    grads = []
    for path in ("sparse", "dense"):
        Q = {n: t.clone().requires_grad_(True) for n, t in P.items()}
        if path == "sparse":
            with torch.no_grad():
                pre = preactivations(x, Q)
            out = variant.forward(x, Q, 6, {}, pre)
            loss = fvu_loss(x, out.reconstructions[-1], batch_variance(x)) + out.penalty
        else:
            loss = reference_loss(x, Q, torch.exp(Q["log_threshold"]), 0.02, 0.4)
        loss.backward()
        grads.append((float(loss.detach()), {n: t.grad for n, t in Q.items()}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    assert grads[0][1]["log_threshold"].abs().sum() > 0  # the window is not empty
    for n in P:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-9, atol=1e-12)


def test_matryoshka_prefix_sizes():
    assert prefix_sizes_for(256) == (16, 32, 64, 128, 256)
    assert prefix_sizes_for(3) == (1, 3)
    assert prefix_sizes_for(10, (2, 5)) == (2, 5, 10)
    with pytest.raises(ValueError, match="strictly increasing"):
        prefix_sizes_for(10, (5, 2))
    with pytest.raises(ValueError, match="between 1 and n_components=10"):
        prefix_sizes_for(10, (0, 4))
    with pytest.raises(ValueError, match="strictly increasing"):
        KSparseAutoencoder(n_components=8, k=1, sparsity="matryoshka",
                           prefix_sizes=[4, 4]).fit(np.ones((4, 3)))
    assert prefix_sizes_for(10, np.array([2, 5])) == (2, 5, 10)
    for bad in ([2.5, 8], [[2, 4]]):  # not truncated to 2, not a raw TypeError
        with pytest.raises(ValueError, match="1-D sequence of integers"):
            prefix_sizes_for(10, bad)


def test_matryoshka_reconstructions_are_prefix_sums():
    variant = _variant("matryoshka")
    P, x = _params()
    with torch.no_grad():
        pre = preactivations(x, P)
        out = variant.forward(x, P, 3, variant.init_buffers(P), pre)
        Z = out.pairs.to_dense(torch.relu(pre[out.pairs.row, out.pairs.col]))
    assert len(out.reconstructions) == 3  # prefixes 2, 5, 12
    for m, r in zip((2, 5, 12), out.reconstructions, strict=True):
        torch.testing.assert_close(r, Z[:, :m] @ P["W_dec"][:m] + P["b_dec"])


# ---------------------------------------------------------------- learning
def _fit(sparsity, **kw):
    params = dict(n_components=32, k=3, n_steps=200, batch_size=128, lr=3e-3,
                  random_state=0, device="cpu", sparsity=sparsity)
    params.update(kw)
    return KSparseAutoencoder(**params)


def test_jumprelu_thresholds_move_and_l0_falls_with_alpha():
    X = _planted()
    l0, thresholds = [], []
    for alpha in (0.0, 3e-3, 3e-2):
        sae = _fit("jumprelu", alpha=alpha, bandwidth=0.2).fit(X)
        l0.append(sae.transform(X).getnnz(axis=1).mean())
        thresholds.append(sae.threshold_)
    # thresholds start equal (the BatchTopK threshold of k) and move per latent
    first = np.exp(np.log(thresholds[1]).mean())
    assert np.std(thresholds[1]) > 0.05 * first
    assert l0[0] > l0[1] > l0[2], l0
    assert np.mean(thresholds[2]) > np.mean(thresholds[0])


def test_matryoshka_prefixes_improve_monotonically():
    X = _planted(n=3000, K=24, d=32, s=3, seed=1)
    kw = dict(n_components=64, k=3, n_steps=400, prefix_sizes=(4, 8, 16, 32))
    sae = _fit("matryoshka", **kw).fit(X)
    plain = _fit("batchtopk", **kw).fit(X)

    def prefix_fvu(model):
        Z = model.transform(X).toarray()
        out = []
        for m in (4, 8, 16, 32, 64):
            Zm = Z.copy()
            Zm[:, m:] = 0
            R = X - model.inverse_transform(Zm)
            out.append(float((R**2).sum() / ((X - X.mean(0)) ** 2).sum()))
        return np.array(out)

    f = prefix_fvu(sae)
    assert (np.diff(f) < 0).all(), f
    # nesting is what makes a short prefix useful on its own
    assert f[0] < prefix_fvu(plain)[0] - 0.05


# ---------------------------------------------------------------- SAELens
@pytest.mark.parametrize("name", VARIANTS)
def test_saelens_roundtrip(tmp_path, name):
    X = _planted(n=600)
    sae = _fit(name, n_components=16, k=2, n_steps=40).fit(X)
    sae.to_saelens(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == get_encoder(name).saelens_architecture
    back = KSparseAutoencoder.from_saelens(tmp_path / "sae", device="cpu", batch_size=128)
    a, b = sae.transform(X), back.transform(X)
    # inference is batch-independent (BatchTopK / Matryoshka use their threshold)
    np.testing.assert_allclose(sae.transform(X[:7]).toarray(), a[:7].toarray(), rtol=1e-6)
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(back.inverse_transform(b), sae.inverse_transform(a),
                               rtol=1e-4, atol=1e-5)
    # an imported model fine-tunes with partial_fit
    before = back.components_.copy()
    back.partial_fit(X)
    assert back.n_steps_ == 5 and not np.allclose(before, back.components_)


@pytest.mark.parametrize("name", VARIANTS)
def test_saelens_loads_our_export(tmp_path, name):
    pytest.importorskip("sae_lens")
    from sae_lens import SAE

    X = _planted(n=600)
    sae = _fit(name, n_components=16, k=2, n_steps=40).fit(X)
    sae.to_saelens(tmp_path / "sae")
    theirs = SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    with torch.no_grad():
        Z = theirs.encode(torch.from_numpy(X)).numpy()
        X_hat = theirs.decode(torch.from_numpy(Z)).numpy()
    np.testing.assert_allclose(sae.transform(X).toarray(), Z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.inverse_transform(Z), X_hat, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"])
def test_from_saelens_training_checkpoint(tmp_path, arch):
    """A checkpoint of SAELens' own training SAE (random weights, decoder norms
    away from 1, a non-trivial threshold) imports with the codes and
    reconstructions of SAELens' inference model of it."""
    pytest.importorskip("sae_lens")
    from sae_lens import SAE
    from sae_lens.saes import batchtopk_sae, jumprelu_sae, matryoshka_batchtopk_sae, topk_sae

    d_in, d_sae = 6, 32
    make = {
        "topk": lambda: topk_sae.TopKTrainingSAE(topk_sae.TopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k=3, rescale_acts_by_decoder_norm=True)),
        "batchtopk": lambda: batchtopk_sae.BatchTopKTrainingSAE(
            batchtopk_sae.BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=3)),
        "matryoshka_batchtopk": lambda: matryoshka_batchtopk_sae.MatryoshkaBatchTopKTrainingSAE(
            matryoshka_batchtopk_sae.MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, k=3, matryoshka_widths=[4, 16, d_sae])),
        "jumprelu": lambda: jumprelu_sae.JumpReLUTrainingSAE(
            jumprelu_sae.JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae)),
    }
    torch.manual_seed(0)
    sae = make[arch]()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 1.0))
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(1.5)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae) * 2)
    sae.save_model(str(tmp_path / "train"))
    sae.save_inference_model(str(tmp_path / "infer"))
    ref = SAE.load_from_disk(str(tmp_path / "infer"), device="cpu")
    X = np.random.default_rng(0).normal(size=(64, d_in)).astype(np.float32)
    with torch.no_grad():
        Z = ref.encode(torch.from_numpy(X)).numpy()
        X_hat = ref.decode(torch.from_numpy(Z)).numpy()
    assert (Z > 0).sum(1).mean() > 1
    for folder in ("train", "infer"):
        ours = KSparseAutoencoder.from_saelens(tmp_path / folder, device="cpu")
        np.testing.assert_allclose(ours.transform(X).toarray(), Z, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.inverse_transform(Z), X_hat, rtol=1e-5, atol=1e-4)
    if arch == "matryoshka_batchtopk":
        ours = KSparseAutoencoder.from_saelens(tmp_path / "train")
        assert ours.sparsity == "matryoshka" and ours.prefix_sizes == (4, 16, d_sae)
