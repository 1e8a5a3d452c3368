"""Sparse attention: budgeted selection of keys instead of a dense softmax.

* :func:`sparse_weights` -- attention weights from scores by ``"topk"``
  (softmax over the ``k`` best), ``"threshold"`` (soft threshold at
  ``alpha * mean|s|``, renormalised) or ``"sparsemax"`` (projection onto the
  simplex), with an optional budget of ``k`` keys per query.
* :func:`sparse_attention` -- the functional form, with the calling convention
  of :func:`torch.nn.functional.scaled_dot_product_attention`. ``method="block"``
  is block-sparse attention: each block of queries scores the mean-pooled key
  blocks, keeps the best ones within the budget and attends exactly inside them
  (never a dense ``L x S`` block; :func:`block_select`).
* :class:`SparseAttention` -- a drop-in for :class:`torch.nn.MultiheadAttention`
  (same parameter names, so ``load_state_dict`` of a trained MHA works).
* :func:`hierarchical_select` -- coarse-to-fine selection (regions -> patches ->
  tokens) that scores only the children of selected parents, with
  :func:`mean_pool_levels` to build the levels from token embeddings.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..solvers.simplex import (
    adaptive_lambda,
    sparsemax,
    threshold_weights,
    topk_softmax,
)

__all__ = [
    "METHODS",
    "budget_size",
    "sparse_weights",
    "sparse_attention",
    "SparseAttention",
    "block_select",
    "HierarchicalSelection",
    "hierarchical_select",
    "mean_pool_levels",
]

METHODS = ("topk", "threshold", "sparsemax")
# sparse_attention / SparseAttention also take "block" (a selection of key
# blocks, not a weight function of the scores)
ATTENTION_METHODS = METHODS + ("block",)


def budget_size(n, keep_ratio=None, max_tokens=None):
    """Keys kept per query out of ``n``: ``min(ceil(keep_ratio * n), max_tokens)``.

    None when neither is given (no cap). Always between 1 and ``n``.
    """
    k = None
    if keep_ratio is not None:
        if not (0 < float(keep_ratio) <= 1):
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}.")
        k = max(1, math.ceil(float(keep_ratio) * n - 1e-9))
    if max_tokens is not None:
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
        k = int(max_tokens) if k is None else min(k, int(max_tokens))
    if k is not None:
        k = min(k, n)
    return k


def _check_method(method, methods=METHODS):
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}.")


def _check_count(value, name, upper=None, what=""):
    """A count parameter: None, or an integer in ``[1, upper]`` (never clipped)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if value < 1 or (upper is not None and value > upper):
        bound = f"in [1, {upper}] ({upper} {what})" if upper is not None else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}.")


def _check_qkv(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape (..., length, dim), got {shape}.")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same last dimension, got "
                         f"{query.shape[-1]} and {key.shape[-1]}.")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same length (dimension -2), got "
                         f"{key.shape[-2]} and {value.shape[-2]}.")


def candidate_weights(vals, method, *, alpha=1.0, lam=None, empty="argmax"):
    """Weights over candidate scores ``vals`` (``-inf`` = padding / masked).

    For ``"threshold"``, ``lam`` is the threshold computed over the full row
    (the candidates may be only its top-k).
    """
    if method == "topk":
        return topk_softmax(vals)
    if method == "sparsemax":
        return sparsemax(vals)
    if method == "threshold":
        return threshold_weights(vals, alpha, lam=lam, empty=empty)
    _check_method(method)


def sparse_weights(scores, method="topk", *, alpha=1.0, k=None, empty="argmax"):
    """Sparse attention weights along the last dim of ``scores``.

    Parameters
    ----------
    scores : Tensor (..., S)
        Scaled scores; ``-inf`` marks keys a query may not attend to.
    method : {"topk", "threshold", "sparsemax"}
        ``"topk"``: softmax over the ``k`` best scores (``k=None``: all, which is
        the dense softmax). ``"threshold"``: ``max(s - alpha * mean|s|, 0)``
        renormalised (mean over the allowed keys of the full row), restricted
        to the ``k`` best when ``k`` is given. ``"sparsemax"``: projection onto
        the simplex (of the ``k`` best scores when ``k`` is given; identical to
        the full sparsemax whenever its support has at most ``k`` keys).
    alpha : float
        Threshold multiplier for ``"threshold"``.
    k : int or None
        Budget: at most ``k`` non-zeros per row, ``1 <= k <= S`` (out-of-range
        values raise ``ValueError``; nothing is clipped).
    empty : {"argmax", "zero"}
        What ``"threshold"`` does with a row where nothing passes the threshold.

    Returns
    -------
    Tensor of the shape of ``scores``: non-negative, each row sums to one (or
    is zero when all its keys are masked), at most ``k`` non-zeros per row.
    """
    _check_method(method)
    n = scores.shape[-1]
    _check_count(k, "k", n, "keys (the last dimension of scores)")
    lam = adaptive_lambda(scores, alpha) if method == "threshold" else None
    if k is None or k >= n:
        return candidate_weights(scores, method, alpha=alpha, lam=lam, empty=empty)
    vals, idx = torch.topk(scores, int(k), dim=-1)
    w = candidate_weights(vals, method, alpha=alpha, lam=lam, empty=empty)
    return torch.zeros_like(scores).scatter(-1, idx, w)


# key blocks per query at least (block_size shrinks for small budgets)
MIN_BLOCKS = 4
# "auto" preselection: candidates per budget key, and the shortest key sequence
PRESELECT_FACTOR = 2
PRESELECT_MIN_KEYS = 4096


def _preselect_size(method, k, S, preselect):
    """Candidate keys per query of the block path, or None for dense scoring."""
    if method == "block":
        return S if k is None else k
    if k is None or method == "threshold" or preselect is None:
        return None
    if preselect == "auto":
        if S < PRESELECT_MIN_KEYS or PRESELECT_FACTOR * k > S // 2:
            return None
        return PRESELECT_FACTOR * k
    if isinstance(preselect, str) or not float(preselect) >= 1:
        raise ValueError(f"preselect must be a number >= 1, 'auto' or None, got {preselect!r}.")
    m = math.ceil(float(preselect) * k)
    return None if m >= S else m


def sparse_attention(
    query,
    key,
    value,
    attn_mask=None,
    *,
    method="topk",
    alpha=1.0,
    keep_ratio=None,
    max_tokens=None,
    is_causal=False,
    scale=None,
    empty="argmax",
    chunk_size=None,
    need_weights=False,
    block_size=64,
    preselect="auto",
):
    """Attention with sparse weights, called like ``F.scaled_dot_product_attention``.

    Parameters
    ----------
    query : Tensor (..., L, E)
    key : Tensor (..., S, E)
    value : Tensor (..., S, Ev)
    attn_mask : Tensor, optional
        Broadcastable to ``(..., L, S)``. Boolean: True where a query may attend
        (the convention of ``scaled_dot_product_attention``); float: added to
        the scores.
    method : {"topk", "threshold", "sparsemax", "block"}
        A weight function of the scores (see :func:`sparse_weights`), or
        ``"block"``: block-sparse attention. Queries and keys are cut into
        contiguous blocks of ``block_size``; each query block scores the
        mean-pooled key blocks (:func:`block_select`), keeps the
        ``floor(k / block_size)`` best and attends with an exact softmax over
        every allowed key inside them (a gather and a batched matmul: the
        scores of one chunk are ``(block_size, kept keys)`` per query block,
        never ``L x S``). With a budget below ``4 * block_size`` the blocks
        shrink to ``floor(k / 4)`` keys (at least 4 blocks per query). Under
        ``is_causal`` the diagonal block is always kept.
        No budget keeps every block: dense softmax attention.
    alpha, empty
        See :func:`sparse_weights`.
    keep_ratio, max_tokens
        The budget: at most ``min(ceil(keep_ratio * S), max_tokens)`` keys per
        query (None and None: no cap; ``"topk"`` then equals dense softmax).
    is_causal : bool
        Query ``i`` attends to keys ``j <= i`` (top-left aligned, as in
        ``scaled_dot_product_attention``).
    scale : float, optional
        Score scale; default ``1 / sqrt(E)``.
    chunk_size : int, optional
        Queries processed at a time (bounds the dense ``(..., chunk, S)`` score
        block); default keeps the block near 64 MB.
    need_weights : bool
        Also return the dense (sparse-valued) weights in ``info["weights"]``.
    block_size : int, default=64
        Block length of ``"block"`` and of the preselection.
    preselect : float, "auto" or None, default="auto"
        For ``"topk"`` and ``"sparsemax"`` with a budget ``k``: score only the
        keys of the best key blocks, ``preselect * k`` keys per query
        (:func:`block_select`), and take the top ``k`` among them, instead of
        scoring every key and selecting from all ``S``. The result is the exact
        per-query selection whenever the ``k`` best keys lie in the preselected
        blocks (always when ``preselect * k >= S``). ``"auto"`` preselects
        ``2 k`` keys when that is at most half of ``S`` and ``S >= 4096``, where
        dense scoring and a length-``S`` top-k cost more than the attention
        itself; None always scores every key.

    Returns
    -------
    output : Tensor (..., L, Ev)
        Rows of fully masked queries are zero (dense softmax would give NaN).
    info : dict
        ``nnz_mean`` / ``nnz_max`` (keys per query), ``density`` (kept keys over
        allowed keys), ``sparsity`` (``1 - density``), ``budget`` (k or None).

    Examples
    --------
    >>> import torch
    >>> from skdict.nn import sparse_attention
    >>> q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    >>> out, info = sparse_attention(q, k, v, method="block", keep_ratio=0.25,
    ...                              block_size=16, is_causal=True)
    >>> out.shape, info["budget"], info["nnz_max"] <= 64
    (torch.Size([1, 2, 256, 16]), 64, True)
    """
    _check_method(method, ATTENTION_METHODS)
    _check_qkv(query, key, value)
    _check_count(chunk_size, "chunk_size")
    L, E = query.shape[-2], query.shape[-1]
    S = key.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    k = budget_size(S, keep_ratio, max_tokens)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(query.dtype)
    if attn_mask is not None and attn_mask.dim() == 1:
        attn_mask = attn_mask[None, :]  # one mask over the keys, for every query (as SDPA)
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    candidates = _preselect_size(method, k, S, preselect)
    if candidates is not None:
        return _block_attention(
            query, key, value, attn_mask, k=k, block_size=block_size, is_causal=is_causal,
            scale=scale, method=method, alpha=alpha, empty=empty, candidates=candidates,
            chunk_size=chunk_size, need_weights=need_weights,
        )
    batch_numel = max(1, math.prod(query.shape[:-2]))
    if chunk_size is None:
        chunk_size = max(1, (16 * 2**20) // max(1, batch_numel * S))
    kT = key.transpose(-2, -1)
    outs, weights = [], []
    nnz_sum = torch.zeros((), dtype=torch.float64)
    allowed_sum = torch.zeros((), dtype=torch.float64)
    nnz_max = 0
    for c0 in range(0, L, chunk_size):
        c1 = min(L, c0 + chunk_size)
        s = (query[..., c0:c1, :] @ kT) * scale
        allowed = None
        if attn_mask is not None:
            m = attn_mask[..., c0:c1, :] if attn_mask.shape[-2] == L else attn_mask
            if m.dtype == torch.bool:
                allowed = m
            else:
                s = s + m
        if is_causal:
            rows = torch.arange(c0, c1, device=query.device)[:, None]
            causal = torch.arange(S, device=query.device)[None, :] <= rows
            allowed = causal if allowed is None else (allowed & causal)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        with torch.no_grad():
            allowed_sum += torch.isfinite(s).sum().double().cpu()
        if method == "topk":  # s is this chunk's own: the weights may overwrite it
            w = _topk_weights(s, k, inplace=True)
        else:
            w = sparse_weights(s, method, alpha=alpha, k=k, empty=empty)
        outs.append(w @ value)
        with torch.no_grad():
            nz = (w != 0).sum(-1)
            nnz_sum += nz.sum().double().cpu()
            nnz_max = max(nnz_max, int(nz.max()) if nz.numel() else 0)
        if need_weights:
            weights.append(w)
    if not outs:  # no queries: an empty output of the right shape
        out = query.new_zeros((*torch.broadcast_shapes(query.shape[:-2], value.shape[:-2]), 0,
                               value.shape[-1]))
        weights = [out.new_zeros((*out.shape[:-1], S))]
    else:
        out = torch.cat(outs, dim=-2)
    n_rows = max(1, out[..., 0].numel())
    density = float(nnz_sum / allowed_sum) if float(allowed_sum) > 0 else 0.0
    info = {
        "nnz_mean": float(nnz_sum) / n_rows,
        "nnz_max": nnz_max,
        "density": density,
        "sparsity": 1.0 - density,
        "budget": k,
    }
    if need_weights:
        info["weights"] = torch.cat(weights, dim=-2)
    return out, info


class SparseAttention(nn.Module):
    """Multi-head attention whose weights are sparse: a drop-in for
    :class:`torch.nn.MultiheadAttention`.

    The projections have the names and shapes of ``nn.MultiheadAttention``
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj``; ``kdim = vdim =
    embed_dim``), so a trained MHA's ``state_dict`` loads as is. Each head's
    softmax is replaced by :func:`sparse_weights`.

    Parameters
    ----------
    embed_dim : int
    num_heads : int
        ``embed_dim`` must be divisible by ``num_heads``.
    method : {"topk", "threshold", "sparsemax", "block"}, default="topk"
        See :func:`sparse_weights`; ``"block"``: block-sparse attention (each
        block of ``block_size`` queries attends exactly to its best key blocks
        within the budget; see :func:`sparse_attention`). All are
        differentiable almost everywhere (through the kept scores).
    alpha : float, default=1.0
        Threshold multiplier for ``"threshold"`` (``lambda = alpha * mean|s|``).
    keep_ratio : float in (0, 1], default=None
        Budget as a share of the keys: ``ceil(keep_ratio * S)`` per query.
    max_tokens : int, default=None
        Budget as a count. With both None there is no cap (``"topk"`` is then
        exactly dense softmax attention).
    bias : bool, default=True
    batch_first : bool, default=True
        Inputs are ``(batch, seq, feature)``; False: ``(seq, batch, feature)``.
    scale : float, default=None
        Score scale; None is ``1 / sqrt(head_dim)`` as in MHA.
    empty : {"argmax", "zero"}, default="argmax"
        Rows the threshold leaves empty: all weight on the best key, or zero.
    chunk_size : int, default=None
        Queries per score block (memory bound); see :func:`sparse_attention`.
    block_size : int, default=64
        Block length of ``"block"`` and of the preselection.
    preselect : float, "auto" or None, default="auto"
        Key preselection of ``"topk"`` / ``"sparsemax"`` on long sequences; see
        :func:`sparse_attention`.
    device, dtype : optional
        Factory arguments for the parameters.

    Examples
    --------
    >>> import torch
    >>> from skdict.nn import SparseAttention
    >>> attn = SparseAttention(16, 2, method="topk", keep_ratio=0.25)
    >>> x = torch.randn(2, 8, 16)
    >>> out, info = attn(x, is_causal=True)
    >>> out.shape, info["nnz_max"] <= 2
    (torch.Size([2, 8, 16]), True)
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        method="topk",
        *,
        alpha=1.0,
        keep_ratio=None,
        max_tokens=None,
        bias=True,
        batch_first=True,
        scale=None,
        empty="argmax",
        chunk_size=None,
        block_size=64,
        preselect="auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_method(method, ATTENTION_METHODS)
        if int(block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        _check_count(embed_dim, "embed_dim")
        _check_count(num_heads, "num_heads")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}."
            )
        budget_size(1, keep_ratio, max_tokens)  # validates the budget
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.method = method
        self.alpha = alpha
        self.keep_ratio = keep_ratio
        self.max_tokens = max_tokens
        self.batch_first = batch_first
        self.scale = scale
        self.empty = empty
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.preselect = preselect
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self):
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"method={self.method!r}, alpha={self.alpha}, keep_ratio={self.keep_ratio}, "
            f"max_tokens={self.max_tokens}"
        )

    def forward(
        self,
        query,
        key=None,
        value=None,
        key_padding_mask=None,
        need_weights=False,
        attn_mask=None,
        is_causal=False,
    ):
        """Attend.

        Parameters
        ----------
        query : Tensor (B, L, E) (``(L, B, E)`` if not batch_first)
        key, value : Tensor (B, S, E), optional
            Default to ``query`` (self-attention).
        key_padding_mask : BoolTensor (B, S), optional
            True marks padding keys to ignore (MHA convention).
        need_weights : bool
            Put the head-averaged weights ``(B, L, S)`` in ``info["weights"]``.
        attn_mask : Tensor (L, S) or (B * num_heads, L, S), optional
            Boolean: True where attention is NOT allowed (MHA convention);
            float: added to the scores.
        is_causal : bool
            Causal mask (query ``i`` sees keys ``j <= i``); no ``attn_mask``
            needed.

        Returns
        -------
        output : Tensor of the shape of ``query``
        info : dict
            Achieved sparsity: see :func:`sparse_attention`.
        """
        if key is None:
            key = query
        if value is None:
            value = key
        if query.dim() == 2:  # unbatched (L, E), as nn.MultiheadAttention accepts
            if key.dim() != 2 or value.dim() != 2:
                raise ValueError("an unbatched (2-D) query needs 2-D key and value.")
            kpm = None if key_padding_mask is None else key_padding_mask[None]
            out, info = self.forward(
                query[:, None] if not self.batch_first else query[None],
                key[:, None] if not self.batch_first else key[None],
                value[:, None] if not self.batch_first else value[None],
                key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask,
                is_causal=is_causal,
            )
            if need_weights:
                info["weights"] = info["weights"][0]
            return (out[:, 0] if not self.batch_first else out[0]), info
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{name} must have shape (batch, length, {self.embed_dim}) "
                    f"(or (length, {self.embed_dim}) unbatched), got {tuple(t.shape)}."
                )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, E = query.shape
        S = key.shape[1]
        H, dh = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        else:
            b_q = b_k = b_v = None
        q = nn.functional.linear(query, w_q, b_q).view(B, L, H, dh).transpose(1, 2)
        k = nn.functional.linear(key, w_k, b_k).view(B, S, H, dh).transpose(1, 2)
        v = nn.functional.linear(value, w_v, b_v).view(B, S, H, dh).transpose(1, 2)
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise ValueError("key_padding_mask must be a boolean tensor (True = pad).")
            if tuple(key_padding_mask.shape) != (B, S):
                raise ValueError(
                    f"key_padding_mask must have shape {(B, S)}, got "
                    f"{tuple(key_padding_mask.shape)}."
                )
            mask = (~key_padding_mask)[:, None, None, :]
        if attn_mask is not None:
            am = attn_mask
            if am.dim() == 3:
                am = am.view(B, H, L, S)
            if am.dtype == torch.bool:
                am = ~am
                mask = am if mask is None else (mask & am)
            elif mask is not None:
                pad = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
                mask = pad.masked_fill(~mask, float("-inf")) + am
            else:
                mask = am
        out, info = sparse_attention(
            q, k, v, mask,
            method=self.method, alpha=self.alpha, keep_ratio=self.keep_ratio,
            max_tokens=self.max_tokens, is_causal=is_causal, scale=self.scale,
            empty=self.empty, chunk_size=self.chunk_size, need_weights=need_weights,
            block_size=self.block_size, preselect=self.preselect,
        )
        out = out.transpose(1, 2).reshape(B, L, E)
        out = self.out_proj(out)
        if need_weights:
            info["weights"] = info["weights"].mean(1)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, info


# --------------------------------------------------------------------------------------
# block-sparse attention
# --------------------------------------------------------------------------------------


def _pad_to(t, n, dim, value=0.0):
    extra = n - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [0, extra]
    return torch.nn.functional.pad(t, pad, value=value)


def block_select(query, key, n_blocks, block_size, *, is_causal=False, key_valid=None,
                 block_allowed=None, scale=None):
    """The best key blocks of every query block, from mean-pooled summaries.

    Queries and keys are cut into contiguous blocks of ``block_size``; a query
    block scores each key block by ``<mean of its queries, mean of the key
    block's valid keys>`` and keeps the ``n_blocks`` best allowed ones. With
    ``is_causal`` a key block is allowed when its first key is visible to the
    block's last query, and the diagonal block (the queries' own positions) is
    always kept.

    Parameters
    ----------
    query : Tensor (B, L, E)
    key : Tensor (B, S, E)
    n_blocks : int
        Key blocks kept per query block.
    block_size : int
    is_causal : bool
    key_valid : BoolTensor (B or 1, S), optional
        False marks keys no query may attend (padding).
    block_allowed : BoolTensor (B or 1, n_query_blocks, n_key_blocks), optional
        False marks block pairs with no allowed (query, key) pair.
    scale : float, optional
        Only scales the returned block scores.

    Returns
    -------
    blocks : LongTensor (B, n_query_blocks, n_blocks)
        Key-block indices, best first.
    ok : BoolTensor (B, n_query_blocks, n_blocks)
        False on slots with no allowed block (fewer than ``n_blocks`` exist).
    scores : Tensor (B, n_query_blocks, n_key_blocks)
        The block scores (``-inf`` where not allowed; ``+inf`` on forced blocks).

    Examples
    --------
    >>> import torch
    >>> from skdict.nn import block_select
    >>> q, k = torch.randn(1, 64, 8), torch.randn(1, 64, 8)
    >>> blocks, ok, scores = block_select(q, k, 2, 16, is_causal=True)
    >>> blocks.shape, bool((blocks[0, :, 0] == torch.arange(4)).all())  # diagonal first
    (torch.Size([1, 4, 2]), True)
    >>> ok[0, 0].tolist()  # the first query block sees only its own key block
    [True, False]
    """
    B, L, E = query.shape
    S = key.shape[1]
    bs = int(block_size)
    nq, nk = -(-L // bs), -(-S // bs)
    with torch.no_grad():
        qsum = _pad_to(query.detach(), nq * bs, 1).view(B, nq, bs, E).sum(2)
        qcnt = torch.full((nq,), float(bs), dtype=query.dtype, device=query.device)
        qcnt[-1] = L - (nq - 1) * bs
        qbar = qsum / qcnt[:, None]
        kd = key.detach()
        if key_valid is None:
            kv = torch.ones((1, S), dtype=torch.bool, device=key.device)
        else:
            kv = key_valid
            kd = kd * kv[..., None].to(kd.dtype)
        kvp = _pad_to(kv, nk * bs, 1, value=False).view(kv.shape[0], nk, bs)
        kcnt = kvp.sum(2)  # (B or 1, nk)
        ksum = _pad_to(kd, nk * bs, 1).view(B, nk, bs, E).sum(2)
        kbar = ksum / kcnt.clamp(min=1).to(ksum.dtype)[..., None]
        scores = qbar @ kbar.transpose(1, 2)
        if scale is not None:
            scores = scores * scale
        allowed = (kcnt > 0)[:, None, :]
        if is_causal:
            last_q = torch.clamp(torch.arange(1, nq + 1, device=query.device) * bs, max=L) - 1
            first_k = torch.arange(nk, device=query.device) * bs
            allowed = allowed & (first_k[None, :] <= last_q[:, None])[None]
        if block_allowed is not None:
            allowed = allowed & block_allowed
        scores = scores.masked_fill(~allowed, float("-inf"))
        if is_causal:
            d = torch.arange(min(nq, nk), device=query.device)
            diag = torch.zeros(allowed.shape[-2:], dtype=torch.bool, device=query.device)
            diag[d, d] = True
            scores = scores.masked_fill(diag & allowed, float("inf"))
        vals, blocks = scores.topk(min(int(n_blocks), nk), dim=-1)
        ok = vals > float("-inf")
    return blocks, ok, scores


def _gather_blocks(t, bidx, idx):
    """``t[b, idx[b]]`` for a per-batch ``t`` of leading size B or 1."""
    return t[bidx, idx] if t.shape[0] > 1 else t[0][idx]


def _mask_parts(attn_mask, batch_shape, L, S):
    """Split a mask broadcastable to ``(*batch, L, S)`` into a key mask
    ``(B or 1, S)`` (when it has no query dimension) or a full ``(B or 1, L, S)``
    one, batch flattened."""
    if attn_mask is None:
        return None, None
    m = attn_mask
    while m.dim() < len(batch_shape) + 2:
        m = m[None]
    single = all(d == 1 for d in m.shape[:-2])
    if m.shape[-2] == 1:
        m = m[..., 0, :].expand(*m.shape[:-2], S)
        m = m.reshape(1, S) if single else m.expand(*batch_shape, S).reshape(-1, S)
        return m, None
    m = m.expand(*m.shape[:-2], L, S)
    m = m.reshape(1, L, S) if single else m.expand(*batch_shape, L, S).reshape(-1, L, S)
    return None, m


def _block_attention(query, key, value, attn_mask, *, k, block_size, is_causal, scale,
                     method, alpha, empty, candidates, chunk_size, need_weights):
    """Attention restricted to the selected key blocks of each query block.

    ``method="block"``: exact softmax over every allowed key of the kept blocks
    (``candidates`` keys per query at most). Otherwise the kept blocks are the
    candidates of ``sparse_weights(..., method, k=k)``.
    """
    batch_shape = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    L, E = query.shape[-2:]
    S, Ev = key.shape[-2], value.shape[-1]
    q = query.expand(*batch_shape, L, E).reshape(-1, L, E)
    kk = key.expand(*batch_shape, S, E).reshape(-1, S, E)
    v = value.expand(*batch_shape, S, Ev).reshape(-1, S, Ev)
    B = q.shape[0]
    dev = q.device
    key_mask, full_mask = _mask_parts(attn_mask, batch_shape, L, S)
    key_valid = key_add = full_valid = full_add = None
    if key_mask is not None:
        if key_mask.dtype == torch.bool:
            key_valid = key_mask
        else:
            key_add = key_mask.to(q.dtype)
            key_valid = key_add > float("-inf")
    if full_mask is not None:
        if full_mask.dtype == torch.bool:
            full_valid = full_mask
        else:
            full_add = full_mask.to(q.dtype)
            full_valid = full_add > float("-inf")
    # blocks shrink so that at least MIN_BLOCKS of them fit in the budget
    bs = max(1, min(int(block_size), int(candidates) // MIN_BLOCKS or 1))
    nq, nk = -(-L // bs), -(-S // bs)
    n_blocks = nk if int(candidates) >= S else max(1, int(candidates) // bs)
    block_allowed = None
    if full_valid is not None:
        fv = _pad_to(_pad_to(full_valid, nq * bs, 1, value=False), nk * bs, 2, value=False)
        block_allowed = fv.view(fv.shape[0], nq, bs, nk, bs).any(4).any(2)
    blocks, ok, _ = block_select(q, kk, n_blocks, bs, is_causal=is_causal,
                                 key_valid=key_valid, block_allowed=block_allowed)
    nb = blocks.shape[-1]
    M = nb * bs
    qb = _pad_to(q * scale, nq * bs, 1).view(B, nq, bs, E)
    kb = _pad_to(kk, nk * bs, 1).reshape(B * nk, bs * E)
    vb = _pad_to(v, nk * bs, 1).reshape(B * nk, bs * Ev)
    flat = blocks + torch.arange(B, device=dev)[:, None, None] * nk  # rows of kb / vb
    kv_pad = None
    if key_valid is not None or S % bs:
        base = key_valid if key_valid is not None else torch.ones((1, S), dtype=torch.bool,
                                                                   device=dev)
        kv_pad = _pad_to(base, nk * bs, 1, value=False).view(base.shape[0], nk, bs)
    kadd_pad = None
    if key_add is not None:
        kadd_pad = _pad_to(key_add.masked_fill(~key_valid, 0), nk * bs, 1).view(-1, nk, bs)
    fmask = None
    if full_mask is not None:
        src = full_add if full_add is not None else full_valid
        fill = float("-inf") if full_add is not None else False
        fm = _pad_to(_pad_to(src, nq * bs, 1, value=fill), nk * bs, 2, value=fill)
        fmask = fm.view(fm.shape[0], nq, bs, nk, bs).transpose(2, 3)  # (Bm, nq, nk, bs, bs)
    slots_ok = bool(ok.all())
    may_be_empty = key_valid is not None or full_valid is not None or not slots_ok
    if chunk_size is None:
        # ~8 M score entries per chunk of query blocks
        chunk_size = max(1, (8 * 2**20) // max(1, B * bs * M))
    else:
        chunk_size = max(1, int(chunk_size) // bs)
    bidx = torch.arange(B, device=dev)[:, None, None]
    offs = torch.arange(bs, device=dev)
    outs, wts = [], []
    nnz_sum = torch.zeros((), dtype=torch.float64)
    nnz_max = 0
    for c0 in range(0, nq, chunk_size):
        c1 = min(nq, c0 + chunk_size)
        c = c1 - c0
        idx = blocks[:, c0:c1]  # (B, c, nb)
        fi = flat[:, c0:c1].reshape(-1)
        Kg = kb.index_select(0, fi).view(B, c, M, E)
        Vg = vb.index_select(0, fi).view(B, c, M, Ev)
        s = qb[:, c0:c1] @ Kg.transpose(-1, -2)  # (B, c, bs, M)
        valid = None
        if not slots_ok:
            valid = ok[:, c0:c1, :, None].expand(B, c, nb, bs).reshape(B, c, 1, M)
        if kv_pad is not None:
            kvb = _gather_blocks(kv_pad, bidx, idx).reshape(B, c, 1, M)
            valid = kvb if valid is None else valid & kvb
        if is_causal:
            kpos = (idx[..., None] * bs + offs).reshape(B, c, 1, M)
            qpos = (torch.arange(c0, c1, device=dev)[:, None] * bs + offs)[None, :, :, None]
            cv = kpos <= qpos
            valid = cv if valid is None else valid & cv
        if kadd_pad is not None:
            s = s + _gather_blocks(kadd_pad, bidx, idx).reshape(B, c, 1, M)
        if fmask is not None:
            qi = torch.arange(c0, c1, device=dev)[None, :, None]
            fb = fmask[bidx, qi, idx] if fmask.shape[0] > 1 else fmask[0][qi[0], idx]
            fb = fb.transpose(2, 3).reshape(B, c, bs, M)  # (B, c, bs_q, nb * bs_k)
            if full_add is not None:
                s = s + fb
                fb = fb > float("-inf")
            valid = fb if valid is None else valid & fb
        if valid is not None:
            s = s.masked_fill(~valid, float("-inf"))
        if method == "block":
            if may_be_empty:
                any_valid = (s > float("-inf")).any(-1, keepdim=True)
                s = s.masked_fill(~any_valid, 0.0)
                w = torch.softmax(s, dim=-1) * any_valid.to(s.dtype)
            else:
                w = torch.softmax(s, dim=-1)
        elif method == "topk":
            w = _topk_weights(s, k, inplace=True)
        else:
            w = sparse_weights(s, method, alpha=alpha, k=k, empty=empty)
        outs.append((w @ Vg).view(B, c * bs, Ev))
        with torch.no_grad():  # keys attended per query (counted on the masks, not on w)
            if method == "sparsemax":
                nz = (w != 0).sum(-1).reshape(B, c * bs)
            elif valid is None:
                nz = torch.full((B, c * bs), M, dtype=torch.long, device=dev)
            else:
                nz = valid.sum(-1, dtype=torch.int32).expand(B, c, bs).reshape(B, c * bs)
            if method != "block":
                nz = nz.clamp(max=k)
            nz = nz[:, : max(0, min(L - c0 * bs, c * bs))]
            nnz_sum += nz.sum().double().cpu()
            nnz_max = max(nnz_max, int(nz.max()) if nz.numel() else 0)
        if need_weights:
            dense = torch.zeros(B, c, bs, nk * bs, dtype=w.dtype, device=dev)
            cols = (idx[..., None] * bs + offs).reshape(B, c, 1, M).expand(B, c, bs, M)
            dense = dense.scatter_add(-1, cols, w)
            wts.append(dense.view(B, c * bs, nk * bs)[..., :S])
    out = torch.cat(outs, dim=1)[:, :L].reshape(*batch_shape, L, Ev)
    allowed_sum = _allowed_count(L, S, is_causal, key_valid, full_valid, B)
    density = float(nnz_sum / allowed_sum) if allowed_sum > 0 else 0.0
    info = {
        "nnz_mean": float(nnz_sum) / max(1, B * L),
        "nnz_max": nnz_max,
        "density": density,
        "sparsity": 1.0 - density,
        "budget": k,
    }
    if need_weights:
        info["weights"] = torch.cat(wts, dim=1)[:, :L].reshape(*batch_shape, L, S)
    return out, info


def _topk_weights(s, k, inplace=False):
    """Softmax over the ``k`` best entries of each row of ``s`` (``-inf``: masked).

    On CPU (float32 / float64) the threshold and the weights come from one
    compiled pass per row (:func:`skdict.nn._kernels.topk_softmax.topk_softmax_rows`);
    without autograd the weights are written over ``s`` when ``inplace`` (the
    caller's own score block). Under autograd the kernel only supplies each
    row's threshold and the weights are a masked softmax of ``s`` in torch.
    Elsewhere, and for rows the kernel leaves to the reference (ties at the
    threshold, NaN or ``+inf`` scores), :func:`sparse_weights`.
    """
    n = s.shape[-1]
    if k is None or k >= n:
        return topk_softmax(s)
    if s.device.type != "cpu" or s.dtype not in (torch.float32, torch.float64):
        return sparse_weights(s, "topk", k=k)
    from ._kernels.topk_softmax import topk_softmax_rows

    grad = torch.is_grad_enabled() and s.requires_grad
    flat = s.detach().reshape(-1, n)
    if not flat.is_contiguous():
        flat = flat.contiguous()
        inplace = False
    x = flat.numpy()
    if grad or not inplace:
        w_np, thr, flag = topk_softmax_rows(x, int(k))
    else:
        w_np, thr, flag = topk_softmax_rows(x, int(k), out=x)
    rows = torch.from_numpy(np.flatnonzero(flag)) if flag.any() else None
    if grad:
        thr = torch.from_numpy(thr).view(*s.shape[:-1], 1)
        if rows is not None:  # any value: these rows are replaced below
            thr = thr.reshape(-1, 1).index_fill(0, rows, float("-inf")).view(thr.shape)
        w = topk_softmax(s.masked_fill(s < thr, float("-inf")))
        if rows is not None:
            s2 = s.reshape(-1, n)
            w = w.reshape(-1, n).index_copy(0, rows, sparse_weights(s2[rows], "topk", k=k))
            w = w.view(s.shape)
        return w
    w = torch.from_numpy(w_np)
    if rows is not None:  # the kernel left these rows' scores untouched
        w.index_copy_(0, rows, sparse_weights(flat[rows], "topk", k=k))
    return w.view(s.shape)


def _allowed_count(L, S, is_causal, key_valid, full_valid, B):
    """Number of allowed (query, key) pairs over the flattened batch."""
    with torch.no_grad():
        if full_valid is not None:
            m = full_valid
            if key_valid is not None:
                m = m & key_valid[:, None, :]
            if is_causal:
                m = m & torch.ones(L, S, dtype=torch.bool, device=m.device).tril()
            total = float(m.sum(dtype=torch.float64)) * (B // m.shape[0])
            return total
        kv = key_valid if key_valid is not None else torch.ones(
            (1, S), dtype=torch.bool, device="cpu")
        per = B // kv.shape[0]
        if not is_causal:
            return float(kv.sum(dtype=torch.float64)) * L * per
        cs = kv.to(torch.float64).cumsum(1)  # keys j <= i visible to query i
        rows = torch.clamp(torch.arange(L, device=cs.device), max=S - 1)
        return float(cs[:, rows].sum()) * per


# --------------------------------------------------------------------------------------
# hierarchical selection
# --------------------------------------------------------------------------------------


class HierarchicalSelection(NamedTuple):
    """Result of :func:`hierarchical_select` (``-1`` pads ragged rows).

    Attributes
    ----------
    indices : LongTensor (n_queries, k_leaf)
        Selected leaves, best score first.
    scores : Tensor (n_queries, k_leaf)
        Their scores (``-inf`` on padding).
    path : list of LongTensor
        Selected node indices at each level, coarse to fine (``path[-1]`` is
        ``indices``).
    scored : list of LongTensor
        The nodes whose scores were computed at each level: all of level 0,
        then only children of ``path[l - 1]``.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    path: list
    scored: list


def _children_table(parent, n_parents):
    parent = parent.long()
    counts = torch.bincount(parent, minlength=n_parents)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    order = torch.argsort(parent, stable=True)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(parent.numel(), device=parent.device) - start[parent[order]]
    table = torch.full((n_parents, width), -1, dtype=torch.long, device=parent.device)
    table[parent[order], pos] = order
    return table


def mean_pool_levels(leaves, branching):
    """Build coarse levels by mean-pooling contiguous groups of nodes.

    Parameters
    ----------
    leaves : Tensor (n, d)
        Token embeddings (the finest level).
    branching : sequence of int
        Children per parent, from the finest level up: ``(8, 4)`` makes
        patches of 8 tokens and regions of 4 patches.

    Returns
    -------
    levels : list of Tensor, coarse to fine (the last is ``leaves``)
    parents : list of LongTensor; ``parents[l]`` maps each node of
        ``levels[l + 1]`` to its parent in ``levels[l]``.
    """
    levels, parents = [leaves], []
    cur = leaves
    for b in branching:
        n = cur.shape[0]
        parent = torch.arange(n, device=cur.device) // int(b)
        m = int(parent[-1]) + 1
        pooled = torch.zeros(m, cur.shape[1], dtype=cur.dtype, device=cur.device)
        pooled.index_add_(0, parent, cur)
        pooled = pooled / torch.bincount(parent, minlength=m).to(cur.dtype)[:, None]
        levels.append(pooled)
        parents.append(parent)
        cur = pooled
    return levels[::-1], parents[::-1]


def hierarchical_select(query, levels, keep_ratios, *, parents=None, scale=None):
    """Coarse-to-fine selection: regions -> patches -> tokens.

    At level 0 every node is scored (``scale * <q, node>``) and the best
    ``ceil(keep_ratios[0] * n_0)`` are kept; at each finer level only the
    children of the kept parents are scored, and the best
    ``ceil(keep_ratios[l] * n_candidates)`` of them are kept. With every keep
    ratio equal to 1 except the last, the leaves selected are exactly the flat
    top-``ceil(keep_ratios[-1] * n_leaves)``.

    Parameters
    ----------
    query : Tensor (d,) or (n_queries, d)
    levels : sequence of Tensor
        Node embeddings per level, coarse to fine, each ``(n_l, d)``.
    keep_ratios : sequence of float in (0, 1]
        One per level.
    parents : sequence of LongTensor, optional
        ``parents[l]`` (shape ``(n_{l+1},)``) gives the parent in level ``l``
        of every node of level ``l + 1``. Default: contiguous groups of
        ``ceil(n_{l+1} / n_l)`` (what :func:`mean_pool_levels` builds).
    scale : float, optional
        Score scale (does not change the selection; reported scores use it).
        Default ``1 / sqrt(d)``.

    Returns
    -------
    HierarchicalSelection
        ``(indices, scores, path, scored)``; squeezed to 1-D for a 1-D query.
    """
    levels = list(levels)
    keep_ratios = list(keep_ratios)
    if len(levels) == 0 or len(keep_ratios) != len(levels):
        raise ValueError(
            f"need one keep ratio per level: got {len(levels)} levels and "
            f"{len(keep_ratios)} keep_ratios."
        )
    for r in keep_ratios:
        if not (0 < float(r) <= 1):
            raise ValueError(f"keep_ratios must be in (0, 1], got {r}.")
    single = query.dim() == 1
    q = query[None] if single else query
    d = q.shape[1]
    for lev in levels:
        if lev.dim() != 2 or lev.shape[1] != d:
            raise ValueError(
                f"every level must have shape (n_l, {d}), got {tuple(lev.shape)}."
            )
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if parents is None:
        parents = []
        for lo, hi in zip(levels[:-1], levels[1:], strict=True):
            b = math.ceil(hi.shape[0] / lo.shape[0])
            parents.append(torch.arange(hi.shape[0], device=hi.device) // b)
    if len(parents) != len(levels) - 1:
        raise ValueError("parents must have one entry per level after the first.")
    nq = q.shape[0]
    path, scored = [], []
    sel = None
    vals = None
    for lvl, (E, r) in enumerate(zip(levels, keep_ratios, strict=True)):
        if lvl == 0:
            cand = torch.arange(E.shape[0], device=E.device).expand(nq, -1)
            s = (q @ E.T) * scale
            valid = torch.ones_like(cand, dtype=torch.bool)
        else:
            par = parents[lvl - 1].to(E.device)
            if par.shape[0] != E.shape[0] or int(par.max()) >= levels[lvl - 1].shape[0]:
                raise ValueError(f"parents[{lvl - 1}] does not match the level sizes.")
            table = _children_table(par, levels[lvl - 1].shape[0])
            cand = table[sel.clamp(min=0)]  # (nq, s, width)
            cand = cand.masked_fill((sel < 0)[:, :, None], -1).reshape(nq, -1)
            valid = cand >= 0
            emb = E[cand.clamp(min=0)]  # only the candidates' embeddings
            s = torch.einsum("qmd,qd->qm", emb, q) * scale
            s = s.masked_fill(~valid, float("-inf"))
        n_valid = valid.sum(1)
        k_row = torch.ceil(n_valid.double() * float(r) - 1e-9).long().clamp(min=1)
        k_row = torch.minimum(k_row, n_valid)
        kmax = max(1, int(k_row.max()))
        vals, pos = torch.topk(s, kmax, dim=1)
        chosen = cand.gather(1, pos)
        keep = torch.arange(kmax, device=s.device)[None, :] < k_row[:, None]
        keep = keep & torch.isfinite(vals)
        chosen = chosen.masked_fill(~keep, -1)
        vals = vals.masked_fill(~keep, float("-inf"))
        scored.append(cand.masked_fill(~valid, -1))
        path.append(chosen)
        sel = chosen
    if single:
        return HierarchicalSelection(
            path[-1][0], vals[0], [p[0] for p in path], [c[0] for c in scored]
        )
    return HierarchicalSelection(path[-1], vals, path, scored)
