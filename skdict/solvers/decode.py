"""Sparse decode: ``codes @ D`` from CSR pieces or fixed-width top-k codes.

An embedding-bag gather-and-sum (``torch.nn.functional.embedding_bag`` with
per-sample weights) touches only the ``nnz`` rows of ``D`` that are used, on CPU
and CUDA, and is differentiable in both the values and ``D``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sparse_decode", "topk_decode", "dense_decode"]


def sparse_decode(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, D: torch.Tensor):
    """``A @ D`` for a CSR matrix ``A`` given by ``(crow, col, val)``.

    Parameters
    ----------
    crow : LongTensor of shape (n + 1,)
    col : LongTensor of shape (nnz,)
    val : Tensor of shape (nnz,)
    D : Tensor of shape (K, P)

    Returns
    -------
    Tensor of shape (n, P)
    """
    n = crow.numel() - 1
    if col.numel() == 0:
        return torch.zeros(n, D.shape[1], dtype=D.dtype, device=D.device)
    val = val.to(D.dtype)
    offsets = crow[:-1].contiguous()
    return F.embedding_bag(
        col, D, offsets, mode="sum", per_sample_weights=val, include_last_offset=False
    )


def topk_decode(indices: torch.Tensor, values: torch.Tensor, D: torch.Tensor):
    """``A @ D`` for fixed-width codes: row ``i`` is ``sum_j values[i,j] D[indices[i,j]]``."""
    n, s = indices.shape
    if s == 0:
        return torch.zeros(n, D.shape[1], dtype=D.dtype, device=D.device)
    return F.embedding_bag(indices, D, mode="sum", per_sample_weights=values.to(D.dtype))


def dense_decode(indices: torch.Tensor, values: torch.Tensor, D: torch.Tensor):
    """The naive reference for :func:`topk_decode`: scatter to dense, then matmul."""
    A = torch.zeros(indices.shape[0], D.shape[0], dtype=D.dtype, device=D.device)
    A = A.scatter_add(1, indices, values.to(D.dtype))
    return A @ D
