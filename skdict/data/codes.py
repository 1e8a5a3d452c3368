"""Codes as estimators produce them, and their assembly into CSR.

:class:`Codes` is the one return type of every per-batch encoder: dense
``(b, K)`` codes, fixed-width ``(indices, values)`` pairs, or CSR pieces.
:class:`CSRBuilder` appends batches of them and builds one CSR matrix without a
dense ``(n_samples, n_components)`` block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from sklearn import get_config

from .._backend import numpy_dtype, torch_dtype

__all__ = ["Codes", "CSRBuilder", "as_codes", "make_csr"]


def make_csr(data, indices, indptr, shape):
    """Build the sparse container skdict returns everywhere.

    skdict follows scikit-learn's ``sparse_interface`` configuration: a
    :class:`scipy.sparse.csr_matrix` by default, a :class:`scipy.sparse.csr_array`
    under ``sklearn.set_config(sparse_interface="sparray")``.
    """
    iface = get_config().get("sparse_interface", "spmatrix")
    cls = sp.csr_array if iface == "sparray" else sp.csr_matrix
    out = cls((data, indices, indptr), shape=shape)
    out.has_sorted_indices = True
    return out


def _joined(parts):
    """The pieces end to end; a single piece as it is (no copy)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class CSRBuilder:
    """Accumulate CSR rows batch by batch, holding only sparse pieces on the host.

    ``add_dense`` takes a dense ``(b, K)`` tensor of codes (one batch) and keeps
    its non-zeros; ``add_fixed_width`` takes ``(indices, values)`` of shape
    ``(b, s)`` (for example top-k codes) and drops zero values. Column indices are
    sorted within each row and no explicit zero is stored.
    """

    def __init__(self, n_columns, dtype):
        self.n_columns = int(n_columns)
        self.dtype = numpy_dtype(dtype)
        self._data, self._indices, self._counts = [], [], []

    def add_dense(self, codes: torch.Tensor):
        mask = codes != 0
        counts = mask.sum(dim=1)
        cols = mask.nonzero(as_tuple=True)[1]  # row-major, hence sorted per row
        vals = codes[mask]
        self._push(vals, cols, counts)

    def add_fixed_width(self, indices: torch.Tensor, values: torch.Tensor, sorted=False):
        """``sorted=True``: each row's non-zeros already come in increasing
        column order (padding entries may follow them), so no sort is needed."""
        if not sorted:
            indices, order = torch.sort(indices, dim=1)
            values = torch.gather(values, 1, order)
        if values.device.type == "cpu":  # compiled count + fill, no boolean mask
            from ._compact import compact_fixed_width

            self.add_csr(*compact_fixed_width(indices.detach().numpy(), values.detach().numpy(),
                                              self.n_columns, self.dtype))
            return
        mask = values != 0
        counts = mask.sum(dim=1)
        self._push(values[mask], indices[mask], counts)

    def add_csr(self, data, cols, counts):
        """Append rows given as CSR pieces (numpy): the non-zeros of all rows in
        row order with increasing columns within each row, and each row's count."""
        self._data.append(np.asarray(data).astype(self.dtype, copy=False))
        self._indices.append(np.asarray(cols))
        self._counts.append(np.asarray(counts))

    def _push(self, vals, cols, counts):
        self._data.append(vals.detach().to("cpu", torch_dtype(self.dtype)).numpy())
        self._indices.append(cols.detach().cpu().numpy())
        self._counts.append(counts.detach().cpu().numpy())

    def build(self):
        counts = _joined(self._counts) if self._counts else np.zeros(0, np.int64)
        nnz = int(counts.sum())
        idx_dtype = np.int32 if max(nnz, self.n_columns) < 2**31 - 1 else np.int64
        indptr = np.zeros(len(counts) + 1, dtype=idx_dtype)
        np.cumsum(counts, out=indptr[1:])
        if self._data:
            data = _joined(self._data).astype(self.dtype, copy=False)
            indices = _joined(self._indices).astype(idx_dtype, copy=False)
        else:
            data = np.zeros(0, self.dtype)
            indices = np.zeros(0, idx_dtype)
        return make_csr(data, indices, indptr, (len(counts), self.n_columns))



@dataclass
class Codes:
    """What ``_encode`` may return: dense codes, fixed-width (indices, values), or
    CSR pieces ``(data, cols, counts)`` (numpy, rows in order, columns increasing
    within each row)."""

    dense: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None
    sorted: bool = False  # fixed-width rows already in increasing column order
    csr: tuple | None = None

    def to_dense(self, n_codes, device=None):
        """The codes as a dense ``(b, n_codes)`` tensor."""
        if self.dense is not None:
            return self.dense
        if self.csr is not None:
            data, cols, counts = self.csr
            out = np.zeros((len(counts), n_codes), dtype=data.dtype)
            out[np.repeat(np.arange(len(counts)), counts), cols] = data
            out = torch.from_numpy(out)
            return out if device is None else out.to(device)
        dense = torch.zeros(self.values.shape[0], n_codes, dtype=self.values.dtype,
                            device=self.values.device)
        return dense.scatter_add_(1, self.indices, self.values)

    def nnz(self):
        """Number of non-zero codes (an int for CSR pieces, else a 0-d tensor)."""
        if self.dense is not None:
            return (self.dense != 0).sum()
        if self.csr is not None:
            return int(np.asarray(self.csr[2]).sum())
        return (self.values != 0).sum()

    def add_to(self, builder):
        """Append these rows to a :class:`CSRBuilder`."""
        if self.dense is not None:
            builder.add_dense(self.dense)
        elif self.csr is not None:
            builder.add_csr(*self.csr)
        else:
            builder.add_fixed_width(self.indices, self.values, sorted=self.sorted)


def as_codes(out):
    if isinstance(out, Codes):
        return out
    if isinstance(out, tuple):
        return Codes(indices=out[0], values=out[1])
    return Codes(dense=out)


