"""Metrics for sparse codes, reconstructions and token selections.

Functions take numpy arrays, scipy sparse matrices or torch tensors and return
Python floats (or small numpy arrays), so they can be used directly as
scikit-learn style scorers or logged during training.
"""

from __future__ import annotations

__all__: list[str] = []


# ======================================================================================
# Token selection (SparseTokenSelector, skdict.nn.SparseAttention)
#
# ``W`` is a selection: (n_queries, n_tokens) weights, CSR / dense / torch; its
# non-zeros are the selected tokens. ``scores`` are the dense attention scores
# (for example ``SparseTokenSelector.attention_scores(queries)``) whose softmax
# is the dense reference attention ``A``.
# ======================================================================================

import numpy as _np  # noqa: E402
import scipy.sparse as _sp  # noqa: E402
import torch  # noqa: E402


def _sel_csr(W):
    try:
        import torch

        if isinstance(W, torch.Tensor):
            W = W.detach().cpu()
            W = W.to_dense().numpy() if W.layout != torch.strided else W.numpy()
    except ImportError:  # pragma: no cover
        pass
    W = _sp.csr_matrix(W)
    W.eliminate_zeros()
    return W


def _sel_dense(a, name):
    try:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if _sp.issparse(a):
        a = a.toarray()
    a = _np.asarray(a, dtype=_np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}.")
    return a


def _softmax_rows(scores):
    s = _sel_dense(scores, "scores")
    s = s - s.max(axis=1, keepdims=True)
    e = _np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


def _check_pair(W, scores):
    if W.shape != scores.shape:
        raise ValueError(
            f"selection W has shape {W.shape} but scores have shape {scores.shape}; "
            "both must be (n_queries, n_tokens)."
        )


def realized_nnz(W):
    """Selected tokens per query: ``{"mean": float, "max": int, "min": int}``.

    Parameters
    ----------
    W : {sparse matrix, ndarray, torch.Tensor} of shape (n_queries, n_tokens)

    Examples
    --------
    >>> import numpy as np
    >>> from skdict.metrics import realized_nnz
    >>> realized_nnz(np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    {'mean': 1.5, 'max': 2, 'min': 1}
    """
    nnz = _sel_csr(W).getnnz(axis=1)
    if nnz.size == 0:
        return {"mean": 0.0, "max": 0, "min": 0}
    return {"mean": float(nnz.mean()), "max": int(nnz.max()), "min": int(nnz.min())}


def budget_adherence(W, budget):
    """Share of queries whose number of selected tokens is at most ``budget``.

    1.0 means the budget was never exceeded.
    """
    if budget is None or int(budget) < 0:
        raise ValueError(f"budget must be a non-negative int, got {budget!r}.")
    nnz = _sel_csr(W).getnnz(axis=1)
    if nnz.size == 0:
        return 1.0
    return float(_np.mean(nnz <= int(budget)))


def attention_mass_captured(W, scores, *, per_query=False):
    """Share of the dense softmax attention that falls on the selected tokens.

    ``sum_{j in support(W_i)} softmax(scores_i)_j``, averaged over queries
    (or per query). 1.0 means the selection holds all the attention mass.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict.metrics import attention_mass_captured
    >>> scores = np.log([[0.7, 0.2, 0.1]])
    >>> round(attention_mass_captured(np.array([[1.0, 0.0, 0.0]]), scores), 6)
    0.7
    """
    W = _sel_csr(W)
    A = _softmax_rows(scores)
    _check_pair(W, A)
    mass = _np.asarray(W.astype(bool).multiply(A).sum(axis=1)).ravel()
    return mass if per_query else float(mass.mean())


def recall_at_k(W, scores, k, *, per_query=False):
    """Share of the dense softmax top-``k`` tokens that the selection contains."""
    W = _sel_csr(W)
    S = _sel_dense(scores, "scores")
    _check_pair(W, S)
    k = int(k)
    if not 1 <= k <= S.shape[1]:
        raise ValueError(f"k must be in [1, {S.shape[1]}], got {k}.")
    top = _np.argpartition(-S, k - 1, axis=1)[:, :k]
    sel = W.astype(bool).toarray() if W.shape[1] * W.shape[0] <= 5e7 else None
    rec = _np.empty(S.shape[0])
    for i in range(S.shape[0]):
        if sel is not None:
            hit = sel[i, top[i]].sum()
        else:
            hit = _np.isin(top[i], W.indices[W.indptr[i] : W.indptr[i + 1]]).sum()
        rec[i] = hit / k
    return rec if per_query else float(rec.mean())


def output_fidelity(W, scores, values, *, per_query=False):
    """Relative error of the attended output: ``||W V - A V|| / ||A V||``.

    ``A = softmax(scores)`` is the dense attention. 0 is a perfect match (lower
    is better). By default the Frobenius norms over all queries; with
    ``per_query=True`` the per-row relative errors.
    """
    W = _sel_csr(W).astype(_np.float64)
    A = _softmax_rows(scores)
    _check_pair(W, A)
    V = _sel_dense(values, "values")
    if V.shape[0] != A.shape[1]:
        raise ValueError(
            f"values have {V.shape[0]} rows but there are {A.shape[1]} tokens."
        )
    AV = A @ V
    err = _np.asarray(W @ V) - AV
    if per_query:
        den = _np.linalg.norm(AV, axis=1)
        num = _np.linalg.norm(err, axis=1)
        return num / _np.maximum(den, _np.finfo(_np.float64).tiny)
    return float(_np.linalg.norm(err) / max(_np.linalg.norm(AV), _np.finfo(float).tiny))


__all__ += [
    "attention_mass_captured",
    "budget_adherence",
    "output_fidelity",
    "realized_nnz",
    "recall_at_k",
]


# ======================================================================================
# Reconstructions and codes of sparse autoencoders (KSparseAutoencoder)
#
# ``X`` and ``X_hat`` are (n_samples, n_features) data and reconstruction; ``codes``
# are (n_samples, n_components) codes, CSR / dense / torch. Sums are accumulated in
# float64.
# ======================================================================================


def _recon_pair(X, X_hat):
    X = _sel_dense(X, "X")
    X_hat = _sel_dense(X_hat, "X_hat")
    if X.shape != X_hat.shape:
        raise ValueError(
            f"X has shape {X.shape} but X_hat has shape {X_hat.shape}; they must match."
        )
    if X.shape[0] < 1:
        raise ValueError("X must have at least one row.")
    return X, X_hat


def fvu(X, X_hat):
    """Fraction of variance unexplained ``sum ||x - x_hat||^2 / sum ||x - x_bar||^2``.

    ``x_bar`` is the mean over all rows of ``X`` (not per batch), so the value
    does not depend on how rows were batched.

    Parameters
    ----------
    X, X_hat : array-like, sparse or torch.Tensor of shape (n_samples, n_features)

    Returns
    -------
    float
        0 for a perfect reconstruction, 1 for predicting the mean. ``inf`` when
        ``X`` has no variance and the reconstruction is not exact (0 if exact).

    Examples
    --------
    >>> import numpy as np
    >>> from skdict.metrics import fvu
    >>> X = np.array([[0.0, 1.0], [2.0, 3.0]])
    >>> fvu(X, X.mean(0, keepdims=True).repeat(2, 0))
    1.0
    """
    X, X_hat = _recon_pair(X, X_hat)
    rss = float(((X - X_hat) ** 2).sum())
    tv = float(((X - X.mean(0)) ** 2).sum())
    if tv == 0.0:
        return 0.0 if rss == 0.0 else float("inf")
    return rss / tv


def explained_variance(X, X_hat):
    """``1 - fvu(X, X_hat)`` (higher is better); see :func:`fvu`."""
    return 1.0 - fvu(X, X_hat)


def l0(codes):
    """Mean number of non-zeros per row of ``codes``."""
    C = _sel_csr(codes)
    if C.shape[0] < 1:
        raise ValueError("codes must have at least one row.")
    return float(C.nnz) / C.shape[0]


def dead_fraction(codes):
    """Fraction of latents (columns) that are never non-zero in ``codes``."""
    C = _sel_csr(codes)
    if C.shape[1] < 1:
        raise ValueError("codes must have at least one column.")
    used = _np.zeros(C.shape[1], dtype=bool)
    used[C.indices] = True
    return float(1.0 - used.mean())


def cosine_similarity(X, X_hat, eps=1e-12):
    """Mean cosine similarity between the rows of ``X`` and ``X_hat``."""
    X, X_hat = _recon_pair(X, X_hat)
    num = (X * X_hat).sum(1)
    den = _np.linalg.norm(X, axis=1) * _np.linalg.norm(X_hat, axis=1)
    return float((num / _np.maximum(den, eps)).mean())


def relative_reconstruction_bias(X, X_hat):
    """``E ||x_hat||^2 / E <x, x_hat>``: 1 when the reconstruction is unbiased in
    scale, below 1 when it shrinks (as L1 penalties do).

    The ratio is the argmin over ``gamma`` of ``E ||x - x_hat / gamma||^2``
    (Wright & Sharkey 2024).
    """
    X, X_hat = _recon_pair(X, X_hat)
    den = float((X * X_hat).sum())
    if den == 0.0:
        raise ValueError("E<x, x_hat> is zero; the bias is undefined.")
    return float((X_hat * X_hat).sum()) / den


__all__ += [
    "cosine_similarity",
    "dead_fraction",
    "explained_variance",
    "fvu",
    "l0",
    "relative_reconstruction_bias",
]


# ======================================================================================
# Downstream evaluation of a sparse autoencoder spliced into its model
# ======================================================================================

_EVAL_TEXTS = 128


def _reconstructor(sae):
    """``h -> reconstruction`` (torch in, torch out) of an estimator with
    ``transform`` / ``inverse_transform``, or the callable itself."""
    if hasattr(sae, "transform") and hasattr(sae, "inverse_transform"):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(sae)

        def fn(h):
            n_in = getattr(sae, "n_features_in_", h.shape[-1])
            if h.shape[-1] != n_in:
                raise ValueError(
                    f"the hooked module's hidden states have {h.shape[-1]} features but "
                    f"the autoencoder was fitted on {n_in}; hook the module it was "
                    "fitted on."
                )
            x = h.detach().float().cpu().numpy()
            x_hat = sae.inverse_transform(sae.transform(x))
            return torch.as_tensor(_np.asarray(x_hat), dtype=h.dtype, device=h.device)

        return fn
    if callable(sae):
        return sae
    raise ValueError(
        "sae must be a fitted autoencoder (with transform and inverse_transform) or a "
        f"callable mapping hidden states to reconstructions, got {type(sae).__name__}."
    )


def _pooled(out, mask):
    """Mean over the attended tokens of the model's last hidden state (the
    sentence embedding of mean-pooling models such as all-MiniLM-L6-v2)."""
    from .hooks import _hidden

    h = _hidden(out).float()
    m = mask.to(h.dtype)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def _token_losses(out, inputs):
    """Summed next-token cross entropy of each sequence and its token count."""
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError('output="loss" needs a model whose output has .logits (a causal '
                         "language model).")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    lp = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].to(lp.dtype)
    return (lp * m).sum(1), m.sum(1)


def spliced_evaluation(sae, texts=None, *, model=None, tokenizer=None, module=None,
                       layer=3, output="embedding", max_length=128, batch_size=32,
                       skip_special=True):
    """How much of a model's behaviour survives replacing one layer's hidden
    states by a sparse autoencoder's reconstruction.

    The model is run on ``texts`` four times: clean; with the hidden states of
    ``module`` replaced by ``sae``'s reconstruction (at every kept token); with
    them zeroed (zero ablation); and with them replaced by their mean over the
    kept tokens of ``texts`` (mean ablation). The later layers run on the
    replaced states. The degradation of a run is ``1 - cos`` between its
    sentence embeddings and the clean ones (``output="embedding"``: the mean of
    the last hidden state over the tokens, MiniLM's own pooling), or its
    increase in next-token cross entropy (``output="loss"``, for causal
    language models). The fraction recovered against an ablation is
    ``1 - degradation(sae) / degradation(ablation)``: 1 when splicing changes
    nothing, 0 when it is as harmful as the ablation (the analogue of SAELens'
    "CE loss recovered").

    With ``model=None`` the bundled all-MiniLM-L6-v2 is used
    (:func:`skdict.datasets.minilm_model`) at hidden state ``layer``, the
    convention of :func:`skdict.datasets.load_minilm_activations`, and ``texts``
    defaults to 128 texts of its corpus.

    Parameters
    ----------
    sae : fitted estimator or callable
        A fitted autoencoder (``transform`` then ``inverse_transform``, e.g.
        :class:`~skdict.KSparseAutoencoder`) trained on this module's hidden
        states, or a callable mapping a ``(n, hidden_size)`` tensor to its
        reconstruction.
    texts : list of str, default=None
    model : torch.nn.Module, default=None
        Any ``transformers`` encoder or decoder (see :mod:`skdict.hooks`); None
        means the bundled MiniLM.
    tokenizer : callable, default=None
        The model's tokenizer (required with ``model``).
    module : str or torch.nn.Module, default=None
        The submodule whose output is replaced (required with ``model``; for
        MiniLM, None means :func:`~skdict.datasets.minilm_module` ``(layer)``).
    layer : int, default=3
        MiniLM's hidden state, when ``model`` is None.
    output : {"embedding", "loss"}, default="embedding"
    max_length : int, default=128
    batch_size : int, default=32
    skip_special : bool, default=True
        Leave the special tokens (``[CLS]``, ``[SEP]``, ...) unreplaced, as the
        autoencoders of :func:`~skdict.datasets.load_minilm_activations` are not
        trained on them.

    Returns
    -------
    dict
        ``"fvu"``: the autoencoder's fraction of variance unexplained on the
        kept tokens; ``"recovered_zero"``, ``"recovered_mean"``: fractions
        recovered against zero and mean ablation; for ``"embedding"``:
        ``"cosine"``, ``"cosine_zero"``, ``"cosine_mean"`` (mean cosine
        similarity of the sentence embeddings to the clean ones); for
        ``"loss"``: ``"loss_clean"``, ``"loss"``, ``"loss_zero"``,
        ``"loss_mean"`` (mean next-token cross entropy per token);
        ``"n_texts"``, ``"n_tokens"`` (kept tokens).

    Examples
    --------
    >>> from skdict import KSparseAutoencoder
    >>> from skdict.datasets import load_minilm_activations
    >>> from skdict.metrics import spliced_evaluation
    >>> X = load_minilm_activations(4000, layer=3)
    >>> sae = KSparseAutoencoder(n_components=256, k=16, n_steps=30, batch_size=1000,
    ...                          random_state=0, device="cpu").fit(X)
    >>> texts = ["Sparse codes are cheap.", "Return the list of open file handles."]
    >>> r = spliced_evaluation(sae, texts, layer=3)
    >>> r["cosine_zero"] < r["cosine"] < 1.0
    True
    """
    from .hooks import _batches, _pad_id, get_module, splice_activations, tokenize

    if output not in ("embedding", "loss"):
        raise ValueError(f'output must be "embedding" or "loss", got {output!r}.')
    if model is None:
        from ._minilm import load_minilm_corpus, minilm_model, minilm_module

        model, default_tok = minilm_model()
        tokenizer = default_tok if tokenizer is None else tokenizer
        module = minilm_module(layer) if module is None else module
        if texts is None:
            corpus = load_minilm_corpus()
            pick = _np.random.default_rng(0).choice(len(corpus), _EVAL_TEXTS, replace=False)
            texts = [corpus[i] for i in sorted(pick)]
    elif tokenizer is None or module is None:
        raise ValueError("with a model, pass its tokenizer and the module to splice "
                         "(e.g. module='encoder.layer.2').")
    if texts is None:
        raise ValueError("pass the texts to evaluate on.")
    recon = _reconstructor(sae)
    mod = get_module(model, module)
    ids, keep = tokenize(tokenizer, texts, max_length=max_length, skip_special=skip_special)
    if not ids:
        raise ValueError("texts is empty.")
    from .hooks import _check_int, _model_device

    batch_size = _check_int(batch_size, "batch_size")
    device = _model_device(model)
    batches = list(_batches(ids, batch_size, _pad_id(tokenizer, model), device))
    keep_masks = []
    for idx, inputs in batches:
        km = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
        for r, i in enumerate(idx):
            km[r, :len(ids[i])] = torch.as_tensor(keep[i])
        keep_masks.append(km)

    def measure(inputs, out):
        if output == "embedding":
            return _pooled(out, inputs["attention_mask"])
        return _token_losses(out, inputs)

    was_training = model.training
    model.eval()
    clean, stats = [], {"n": 0, "s1": None, "s2": 0.0, "rss": 0.0}
    runs = {"sae": [], "zero": [], "mean": []}
    try:
        with torch.inference_mode():
            # clean run and the SAE run, recording the hidden states they see
            def record(h):
                h64 = h.double()
                stats["n"] += h.shape[0]
                s1 = h64.sum(0)
                stats["s1"] = s1 if stats["s1"] is None else stats["s1"] + s1
                stats["s2"] += float((h64 ** 2).sum())
                return h

            for (_, inputs), km in zip(batches, keep_masks, strict=True):
                with splice_activations(model, mod, record) as set_keep:
                    set_keep(km)
                    clean.append(measure(inputs, model(**inputs)))

            def through_sae(h):
                r = recon(h)
                stats["rss"] += float(((h.double() - r.double()) ** 2).sum())
                return r

            if stats["n"] == 0:
                raise ValueError("no token to replace: every token is special or masked.")
            mean = (stats["s1"] / stats["n"]).to(torch.float32)
            fns = {"sae": through_sae, "zero": torch.zeros_like,
                   "mean": lambda h: mean.to(h.device, h.dtype).expand_as(h)}
            for name, fn in fns.items():
                with splice_activations(model, mod, fn) as set_keep:
                    for (_, inputs), km in zip(batches, keep_masks, strict=True):
                        set_keep(km)
                        runs[name].append(measure(inputs, model(**inputs)))
    finally:
        model.train(was_training)

    n = stats["n"]
    tv = stats["s2"] - float(stats["s1"] @ stats["s1"]) / n
    res = {"fvu": stats["rss"] / tv if tv > 0 else float("inf")}
    if output == "embedding":
        ref = torch.cat(clean)
        cos = {name: float(torch.nn.functional.cosine_similarity(
            torch.cat(v).double(), ref.double(), dim=1).mean()) for name, v in runs.items()}
        deg = {name: 1.0 - c for name, c in cos.items()}
        res.update(cosine=cos["sae"], cosine_zero=cos["zero"], cosine_mean=cos["mean"])
    else:
        def loss(parts):
            return float(sum(p[0].double().sum() for p in parts)
                         / sum(p[1].double().sum() for p in parts))

        l_clean = loss(clean)
        ls = {name: loss(v) for name, v in runs.items()}
        deg = {name: v - l_clean for name, v in ls.items()}
        res.update(loss_clean=l_clean, loss=ls["sae"], loss_zero=ls["zero"],
                   loss_mean=ls["mean"])
    for abl in ("zero", "mean"):
        res[f"recovered_{abl}"] = (1.0 - deg["sae"] / deg[abl]) if deg[abl] != 0 else (
            float("nan"))
    res.update(n_texts=len(ids), n_tokens=int(n))
    return res


__all__ += ["spliced_evaluation"]
