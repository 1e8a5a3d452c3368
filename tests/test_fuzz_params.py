"""Fuzz tests of parameter validation: parameters changed after fit (set_params,
between partial_fit calls) are validated on every call, out-of-range counts are
rejected (never clipped), and errors name the parameter without leaking
internals."""

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from skdict import (
    CollapsedDictionaryLearner,
    KSparseAutoencoder,
    LCASparseCoder,
    SparseCoder,
    SparseTokenSelector,
)
from skdict.functional import sparse_encode
from skdict.losses import balanced_loss, sparsity_loss
from skdict.model_selection import alpha_for_sparsity
from skdict.nn import SparseAttention, sparse_attention, sparse_weights

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = settings(max_examples=10, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 6)).astype(np.float32)
DICT = RNG.standard_normal((10, 6))
DICT /= np.linalg.norm(DICT, axis=1, keepdims=True)

# internals a message must not show: class names of the machinery, Python's own
# messages from unpacking / range / indexing
INTERNAL = re.compile(r"\b(ArraySource|StreamSource|RowSource|FeatureProbe|SAELearner|LCALearner|"
                      r"CollapsedLearner|SAEState|LCAState|CollapsedState|TrainState|"
                      r"BlockEncoder)\b|not enough values to unpack|"
                      r"range\(\) arg|index \d+ is out of bounds|tuple index out of range")


def _learners():
    return {
        "sae": KSparseAutoencoder(8, k=2, batch_size=32, random_state=0, device="cpu"),
        "lca": LCASparseCoder(8, alpha=0.1, batch_size=32, fit_max_iter=20, random_state=0,
                              device="cpu"),
        "collapsed": CollapsedDictionaryLearner(8, n_nonzero_coefs=2, batch_size=32,
                                                random_state=0, device="cpu"),
    }


# (estimator, parameter, invalid value)
INVALID = [
    ("sae", "batch_size", 0), ("sae", "k", 0), ("sae", "k", 9), ("sae", "alpha", -1.0),
    ("sae", "sparsity", "relu"), ("sae", "lr", 0.0), ("sae", "max_iter", 0),
    ("lca", "alpha", -1.0), ("lca", "batch_size", 0), ("lca", "fit_max_iter", 0),
    ("lca", "tau", 0.0), ("lca", "fit_algorithm", "omp"), ("lca", "inference_tol", -1.0),
    ("collapsed", "n_nonzero_coefs", 0), ("collapsed", "n_nonzero_coefs", 9),
    ("collapsed", "batch_size", 0), ("collapsed", "alpha", -0.5),
    ("collapsed", "n_candidates", 1),
]


@pytest.mark.parametrize("name,param,value", INVALID)
def test_partial_fit_validates_changed_parameters(name, param, value):
    """scikit-learn validates partial_fit only until the model is fitted; a value
    set between calls must fail as it would at fit, leaving the model intact."""
    est = _learners()[name].partial_fit(X)
    before = est.components_.copy()
    steps = est.n_steps_
    est.set_params(**{param: value})
    with pytest.raises(ValueError, match=param):
        est.partial_fit(X)
    np.testing.assert_array_equal(est.components_, before)
    assert est.n_steps_ == steps


TRANSFORM_INVALID = [
    ("sae", "k", 9), ("sae", "k", 0), ("sae", "sparsity", "dense"),
    ("lca", "alpha", -1.0), ("lca", "transform_max_iter", 0),
    ("lca", "transform_algorithm", "lars"), ("collapsed", "n_nonzero_coefs", 9),
    ("collapsed", "batch_size", 0),
]


@pytest.mark.parametrize("name,param,value", TRANSFORM_INVALID)
def test_transform_validates_changed_parameters(name, param, value):
    est = _learners()[name].set_params(max_iter=1).fit(X)
    est.set_params(**{param: value})
    for method in (est.transform, est.score):
        with pytest.raises(ValueError, match=param):
            method(X)


def test_structural_changes_rejected_by_partial_fit():
    for est in _learners().values():
        est.partial_fit(X)
        est.set_params(n_components=7)
        with pytest.raises(ValueError, match="n_components changed from 8 to 7"):
            est.partial_fit(X)
    sae = _learners()["sae"].partial_fit(X).set_params(sparsity="batchtopk")
    with pytest.raises(ValueError, match="sparsity changed"):
        sae.partial_fit(X)


def test_sparse_coder_and_selector_validate_set_params():
    coder = SparseCoder(DICT, device="cpu").fit(X)
    for param, value in [("alpha", -1.0), ("transform_max_iter", 0), ("algorithm", "lars"),
                         ("n_nonzero_coefs", 11)]:
        est = clone(coder).set_params(**{param: value})
        if param == "n_nonzero_coefs":
            est.set_params(algorithm="omp")
        with pytest.raises(ValueError, match=param):
            est.transform(X)
    sel = SparseTokenSelector(method="topk", device="cpu").fit(X)
    for param, value in [("max_tokens", 65), ("max_tokens", 0), ("method", "softmax"),
                         ("keep_ratio", 1.5)]:
        with pytest.raises(ValueError, match=param):
            clone(sel).fit(X).set_params(**{param: value}).transform(X[:3])


@pytest.mark.parametrize("est", [KSparseAutoencoder(8), LCASparseCoder(8),
                                 CollapsedDictionaryLearner(8), SparseTokenSelector()],
                         ids=lambda e: type(e).__name__)
def test_get_feature_names_out_needs_fit(est):
    with pytest.raises(NotFittedError):
        est.get_feature_names_out()


# ------------------------------------------------------------------ counts: one rule
@FUZZ
@given(k=st.integers(-3, 20))
def test_counts_rejected_out_of_range_never_clipped(k):
    """k / n_nonzero_coefs / max_tokens outside [1, available] raise ValueError naming
    the parameter everywhere; inside the range they hold exactly."""
    S = torch.randn(3, 10)
    if 1 <= k <= 10:
        w = sparse_weights(S, "topk", k=k)
        assert ((w != 0).sum(-1) == k).all()
        assert torch.allclose(w.sum(-1), torch.ones(3))
    else:
        with pytest.raises(ValueError, match="k must be"):
            sparse_weights(S, "topk", k=k)
    if 1 <= k <= DICT.shape[0]:
        codes = sparse_encode(X[:4], DICT, algorithm="omp", n_nonzero_coefs=k, device="cpu")
        assert ((codes != 0).sum(1) <= k).all()
    else:
        with pytest.raises(ValueError, match="n_nonzero_coefs"):
            sparse_encode(X[:4], DICT, algorithm="omp", n_nonzero_coefs=k, device="cpu")
    if k > 8:
        for est in (KSparseAutoencoder(8, k=k, device="cpu"),
                    CollapsedDictionaryLearner(8, n_nonzero_coefs=k, device="cpu"),
                    SparseTokenSelector(max_tokens=k + 60, device="cpu")):
            with pytest.raises(ValueError, match="k=|n_nonzero_coefs|max_tokens"):
                est.fit(X)


def test_alpha_for_sparsity_refuses_estimators_alpha_does_not_control():
    lca = LCASparseCoder(8, alpha=0.1, max_iter=1, device="cpu", random_state=0).fit(X)
    for est, word in [
        (SparseCoder(DICT, algorithm="omp", device="cpu"), "n_nonzero_coefs"),
        (clone(lca).set_params(transform_algorithm="omp"), "transform_n_nonzero_coefs"),
        (CollapsedDictionaryLearner(8, n_nonzero_coefs=2, max_iter=1, device="cpu").fit(X),
         "n_nonzero_coefs"),
        (KSparseAutoencoder(8, k=2, n_steps=2, device="cpu").fit(X), "k"),
    ]:
        if not hasattr(est, "components_") and not isinstance(est, SparseCoder):
            est.fit(X)
        with pytest.raises(ValueError, match=word):
            alpha_for_sparsity(est, X, target_l0=2)
    # the hard-threshold LCA is tuned through its own transform
    hard = LCASparseCoder(8, alpha=0.3, threshold="hard", max_iter=1, device="cpu",
                          random_state=0).fit(X)
    alpha = alpha_for_sparsity(hard, X, target_l0=2, rtol=0.1)
    l0 = hard.set_params(alpha=alpha).transform(X).getnnz(axis=1).mean()
    assert abs(l0 - 2) <= 0.5


def test_sparsity_loss_kl_boundary_is_finite():
    for dtype in (torch.float32, torch.float64):
        c = torch.tensor([0.0, 1.0, 0.5], dtype=dtype, requires_grad=True)
        loss = sparsity_loss(c, 0.1, kind="kl")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(c.grad).all()
        # pulled toward the target: up at 0, down at 1 and 0.5
        assert c.grad[0] < 0 < c.grad[1] and c.grad[2] > 0
    with pytest.raises(ValueError, match="target"):
        sparsity_loss(torch.tensor([0.2]), 0.0, kind="kl")


def test_balanced_loss_rejects_misspelt_names():
    losses = {"mse": torch.tensor(2.0), "l1": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="'mes'"):
        balanced_loss(losses, weights={"mes": 3.0})
    with pytest.raises(ValueError, match="'l2'"):
        balanced_loss(losses, shares={"l2": 1.0})
    total, parts = balanced_loss(losses, weights={"mse": 3.0})
    assert float(total) == 7.0 and parts == {"mse": 6.0, "l1": 1.0}


# ------------------------------------------------------------------ attention
@FUZZ
@given(L=st.integers(0, 5), S=st.integers(1, 6), k=st.integers(1, 6),
       method=st.sampled_from(["topk", "threshold", "sparsemax"]))
def test_sparse_attention_masks_and_shapes(L, S, k, method):
    q, key, v = torch.randn(2, L, 4), torch.randn(2, S, 4), torch.randn(2, S, 3)
    mask1 = torch.rand(S) > 0.3
    mask1[0] = True
    out, info = sparse_attention(q, key, v, mask1, method=method, max_tokens=k)
    assert out.shape == (2, L, 3)
    if L:  # a 1-D boolean mask is one mask over the keys, as in SDPA
        full = sparse_attention(q, key, v, mask1.expand(L, S), method=method, max_tokens=k)[0]
        torch.testing.assert_close(out, full)
        ref = torch.nn.functional.scaled_dot_product_attention(q, key, v, mask1)
        dense = sparse_attention(q, key, v, mask1)[0]  # topk without a budget: softmax
        torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-5)
        assert info["nnz_max"] <= min(k, int(mask1.sum()))


def test_attention_boundary_errors_name_the_parameter():
    q = torch.randn(2, 3, 4)
    cases = [
        (lambda: SparseAttention(8, 0), "num_heads"),
        (lambda: SparseAttention(8, -2), "num_heads"),
        (lambda: SparseAttention(0, 1), "embed_dim"),
        (lambda: SparseAttention(8, 3), "num_heads"),
        (lambda: sparse_attention(q, q, q, chunk_size=0), "chunk_size"),
        (lambda: sparse_attention(q[0, 0], q, q), "query"),
        (lambda: sparse_attention(q, q[..., :3], q), "key"),
        (lambda: sparse_attention(q, q, q, max_tokens=0), "max_tokens"),
        (lambda: sparse_attention(q, q, q, method="entmax"), "method"),
        (lambda: SparseAttention(4, 2)(torch.randn(2, 3, 5)), "query"),
    ]
    for fn, word in cases:
        with pytest.raises(ValueError, match=word) as exc:
            fn()
        assert not INTERNAL.search(str(exc.value)), str(exc.value)
    # all valid methods are listed
    with pytest.raises(ValueError) as exc:
        sparse_attention(q, q, q, method="entmax")
    for m in ("topk", "threshold", "sparsemax"):
        assert m in str(exc.value)
    with pytest.raises(ValueError) as exc:
        SparseTokenSelector(method="entmax").fit(X)
    for m in ("lasso", "topk", "threshold", "sparsemax"):
        assert m in str(exc.value)


def test_sparse_attention_module_accepts_unbatched_input_like_mha():
    torch.manual_seed(0)
    attn = SparseAttention(8, 2)
    x = torch.randn(5, 8)
    out, info = attn(x, need_weights=True)
    ref, _ = attn(x[None], need_weights=True)
    torch.testing.assert_close(out, ref[0])
    assert info["weights"].shape == (5, 5)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    attn.load_state_dict(mha.state_dict())
    torch.testing.assert_close(attn(x)[0], mha(x, x, x)[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ messages
@pytest.mark.parametrize("call", [
    lambda: KSparseAutoencoder(8, device="cpu").fit(np.zeros((0, 3))),
    lambda: KSparseAutoencoder(8, device="cpu").fit([np.zeros((4, 3)), np.zeros(3)]),
    lambda: LCASparseCoder(4, device="cpu").fit(torch.zeros(4, 3, 2)),
    lambda: SparseCoder(DICT, device="cpu").transform(X[:, :5]),
    lambda: sparse_encode(X[:, :5], DICT, device="cpu"),
    lambda: sparse_encode(X, DICT, init=np.zeros((3, 3)), device="cpu"),
    lambda: CollapsedDictionaryLearner(4, n_nonzero_coefs=2, device="cpu").fit(
        [{"x": X}]),
    lambda: SparseTokenSelector(device="cpu").fit(X).transform(X[:, :2]),
], ids=lambda f: "")
def test_error_messages_free_of_internals(call):
    with pytest.raises(ValueError) as exc:
        call()
    assert not INTERNAL.search(str(exc.value)), str(exc.value)
