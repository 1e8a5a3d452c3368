"""Forward-hook collection and splicing of hidden states (skdict.hooks) and the
spliced evaluation of a sparse autoencoder (skdict.metrics.spliced_evaluation)."""

import numpy as np
import pytest
import torch

from skdict import KSparseAutoencoder
from skdict.datasets import minilm_model, minilm_module, minilm_token_activations
from skdict.hooks import collect_activations, get_module, splice_activations
from skdict.metrics import spliced_evaluation

TEXTS = [
    "Sparse codes are cheap.",
    "Return the list of open file handles, sorted by name.",
    "A dictionary maps keys to values.",
]


@pytest.fixture(scope="module")
def bert():
    return minilm_model()


def test_minilm_module_names():
    assert minilm_module(0) == "embeddings"
    assert minilm_module(3) == "encoder.layer.2"
    assert minilm_module(-1) == "encoder.layer.5"
    with pytest.raises(ValueError, match="out of range"):
        minilm_module(7)


@pytest.mark.parametrize("layer", [0, 3, 6])
def test_collect_matches_token_activations(bert, layer, tmp_path):
    model, tok = bert
    ref = minilm_token_activations(TEXTS, layer=layer)
    X, ids = collect_activations(model, tok, TEXTS, minilm_module(layer), batch_size=2,
                                 return_tokens=True)
    # rows in text order, [CLS] / [SEP] left out
    expected = np.concatenate([a[1:-1] for _, a in ref])
    assert X.shape == expected.shape and X.dtype == np.float32
    np.testing.assert_allclose(X, expected, atol=1e-5)
    words = [t for toks, _ in ref for t in toks[1:-1]]
    assert tok.convert_ids_to_tokens(ids.tolist()) == words
    # streamed to a .npy memory map: same rows
    Xm = collect_activations(model, tok, TEXTS, minilm_module(layer), batch_size=1,
                             path=tmp_path / "acts.npy")
    assert isinstance(Xm, np.memmap)
    np.testing.assert_allclose(Xm, X, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "acts.npy"), Xm)
    # special tokens kept
    Xs = collect_activations(model, tok, TEXTS[:1], minilm_module(layer), skip_special=False)
    np.testing.assert_allclose(Xs, ref[0][1], atol=1e-5)


def test_splice_runs_later_layers_on_replacement(bert):
    model, tok = bert
    inputs = tok(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
        with splice_activations(model, "encoder.layer.2", lambda h: h):
            same = model(**inputs).last_hidden_state
        with splice_activations(model, "encoder.layer.2", lambda h: 2.0 * h) as keep:
            keep(None)
            spliced = model(**inputs).last_hidden_state
        # oracle: layers 4..6 applied by hand to the replaced hidden state 3
        def tail(x):
            for layer in model.encoder.layer[3:]:
                out = layer(x)
                x = out[0] if isinstance(out, tuple) else out
            return x

        mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
        mask[0, 2] = True  # only the token "codes"
        with splice_activations(model, "encoder.layer.2", torch.zeros_like) as keep:
            keep(mask)
            partial = model(**inputs).last_hidden_state
        zeroed = hs[3].clone()
        zeroed[0, 2] = 0.0
        expected_partial = tail(zeroed)
        expected = tail(2.0 * hs[3])
    torch.testing.assert_close(same, hs[-1], rtol=0, atol=0)
    torch.testing.assert_close(spliced, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partial, expected_partial, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(partial, hs[-1], atol=1e-3)
    # the hook is gone after the context
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, hs[-1], rtol=0, atol=0)


def test_errors(bert):
    model, tok = bert
    with pytest.raises(ValueError, match="no submodule 'encoder.layer.9'"):
        collect_activations(model, tok, TEXTS, "encoder.layer.9")
    with pytest.raises(ValueError, match="not a submodule"):
        get_module(model, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="list of strings"):
        collect_activations(model, tok, [1, 2], "embeddings")
    with pytest.raises(ValueError, match="pass its tokenizer and the module"):
        spliced_evaluation(lambda h: h, TEXTS, model=model)
    with pytest.raises(ValueError, match="output must be"):
        spliced_evaluation(lambda h: h, TEXTS, output="ce")
    with pytest.raises(ValueError, match="fitted autoencoder"):
        spliced_evaluation(3, TEXTS)
    sae = KSparseAutoencoder(n_components=8, k=2, n_steps=2, batch_size=16,
                             device="cpu").fit(np.random.default_rng(0).normal(
                                 size=(64, 10)).astype(np.float32))
    with pytest.raises(ValueError, match="fitted on 10"):
        spliced_evaluation(sae, TEXTS)


def _cos(a, b):
    a, b = a.double(), b.double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def test_spliced_evaluation_against_manual_runs(bert):
    model, tok = bert
    module = minilm_module(3)
    X = collect_activations(model, tok, TEXTS, module)
    ident = spliced_evaluation(lambda h: h, TEXTS, layer=3)
    assert ident["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert ident["recovered_zero"] == pytest.approx(1.0, abs=1e-9)
    assert ident["recovered_mean"] == pytest.approx(1.0, abs=1e-9)
    assert ident["fvu"] == 0.0 and ident["n_tokens"] == X.shape[0] and ident["n_texts"] == 3

    # manual runs, one text at a time (no padding): mean pooling, ablations
    mean = torch.as_tensor(X.mean(0, dtype=np.float64), dtype=torch.float32)
    shrink = lambda h: 0.5 * h  # noqa: E731
    embs = {"clean": [], "sae": [], "zero": [], "mean": []}
    fns = {"sae": shrink, "zero": torch.zeros_like, "mean": lambda h: mean.expand_as(h)}
    with torch.no_grad():
        for text in TEXTS:
            inputs = tok([text], return_tensors="pt")
            keep = torch.ones(inputs["input_ids"].shape, dtype=torch.bool)
            keep[0, 0] = keep[0, -1] = False
            embs["clean"].append(model(**inputs).last_hidden_state.mean(1))
            for name, fn in fns.items():
                with splice_activations(model, module, fn) as set_keep:
                    set_keep(keep)
                    embs[name].append(model(**inputs).last_hidden_state.mean(1))
    ref = torch.cat(embs["clean"])
    cos = {n: _cos(torch.cat(embs[n]), ref) for n in fns}
    r = spliced_evaluation(shrink, TEXTS, layer=3, batch_size=2)
    assert r["cosine"] == pytest.approx(cos["sae"], abs=1e-5)
    assert r["cosine_zero"] == pytest.approx(cos["zero"], abs=1e-5)
    assert r["cosine_mean"] == pytest.approx(cos["mean"], abs=1e-5)
    expected = 1 - (1 - cos["sae"]) / (1 - cos["zero"])
    assert r["recovered_zero"] == pytest.approx(expected, abs=1e-4)
    expected = 1 - (1 - cos["sae"]) / (1 - cos["mean"])
    assert r["recovered_mean"] == pytest.approx(expected, abs=1e-4)
    Xc = X - X.mean(0)
    assert r["fvu"] == pytest.approx(0.25 * (X ** 2).sum() / (Xc ** 2).sum(), rel=1e-5)


def test_spliced_evaluation_of_fitted_autoencoder(bert):
    model, tok = bert
    X = collect_activations(model, tok, TEXTS * 4, minilm_module(2))
    sae = KSparseAutoencoder(n_components=64, k=8, n_steps=40, batch_size=32,
                             random_state=0, device="cpu").fit(X)
    r = spliced_evaluation(sae, TEXTS, layer=2)
    Xe = collect_activations(model, tok, TEXTS, minilm_module(2))
    assert r["fvu"] == pytest.approx(1.0 - sae.score(Xe), rel=1e-4)
    assert r["cosine_zero"] < r["cosine"] < 1.0
    assert 0.0 < r["recovered_zero"] < 1.0


def test_decoder_model_loss_recovered(bert):
    # a small causal language model built locally (random weights, no download)
    transformers = pytest.importorskip("transformers")
    _, tok = bert
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                  vocab_size=tok.vocab_size, pad_token_id=0)
    lm = transformers.GPT2LMHeadModel(cfg).eval()
    X = collect_activations(lm, tok, TEXTS, "transformer.h.0")
    with torch.no_grad():
        # no token_type_ids: GPT-2 would add their embeddings
        inputs = tok(TEXTS[:1], return_tensors="pt", return_token_type_ids=False)
        hs = lm(**inputs, output_hidden_states=True).hidden_states[1]
    np.testing.assert_allclose(X[:hs.shape[1] - 2], hs[0, 1:-1].numpy(), atol=1e-5)
    ident = spliced_evaluation(lambda h: h, TEXTS, model=lm, tokenizer=tok,
                               module="transformer.h.0", output="loss")
    assert ident["loss"] == pytest.approx(ident["loss_clean"], abs=1e-6)
    assert ident["recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    # manual next-token cross entropy of one text with its layer zeroed
    with torch.no_grad():
        with splice_activations(lm, "transformer.h.0", torch.zeros_like) as keep:
            keep(torch.tensor([[False] + [True] * (inputs["input_ids"].shape[1] - 2)
                               + [False]]))
            logits = lm(**inputs).logits
    ids = inputs["input_ids"]
    ce = float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))
    r = spliced_evaluation(lambda h: 0.9 * h, TEXTS[:1], model=lm, tokenizer=tok,
                           module="transformer.h.0", output="loss")
    assert r["loss_zero"] == pytest.approx(ce, rel=1e-5)
    assert r["recovered_zero"] == pytest.approx(
        1 - (r["loss"] - r["loss_clean"]) / (r["loss_zero"] - r["loss_clean"]), abs=1e-12)
