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
