"""Fuzz tests of the model loaders: KSparseAutoencoder.load and from_saelens.

Every malformed file (truncated, corrupted, wrong shape, wrong dtype, non-finite,
bad config value, optimizer moments of the wrong shape) must raise a ValueError
naming the file and the field, never crash the process or load a model that
fails later.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from skdict import KSparseAutoencoder
from skdict.losses import AdaptiveSparsityScheduler

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
K, D = 12, 6


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).standard_normal((96, D)).astype(np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("saved")
    sae = KSparseAutoencoder(K, k=3, n_steps=4, batch_size=32, random_state=0, device="cpu",
                             k_schedule=AdaptiveSparsityScheduler(9, 3, 10))
    sae.fit(data)
    sae.save(root / "model")
    sae.to_saelens(root / "sl")
    return root


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path, fn, file="model.safetensors"):
    t = load_file(str(path / file))
    fn(t)
    save_file(t, str(path / file))


def _edit_config(path, fn, file="config.json"):
    cfg = json.loads((path / file).read_text())
    fn(cfg)
    (path / file).write_text(json.dumps(cfg))


def _raises_naming(fn, *words):
    with pytest.raises(ValueError) as exc:
        fn()
    msg = str(exc.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ------------------------------------------------------------------ tensors
TENSOR_EDITS = {
    # key -> (edit, words the message must contain)
    "W_dec fewer rows": ("W_dec", lambda a: a[: K // 2], "W_enc"),
    "W_dec wrong width": ("W_dec", lambda a: a[:, :-1], "W_enc"),
    "W_enc transposed": ("W_enc", lambda a: np.ascontiguousarray(a.T), "W_enc"),
    "b_enc short": ("b_enc", lambda a: a[:-1], "b_enc"),
    "b_dec long": ("b_dec", lambda a: np.concatenate([a, a]), "b_dec"),
    "threshold 2-D": ("threshold", lambda a: a[None], "threshold"),
    "W_enc NaN": ("W_enc", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan,
                                            a).astype(a.dtype), "W_enc"),
    "b_dec inf": ("b_dec", lambda a: np.full_like(a, np.inf), "b_dec"),
    "W_dec int": ("W_dec", lambda a: a.astype(np.int32), "W_dec"),
    "tokens_since_fired negative": ("tokens_since_fired", lambda a: a - 10**9,
                                    "tokens_since_fired"),
    "tokens_since_fired float": ("tokens_since_fired", lambda a: a.astype(np.float32),
                                 "tokens_since_fired"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_load_rejects_bad_tensors(saved, tmp_path, case):
    key, edit, field = TENSOR_EDITS[case]
    path = _copy(saved / "model", tmp_path, "m")
    _edit_tensors(path, lambda t: t.__setitem__(key, edit(t[key])))
    _raises_naming(lambda: KSparseAutoencoder.load(path), "model.safetensors", field)


@pytest.mark.parametrize("key", ["W_enc", "b_enc", "W_dec", "b_dec", "threshold",
                                 "tokens_since_fired", "loss_curve"])
def test_load_rejects_missing_tensor(saved, tmp_path, key):
    path = _copy(saved / "model", tmp_path, "m")
    _edit_tensors(path, lambda t: t.pop(key))
    _raises_naming(lambda: KSparseAutoencoder.load(path), "model.safetensors", key)


@FUZZ
@given(frac=st.floats(0.0, 0.99), flip=st.booleans())
def test_load_truncated_or_corrupted_file(saved, tmp_path, frac, flip):
    path = _copy(saved / "model", tmp_path, "m")
    f = path / ("config.json" if flip else "model.safetensors")
    raw = f.read_bytes()
    cut = int(frac * len(raw))
    f.write_bytes(raw[:cut])
    _raises_naming(lambda: KSparseAutoencoder.load(path), f.name)


@FUZZ
@given(pos=st.integers(0, 200), byte=st.integers(0, 255))
def test_load_corrupted_header_bytes(saved, tmp_path, pos, byte):
    """Overwriting a byte of the safetensors header either still loads a valid
    model or raises a ValueError naming the file."""
    path = _copy(saved / "model", tmp_path, "m")
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8 + pos] = byte
    f.write_bytes(bytes(raw))
    try:
        est = KSparseAutoencoder.load(path)
    except ValueError as exc:
        assert "model.safetensors" in str(exc) or "config.json" in str(exc)
        return
    codes = est.transform(np.zeros((2, D), np.float32))
    assert codes.indices.max(initial=0) < est.n_components_


# ------------------------------------------------------------------ config
CONFIG_EDITS = {
    "input_scale 0": (lambda c: c["fitted"].__setitem__("input_scale_", 0.0), "input_scale_"),
    "input_scale NaN": (lambda c: c["fitted"].__setitem__("input_scale_", float("nan")),
                        "input_scale_"),
    "input_scale string": (lambda c: c["fitted"].__setitem__("input_scale_", "1"),
                           "input_scale_"),
    "n_features_in wrong": (lambda c: c["fitted"].__setitem__("n_features_in_", D + 1),
                            "n_features_in_"),
    "n_components wrong": (lambda c: c["fitted"].__setitem__("n_components_", K + 1),
                           "n_components_"),
    "n_steps negative": (lambda c: c["fitted"].__setitem__("n_steps_", -1), "n_steps_"),
    "dead_fraction 2": (lambda c: c["fitted"].__setitem__("dead_fraction_", 2.0),
                        "dead_fraction_"),
    "missing fitted": (lambda c: c["fitted"].pop("n_iter_"), "n_iter_"),
    "missing params": (lambda c: c.pop("params"), "params"),
    "unknown sparsity": (lambda c: c["params"].__setitem__("sparsity", "topkk"), "sparsity"),
    "k zero": (lambda c: c["params"].__setitem__("k", 0), "'k'"),
    "k above n_components": (lambda c: c["params"].__setitem__("k", K + 5), "k="),
    "params n_components": (lambda c: c["params"].__setitem__("n_components", K + 1),
                            "n_components"),
    "unknown parameter": (lambda c: c["params"].__setitem__("bogus", 1), "bogus"),
    "format": (lambda c: c.__setitem__("format", "other"), "format"),
    "newer version": (lambda c: c.__setitem__("version", 99), "version 99"),
    "feature names": (lambda c: c.__setitem__("feature_names_in", ["a"]), "feature_names_in"),
    "k_schedule broken": (lambda c: c["k_schedule"].pop("final"), "k_schedule"),
    "k_schedule schedule": (lambda c: c["k_schedule"].__setitem__("schedule", "exp"),
                            "k_schedule"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_load_rejects_bad_config(saved, tmp_path, case):
    edit, field = CONFIG_EDITS[case]
    path = _copy(saved / "model", tmp_path, "m")
    _edit_config(path, edit)
    _raises_naming(lambda: KSparseAutoencoder.load(path), "config.json", field)


# ------------------------------------------------------------------ training state
def _moment_keys(path):
    return sorted(k for k in load_file(str(path / "model.safetensors"))
                  if k.startswith("resume.optimizer.state.") and "exp_avg" in k)


@FUZZ
@given(which=st.integers(0, 7), shrink=st.integers(1, 3))
def test_load_rejects_optimizer_moment_of_wrong_shape(saved, tmp_path, which, shrink):
    """A wrong-shaped Adam moment would reach the fused kernel (a segfault)."""
    path = _copy(saved / "model", tmp_path, "m")
    key = _moment_keys(path)[which % len(_moment_keys(path))]

    def edit(t):
        a = t[key]
        t[key] = np.ascontiguousarray(a.reshape(-1)[: max(1, a.size - shrink)])

    _edit_tensors(path, edit)
    _raises_naming(lambda: KSparseAutoencoder.load(path), "config.json", key.split(".", 1)[1])


def test_load_rejects_nonfinite_moment_and_bad_generator(saved, tmp_path):
    path = _copy(saved / "model", tmp_path, "m")
    key = _moment_keys(path)[0]
    _edit_tensors(path, lambda t: t.__setitem__(key, np.full_like(t[key], np.nan)))
    _raises_naming(lambda: KSparseAutoencoder.load(path), "config.json", "exp_avg")
    path = _copy(saved / "model", tmp_path, "g")
    gkey = next(k for k in load_file(str(path / "model.safetensors")) if "generator" in k)
    _edit_tensors(path, lambda t: t.__setitem__(gkey, t[gkey][:10]))
    _raises_naming(lambda: KSparseAutoencoder.load(path), "config.json", "generator")


def test_save_load_keeps_k_schedule_and_resumes_exactly(saved, tmp_path, data):
    est = KSparseAutoencoder.load(saved / "model")
    assert est.k_schedule.initial == 9 and est.k_schedule.final == 3
    twin = KSparseAutoencoder.load(saved / "model")
    a = est.partial_fit(data).history_["k"]
    b = twin.partial_fit(data).history_["k"]
    np.testing.assert_array_equal(a, b)
    # the schedule continued from the saved progress (4 steps in, k below 9)
    assert a[4] < 9
    np.testing.assert_array_equal(est.components_, twin.components_)


def test_load_half_precision_tensors_widened(saved, tmp_path, data):
    path = _copy(saved / "model", tmp_path, "m")
    ref = KSparseAutoencoder.load(saved / "model")
    _edit_tensors(path, lambda t: t.__setitem__("W_enc", t["W_enc"].astype(np.float16)))
    est = KSparseAutoencoder.load(path)
    assert est.encoder_weight_.dtype == np.float32
    np.testing.assert_allclose(est.encoder_weight_, ref.encoder_weight_, atol=2e-3)


# ------------------------------------------------------------------ SAELens
def _bf16(path):
    from safetensors.torch import load_file as tload
    from safetensors.torch import save_file as tsave

    f = path / "sae_weights.safetensors"
    t = tload(str(f))
    tsave({k: v.to(torch.bfloat16) for k, v in t.items()}, str(f))


def test_from_saelens_bfloat16_matches_float32(saved, tmp_path, data):
    ref = KSparseAutoencoder.from_saelens(saved / "sl", device="cpu")
    path = _copy(saved / "sl", tmp_path, "s")
    _bf16(path)
    est = KSparseAutoencoder.from_saelens(path, device="cpu")
    assert est.components_.dtype == np.float32
    np.testing.assert_allclose(est.components_, ref.components_, atol=1e-2)
    assert est.transform(data).shape == (len(data), K)


SAELENS_EDITS = {
    "k zero": (None, lambda c: c.__setitem__("k", 0), "cfg.json", "'k'"),
    "k fractional": (None, lambda c: c.__setitem__("k", 2.5), "cfg.json", "'k'"),
    "k above d_sae": (None, lambda c: c.__setitem__("k", K + 1), "cfg.json", "k="),
    "architecture": (None, lambda c: c.__setitem__("architecture", "gated2"), "cfg.json",
                     "architecture"),
    "d_sae mismatch": (None, lambda c: c.__setitem__("d_sae", K + 1), "cfg.json", "d_sae"),
    "W_enc NaN": (lambda t: t.__setitem__("W_enc", t["W_enc"] * np.nan), None,
                  "sae_weights.safetensors", "W_enc"),
    "W_dec shape": (lambda t: t.__setitem__("W_dec", t["W_dec"][:-2]), None,
                    "sae_weights.safetensors", "W_dec"),
    "b_enc short": (lambda t: t.__setitem__("b_enc", t["b_enc"][:3]), None,
                    "sae_weights.safetensors", "b_enc"),
    "b_dec int": (lambda t: t.__setitem__("b_dec", t["b_dec"].astype(np.int64)), None,
                  "sae_weights.safetensors", "b_dec"),
    "missing b_dec": (lambda t: t.pop("b_dec"), None, "sae_weights.safetensors", "b_dec"),
}


@pytest.mark.parametrize("case", sorted(SAELENS_EDITS))
def test_from_saelens_rejects_bad_files(saved, tmp_path, case):
    tensors, cfg, file, field = SAELENS_EDITS[case]
    path = _copy(saved / "sl", tmp_path, "s")
    if tensors is not None:
        _edit_tensors(path, tensors, "sae_weights.safetensors")
    if cfg is not None:
        _edit_config(path, cfg, "cfg.json")
    _raises_naming(lambda: KSparseAutoencoder.from_saelens(path), file, field)


@FUZZ
@given(frac=st.floats(0.0, 0.99))
def test_from_saelens_truncated(saved, tmp_path, frac):
    path = _copy(saved / "sl", tmp_path, "s")
    f = path / "sae_weights.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: int(frac * len(raw))])
    _raises_naming(lambda: KSparseAutoencoder.from_saelens(path), "sae_weights.safetensors")


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "jumprelu", "l1", "matryoshka"])
def test_from_saelens_model_fine_tunes(tmp_path, data, sparsity):
    """Every architecture imported from SAELens trains further with partial_fit,
    and a second import of the same files trains to the same model."""
    src = KSparseAutoencoder(K, k=3, sparsity=sparsity, n_steps=3, batch_size=32,
                             random_state=0, device="cpu").fit(data)
    src.to_saelens(tmp_path / "s")
    est = KSparseAutoencoder.from_saelens(tmp_path / "s", device="cpu", batch_size=32,
                                          random_state=1)
    before = est.transform(data).toarray()
    est.partial_fit(data)
    assert est.n_steps_ == 3 and np.isfinite(est.components_).all()
    assert not np.array_equal(before, est.transform(data).toarray())
    twin = KSparseAutoencoder.from_saelens(tmp_path / "s", device="cpu", batch_size=32,
                                           random_state=1).partial_fit(data)
    np.testing.assert_array_equal(est.components_, twin.components_)
