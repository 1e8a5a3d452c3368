"""Sparse kernels of top-k sparse autoencoders, with sparse backward passes.

The only dense matrix product of a training step is the encoder's
pre-activation ``xc @ W_enc.T``. Everything else touches only the ``nnz``
selected (token, latent) pairs:

* :class:`SparseEncode` selects entries of the pre-activations (top-k per row,
  top ``k*B`` per batch, or per-latent top fraction) and returns their ReLU
  values; its backward puts gradient only on the selected pre-activations, so
  ``grad W_enc = S.T @ xc`` and ``grad xc = S @ W_enc`` are embedding-bag sums
  over the selected pairs.
* :class:`SparseDecode` computes ``z @ W_dec`` from the selected pairs with an
  embedding bag; its backward gives ``grad W_dec = Z.T @ grad_out`` as an
  embedding bag over the same pairs sorted by latent, and the gradient of each
  selected value as one dot product.

Selections are COO triplets sorted by row: ``row`` (nnz,), ``col`` (nnz,) and,
derived from them, CSR row offsets. Both functions are tested against the dense
autograd reference (``torch.autograd.gradcheck`` in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "SparsePairs",
    "select_topk",
    "select_batch_topk",
    "select_lifetime",
    "select_threshold",
    "sparse_encode",
    "sparse_decode_pairs",
    "dense_encode_reference",
    "dense_decode_reference",
]


class SparsePairs:
    """Selected (row, col) pairs of a ``(n_rows, n_cols)`` code matrix.

    ``row`` is sorted (row-major order). ``crow`` are the CSR row offsets and,
    computed lazily once, ``by_col`` gives the permutation sorting the pairs by
    column together with the column offsets (the transposed structure used by
    the backward passes).
    """

    def __init__(self, row, col, n_rows, n_cols):
        self.row = row
        self.col = col
        self.n_rows = int(n_rows)
        self.n_cols = int(n_cols)
        self._crow = None
        self._by_col = None
        self.pre_values = None  # selected pre-activations, when the selection has them
        self.width = None  # pairs per row when every row has the same number

    @property
    def nnz(self):
        return int(self.col.numel())

    @property
    def crow(self):
        if self._crow is None:
            counts = torch.bincount(self.row, minlength=self.n_rows)
            crow = torch.zeros(self.n_rows + 1, dtype=torch.long, device=self.row.device)
            torch.cumsum(counts, 0, out=crow[1:])
            self._crow = crow
        return self._crow

    @property
    def by_col(self):
        """``(perm, col_offsets)``: pairs sorted by column, CSR offsets of the
        transposed ``(n_cols, n_rows)`` matrix (without the last entry)."""
        if self._by_col is None:
            perm = torch.argsort(self.col)
            counts = torch.bincount(self.col, minlength=self.n_cols)
            offsets = torch.zeros(self.n_cols, dtype=torch.long, device=self.col.device)
            if self.n_cols > 1:
                torch.cumsum(counts[:-1], 0, out=offsets[1:])
            self._by_col = (perm, offsets)
        return self._by_col

    def row_sum(self, vals, table):
        """``S @ table`` where ``S`` has values ``vals`` at the pairs: (n_rows, P)."""
        if self.nnz == 0:
            return table.new_zeros(self.n_rows, table.shape[1])
        return F.embedding_bag(
            self.col, table, self.crow[:-1], mode="sum", per_sample_weights=vals
        )

    def col_sum(self, vals, table):
        """``S.T @ table`` where ``S`` has values ``vals``: (n_cols, P)."""
        if self.nnz == 0:
            return table.new_zeros(self.n_cols, table.shape[1])
        perm, offsets = self.by_col
        return F.embedding_bag(
            self.row[perm], table, offsets, mode="sum", per_sample_weights=vals[perm]
        )

    def pair_dot(self, A, B, chunk=8192):
        """``(A[row] * B[col]).sum(1)`` for every pair.

        Uses torch's embedding-bag per-sample-weight gradient kernel (one dot
        product per pair, nothing materialised); falls back to chunked gathers
        (bounded memory) where that kernel is unavailable.
        """
        if self.nnz == 0:
            return A.new_zeros(0)
        if A.dtype == B.dtype and A.device == B.device:
            try:
                return _native_pair_dot(A.contiguous(), B.contiguous(), self.col,
                                        self.crow[:-1], self.row)
            except (AttributeError, TypeError):  # pragma: no cover
                pass
        return self._pair_dot_gather(A, B, chunk)

    def _pair_dot_gather(self, A, B, chunk=8192):
        out = A.new_empty(self.nnz)
        w = self.width
        if w:
            rows = max(1, chunk // w)
            o2 = out.view(self.n_rows, w)
            c2 = self.col.view(self.n_rows, w)
            for s in range(0, self.n_rows, rows):
                e = min(self.n_rows, s + rows)
                Bg = torch.index_select(B, 0, c2[s:e].reshape(-1)).view(e - s, w, -1)
                torch.linalg.vecdot(Bg, A[s:e].unsqueeze(1), out=o2[s:e])
            return out
        for s in range(0, self.nnz, chunk):
            r = self.row[s : s + chunk]
            c = self.col[s : s + chunk]
            torch.linalg.vecdot(
                torch.index_select(A, 0, r), torch.index_select(B, 0, c),
                out=out[s : s + chunk],
            )
        return out

    def to_dense(self, vals):
        out = vals.new_zeros(self.n_rows, self.n_cols)
        out[self.row, self.col] = vals
        return out


def _native_pair_dot(A, B, col, offsets, bags):
    """``<A[bags[p]], B[col[p]]>`` with ATen's embedding-bag per-sample-weight
    backward (bags given by CSR ``offsets`` and, per pair, ``bags``).

    The CUDA kernel reads the pair-to-bag map (``offset2bag``) unchecked: an
    empty one is an illegal memory access there, so it is always passed."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        A, B, col, offsets, bags, 0, -1
    )


# ------------------------------------------------------------------ selections
def _pairs_from_fixed_width(indices, n_cols):
    b, s = indices.shape
    row = torch.arange(b, device=indices.device).repeat_interleave(s)
    pairs = SparsePairs(row, indices.reshape(-1), b, n_cols)
    pairs.width = s
    return pairs


def select_topk(pre, k):
    """Per-row top ``k`` of ``pre`` (b, K). Returns :class:`SparsePairs`."""
    k = min(int(k), pre.shape[1])
    vals, idx = torch.topk(pre, k, dim=1, sorted=False)
    pairs = _pairs_from_fixed_width(idx, pre.shape[1])
    pairs.pre_values = vals.reshape(-1)
    return pairs


def select_batch_topk(pre, k):
    """Top ``k * b`` entries of the whole batch ``pre`` (b, K) (BatchTopK)."""
    b, K = pre.shape
    m = min(int(k) * b, b * K)
    _, flat = torch.topk(pre.reshape(-1), m, sorted=False)
    flat, _ = torch.sort(flat)
    return SparsePairs(flat // K, flat % K, b, K)


def select_lifetime(pre, fraction):
    """Winner-take-all lifetime sparsity: each latent (column) keeps its top
    ``ceil(fraction * b)`` rows of the batch (Makhzani & Frey 2015)."""
    b, K = pre.shape
    m = max(1, min(b, int(-(-fraction * b // 1))))
    _, rows = torch.topk(pre, m, dim=0, sorted=False)  # (m, K)
    cols = torch.arange(K, device=pre.device).expand(m, K)
    key = rows.reshape(-1) * K + cols.reshape(-1)
    key, _ = torch.sort(key)
    return SparsePairs(key // K, key % K, b, K)


def select_threshold(pre, threshold):
    """All entries above ``threshold`` (JumpReLU-style inference of BatchTopK)."""
    b, K = pre.shape
    row, col = torch.nonzero(pre > threshold, as_tuple=True)
    return SparsePairs(row, col, b, K)


# ------------------------------------------------------------------ autograd
class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, pairs, pre_vals):
        vals = torch.relu(pre_vals)
        xc = x - b_dec if b_dec is not None else x
        ctx.pairs = pairs
        ctx.save_for_backward(xc, W_enc, vals)
        return vals

    @staticmethod
    def backward(ctx, grad_vals):
        xc, W_enc, vals = ctx.saved_tensors
        pairs = ctx.pairs
        g = grad_vals * (vals > 0).to(grad_vals.dtype)
        grad_x = grad_bd = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = pairs.row_sum(g, W_enc)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            # the selected gradients summed over rows, per latent: (K,)
            gcol = torch.zeros(pairs.n_cols, dtype=g.dtype, device=g.device)
            gcol.index_add_(0, pairs.col, g)
            if ctx.needs_input_grad[3]:
                grad_b = gcol
            if ctx.needs_input_grad[1]:
                # d/d b_dec of the rows of (x - b_dec) @ W_enc.T: one vector-matrix product
                grad_bd = -(gcol @ W_enc)
        if ctx.needs_input_grad[2]:
            grad_W = pairs.col_sum(g, xc)
        return grad_x, grad_bd, grad_W, grad_b, None, None


def sparse_encode(x, W_enc, b_enc, pairs, pre=None, b_dec=None):
    """ReLU of the selected pre-activations ``(x - b_dec) @ W_enc.T + b_enc``, (nnz,).

    The selected pre-activations are taken from ``pairs.pre_values`` when the
    selection recorded them, else read from ``pre`` (the dense pre-activations,
    computed without gradient tracking) when given, else recomputed at the
    pairs. The backward pass is sparse: gradients reach ``W_enc`` and ``b_enc``
    only at the selected pairs, ``x`` as an embedding-bag sum over them, and
    ``b_dec`` (when given) as one vector-matrix product.
    """
    with torch.no_grad():
        if pairs.pre_values is not None:
            pre_vals = pairs.pre_values
        elif pre is not None:
            pre_vals = pre[pairs.row, pairs.col]
        else:
            xc = x - b_dec if b_dec is not None else x
            pre_vals = pairs.pair_dot(xc, W_enc) + b_enc[pairs.col]
    return _SparseEncode.apply(x, b_dec, W_enc, b_enc, pairs, pre_vals)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, W_dec, pairs):
        ctx.pairs = pairs
        ctx.save_for_backward(vals, W_dec)
        return pairs.row_sum(vals, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        vals, W_dec = ctx.saved_tensors
        pairs = ctx.pairs
        grad_out = grad_out.contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_vals = pairs.pair_dot(grad_out, W_dec)
        if ctx.needs_input_grad[1]:
            grad_W = pairs.col_sum(vals, grad_out)
        return grad_vals, grad_W, None


def sparse_decode_pairs(vals, W_dec, pairs):
    """``Z @ W_dec`` with ``Z`` holding ``vals`` at ``pairs``; sparse backward."""
    return _SparseDecode.apply(vals, W_dec, pairs)


# ------------------------------------------------------------------ references
def dense_encode_reference(x, W_enc, b_enc, pairs, b_dec=None):
    """Dense autograd reference of :func:`sparse_encode` (for tests)."""
    xc = x - b_dec if b_dec is not None else x
    pre = xc @ W_enc.T + b_enc
    return torch.relu(pre[pairs.row, pairs.col])


def dense_decode_reference(vals, W_dec, pairs):
    """Dense autograd reference of :func:`sparse_decode_pairs` (for tests)."""
    Z = torch.zeros(pairs.n_rows, pairs.n_cols, dtype=vals.dtype, device=vals.device)
    Z = Z.index_put((pairs.row, pairs.col), vals)
    return Z @ W_dec
