"""Sparse normal-equation statistics for dictionaries with many atoms.

With fixed-width codes (each row uses ``s`` of ``K`` atoms) the online
dictionary-learning statistics ``B = sum_i a_i x_i^T`` (K x P) and
``A = sum_i a_i a_i^T`` (K x K) are accumulated without any ``(n, K)`` or dense
``(K, K)`` object:

* ``B`` is a dense ``(K, P)`` array (the size of the dictionary) updated with
  ``index_add`` over the ``n * s`` active (row, atom) pairs;
* ``A`` is kept as its diagonal (a ``K`` vector) plus the strictly upper
  triangle of its off-diagonal part as a coalesced COO matrix. One batch adds
  at most ``n * s * (s - 1) / 2`` entries; the accumulated matrix is decayed
  and pruned to its ``max_nnz`` largest entries, so its memory is bounded
  whatever the number of batches.

The dictionary is then refreshed atom-wise by a block-coordinate (Jacobi /
MOD) step on the touched atoms, ``d_k <- (B_k - sum_{j != k} A_kj d_j) / A_kk``,
projected back to unit norm (:func:`refresh_atoms`). Forgetting and dead-atom
resampling are those of :mod:`skdict.updates.atoms`.
"""

from __future__ import annotations

import numpy as np
import torch

from .atoms import project_unit_norm

__all__ = [
    "SparseStats",
    "add_rows",
    "accumulate_B",
    "batch_cooccurrence",
    "refresh_atoms",
]


def add_rows(out, index, src):
    """``out[index[i]] += src[i]`` (duplicates accumulate), in place.

    torch's CPU ``index_add_`` is pathologically slow for small, unsorted,
    duplicated indices when several OpenMP threads are busy (tens of
    milliseconds for a few hundred rows), so small updates go through
    ``index_put_(accumulate=True)`` and large ones through ``index_add_``.
    """
    if index.numel() == 0:
        return out
    if out.device.type == "cpu" and src.numel() < (1 << 20):
        return out.index_put_((index,), src, accumulate=True)
    return out.index_add_(0, index, src)


def accumulate_B(B: torch.Tensor, X: torch.Tensor, indices: torch.Tensor,
                 values: torch.Tensor, *, chunk: int = 1024):
    """``B[k] += sum_i a_ik x_i`` over the active pairs, in place: on CPU by a
    compiled scatter (:func:`skdict.updates._kernels.stats.scatter_rows`), elsewhere
    via ``index_add``."""
    if B.device.type == "cpu" and B.dtype in (torch.float32, torch.float64):
        from ._kernels.stats import scatter_rows

        scatter_rows(B.numpy(), X.detach().to(B.dtype).contiguous().numpy(),
                     indices.contiguous().numpy(),
                     values.detach().to(B.dtype).contiguous().numpy())
        return B
    n, s = indices.shape
    P = X.shape[1]
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        contrib = values[r0:r1, :, None].to(B.dtype) * X[r0:r1, None, :].to(B.dtype)
        add_rows(B, indices[r0:r1].reshape(-1), contrib.reshape(-1, P))
    return B


def batch_cooccurrence(indices: torch.Tensor, values: torch.Tensor, n_components: int):
    """Co-occurrence statistics of one batch of fixed-width codes.

    Returns ``(diag, rows, cols, vals)``: ``diag`` is the ``(K,)`` vector
    ``sum_i a_ik^2`` and ``(rows, cols, vals)`` the coalesced strictly upper
    triangle of ``sum_i a_i a_i^T`` (``rows < cols``), at most ``n s (s-1) / 2``
    entries.
    """
    n, s = indices.shape
    v = values
    diag = torch.zeros(n_components, dtype=v.dtype, device=v.device)
    add_rows(diag, indices.reshape(-1), (v * v).reshape(-1))
    if s < 2:
        empty = torch.zeros(0, dtype=torch.long, device=v.device)
        return diag, empty, empty.clone(), torch.zeros(0, dtype=v.dtype, device=v.device)
    if v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64):
        from ._kernels.stats import batch_pairs

        rows, cols, vals = batch_pairs(indices.contiguous().numpy(),
                                       v.detach().contiguous().numpy(), n_components)
        return diag, torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(vals)
    return (diag, *_pairs_torch(indices, v, n_components))


def _pairs_torch(indices, v, n_components):
    """Reference (and device) path of the coalesced upper co-occurrence entries."""
    s = indices.shape[1]
    iu = torch.triu_indices(s, s, offset=1, device=v.device)
    ri = indices[:, iu[0]].reshape(-1)
    ci = indices[:, iu[1]].reshape(-1)
    pv = (v[:, iu[0]] * v[:, iu[1]]).reshape(-1)
    lo = torch.minimum(ri, ci)
    hi = torch.maximum(ri, ci)
    keep = (pv != 0) & (lo != hi)
    lo, hi, pv = lo[keep], hi[keep], pv[keep]
    return _coalesce(lo, hi, pv, n_components)


def _coalesce(rows, cols, vals, K):
    if rows.numel() == 0:
        return rows, cols, vals
    key = rows * K + cols
    if key.device.type == "cpu":  # numpy's unique is ~5x faster than torch's on CPU
        uniq, inv = np.unique(key.numpy(), return_inverse=True)
        v = vals.numpy()
        out = np.bincount(inv.reshape(-1), weights=v, minlength=uniq.shape[0]).astype(v.dtype)
        uniq = torch.from_numpy(uniq)
        return uniq // K, uniq % K, torch.from_numpy(out)
    uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
    out = torch.zeros(uniq.shape[0], dtype=vals.dtype, device=vals.device)
    add_rows(out, inv, vals)
    return torch.div(uniq, K, rounding_mode="floor"), uniq % K, out


def _largest_mask(a, m):
    """Boolean mask of ``m`` largest entries of the 1-D ``a`` (ties broken by position)."""
    n = a.numel()
    if a.device.type == "cpu":
        an = a.numpy()
        thr = np.partition(an, n - m)[n - m]
        keep = an > thr
        extra = m - int(keep.sum())
        if extra > 0:
            keep[np.flatnonzero(an == thr)[:extra]] = True
        return torch.from_numpy(keep)
    keep = torch.zeros(n, dtype=torch.bool, device=a.device)
    keep[a.topk(m, sorted=False).indices] = True
    return keep


class SparseStats:
    """Accumulated sparse normal equations of a ``K``-atom dictionary.

    Parameters
    ----------
    n_components, n_features : int
    max_nnz : int
        Cap on the stored off-diagonal entries of ``A`` (upper triangle); the
        smallest entries (in absolute value) are dropped beyond it.
    device, dtype : torch device and dtype (float32 by default).

    Attributes
    ----------
    B : Tensor (K, P)
    diag : Tensor (K,)
        Diagonal of ``A``.
    rows, cols, vals : Tensors (nnz,)
        Upper-triangular off-diagonal entries of ``A``.
    """

    def __init__(self, n_components, n_features, *, max_nnz, device="cpu",
                 dtype=torch.float32):
        K, P = int(n_components), int(n_features)
        self.n_components = K
        self.max_nnz = int(max_nnz)
        self.B = torch.zeros((K, P), dtype=dtype, device=device)
        self.diag = torch.zeros(K, dtype=dtype, device=device)
        self.rows = torch.zeros(0, dtype=torch.long, device=device)
        self.cols = torch.zeros(0, dtype=torch.long, device=device)
        self.vals = torch.zeros(0, dtype=dtype, device=device)

    _TENSORS = ("B", "diag", "rows", "cols", "vals")

    @property
    def nnz(self):
        return int(self.vals.numel())

    def state_dict(self):
        """CPU numpy copies of the statistics (portable: pickling, checkpoints)."""
        d = {name: getattr(self, name).detach().cpu().numpy().copy() for name in self._TENSORS}
        d["max_nnz"] = self.max_nnz
        return d

    @classmethod
    def from_state_dict(cls, d, device="cpu", dtype=torch.float32):
        """Rebuild from :meth:`state_dict` on ``device`` (the arrays are copied)."""
        K, P = d["B"].shape
        st = cls(K, P, max_nnz=d["max_nnz"], device=device, dtype=dtype)
        for name in cls._TENSORS:
            t = torch.as_tensor(d[name])
            t = t.to(device=device, dtype=torch.long if name in ("rows", "cols") else dtype)
            setattr(st, name, t.clone())
        return st

    def clone(self):
        st = SparseStats.__new__(SparseStats)
        st.n_components, st.max_nnz = self.n_components, self.max_nnz
        for name in self._TENSORS:
            setattr(st, name, getattr(self, name).clone())
        return st

    def update(self, X, indices, values, decay):
        """Decay the statistics by ``decay`` and add one batch of codes."""
        values = values.to(self.B.dtype)
        X = X.to(self.B.dtype)
        self.B.mul_(decay)
        self.diag.mul_(decay)
        self.vals.mul_(decay)
        accumulate_B(self.B, X, indices, values)
        d, r, c, v = batch_cooccurrence(indices, values, self.n_components)
        self.diag.add_(d)
        self._add_offdiag(r, c, v)

    def _add_offdiag(self, r, c, v):
        """Add coalesced, ``(row, col)``-sorted entries; prune to ``max_nnz``."""
        if v.numel() and self.vals.device.type == "cpu":
            # both lists are sorted: one linear merge (no sort), compiled
            from ._kernels.stats import merge_sorted

            rows, cols, vals = merge_sorted(
                self.rows.numpy(), self.cols.numpy(), self.vals.numpy(),
                r.numpy(), c.numpy(), v.to(self.vals.dtype).numpy(),
                self.n_components, self.max_nnz)
            self.rows, self.cols = torch.from_numpy(rows), torch.from_numpy(cols)
            self.vals = torch.from_numpy(vals)
        elif v.numel():
            self._add_offdiag_torch(r, c, v)

    def _add_offdiag_torch(self, r, c, v):
        """Reference (and device) path of :meth:`_add_offdiag`."""
        if v.numel():
            rows = torch.cat([self.rows, r])
            cols = torch.cat([self.cols, c])
            vals = torch.cat([self.vals, v])
            rows, cols, vals = _coalesce(rows, cols, vals, self.n_components)
            if vals.numel() > self.max_nnz:
                keep = _largest_mask(vals.abs(), self.max_nnz)  # keeps the (row, col) order
                rows, cols, vals = rows[keep], cols[keep], vals[keep]
            self.rows, self.cols, self.vals = rows, cols, vals

    def to(self, device):
        """A copy on ``device``."""
        return SparseStats.from_state_dict(self.state_dict(), device=device,
                                           dtype=self.B.dtype)

    def merge_(self, other, decay=1.0):
        """In place ``self <- decay * self + other``: the statistics of two sets of
        rows add up (then pruned to ``max_nnz`` as after :meth:`update`)."""
        dev = self.B.device
        self.B.mul_(decay).add_(other.B.to(dev, self.B.dtype))
        self.diag.mul_(decay).add_(other.diag.to(dev, self.diag.dtype))
        self.vals.mul_(decay)
        self._add_offdiag(other.rows.to(dev), other.cols.to(dev),
                          other.vals.to(dev, self.vals.dtype))
        return self

    def __add__(self, other):
        return self.clone().merge_(other)

    def offdiag_matmul(self, D, *, chunk=16384, atoms=None):
        """``(A - diag(A)) @ D`` (K x P) from the upper-triangular entries, or
        only its rows ``atoms`` (``(len(atoms), P)``).

        On CPU a compiled pass over the entries computes just the wanted rows
        (:func:`skdict.updates._kernels.cooc.offdiag_rows_matmul`); elsewhere
        the entries are processed in chunks of ``chunk``, so the largest
        temporary is ``(chunk, P)``.
        """
        if D.device.type == "cpu" and D.dtype in (torch.float32, torch.float64):
            from ._kernels.cooc import offdiag_rows_matmul

            want = torch.arange(D.shape[0]) if atoms is None else atoms
            return torch.from_numpy(offdiag_rows_matmul(
                self.rows.numpy(), self.cols.numpy(), self.vals.numpy(),
                D.detach().contiguous().numpy(), want.numpy(), torch.get_num_threads()))
        out = self._offdiag_matmul_torch(D, chunk)
        return out if atoms is None else out[atoms]

    def _offdiag_matmul_torch(self, D, chunk):
        out = torch.zeros_like(D)
        if self.vals.numel() == 0:
            return out
        Dv = D.to(self.vals.dtype)
        for e0 in range(0, self.vals.numel(), chunk):
            r = self.rows[e0:e0 + chunk]
            c = self.cols[e0:e0 + chunk]
            v = self.vals[e0:e0 + chunk, None]
            add_rows(out, r, (v * Dv[c]).to(out.dtype))
            add_rows(out, c, (v * Dv[r]).to(out.dtype))
        return out

    def offdiag_abs_rowsum(self):
        """``sum_{j != k} |A_kj|`` for every atom (a ``(K,)`` vector)."""
        out = torch.zeros_like(self.diag)
        a = self.vals.abs()
        add_rows(out, self.rows, a)
        add_rows(out, self.cols, a)
        return out

    def reset_atoms(self, atoms):
        """Forget every statistic of ``atoms`` (after they were resampled)."""
        if atoms.numel() == 0:
            return
        self.B[atoms] = 0
        self.diag[atoms] = 0
        mask = torch.zeros(self.n_components, dtype=torch.bool, device=self.B.device)
        mask[atoms] = True
        keep = ~(mask[self.rows] | mask[self.cols])
        self.rows, self.cols, self.vals = self.rows[keep], self.cols[keep], self.vals[keep]


def refresh_atoms(D, stats: SparseStats, atoms=None, *, step=1.0, n_iter=1,
                  preconditioner="gershgorin", min_diag=1e-12):
    """Block-coordinate update of ``atoms`` from the statistics, in place.

    With ``preconditioner="jacobi"`` each touched atom is set to its
    least-squares optimum given all the other atoms,
    ``d_k <- (B_k - sum_{j != k} A_kj d_j) / A_kk`` (the block-coordinate step
    of online dictionary learning, applied to all touched atoms at once).
    Applied simultaneously this Jacobi sweep can diverge when the
    co-occurrence matrix is not diagonally dominant (e.g. non-negative codes),
    so the default ``"gershgorin"`` takes the majorised step
    ``d_k <- d_k + (B_k - (A D)_k) / M_k`` with
    ``M_k = A_kk + sum_{j != k} |A_kj|``: since ``diag(M) >= A``, every step
    decreases the quadratic ``0.5 tr(D^T A D) - tr(D^T B)``. Both are damped by
    ``step``, repeated ``n_iter`` times (iterating to convergence is the MOD
    update ``D = A^{-1} B`` restricted to these atoms), then projected to unit
    norm. Atoms with ``A_kk <= min_diag`` are left unchanged.
    """
    K = D.shape[0]
    if atoms is None:
        atoms = torch.arange(K, device=D.device)
    atoms = atoms[stats.diag[atoms] > min_diag]
    if atoms.numel() == 0:
        return D
    if preconditioner not in ("jacobi", "gershgorin"):
        raise ValueError(
            f"preconditioner must be 'jacobi' or 'gershgorin', got {preconditioner!r}."
        )
    if (D.device.type == "cpu" and D.dtype in (torch.float32, torch.float64)
            and stats.B.dtype == D.dtype and D.is_contiguous() and not D.requires_grad):
        # one compiled pass: no (len(atoms), P) temporaries of the torch path
        from ._kernels.cooc import refresh_rows

        for _ in range(int(n_iter)):
            refresh_rows(stats.rows.numpy(), stats.cols.numpy(), stats.vals.numpy(),
                         D.numpy(), atoms.numpy(), stats.B.numpy(), stats.diag.numpy(),
                         gershgorin=preconditioner == "gershgorin", step=step, eps=1e-10)
        return D
    diag = stats.diag[atoms, None].to(D.dtype)
    if preconditioner == "gershgorin":
        M = diag + stats.offdiag_abs_rowsum()[atoms, None].to(D.dtype)
    for _ in range(int(n_iter)):
        old = D[atoms]
        AD = stats.offdiag_matmul(D, atoms=atoms)
        if preconditioner == "jacobi":
            new = (stats.B[atoms].to(D.dtype) - AD) / diag
        else:
            new = old + (stats.B[atoms].to(D.dtype) - AD - diag * old) / M
        if step != 1.0:
            new = (1 - step) * old + step * new
        project_unit_norm(new, inplace=True, fallback=old)
        D[atoms] = new
    return D
