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
