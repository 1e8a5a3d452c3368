"""Where rows come from: one :class:`RowSource` over every input kind.

Every estimator reads its rows through :func:`as_source`, so that numpy arrays,
memory maps, scipy sparse matrices, torch tensors (on any device), pandas frames
and iterables of batches (lists, generators, torch ``DataLoader``) get the same
validation, the same errors and, for the same seed, the same shuffled batches.

* Arrays are validated once at the boundary. Memory maps are never loaded whole:
  their shape and dtype are checked up front and their finiteness batch by batch.
* Shuffling draws from a CPU :class:`torch.Generator`, so a seed gives the same
  batches whatever the device and whatever the array kind.
* A stream (an iterable of 2-D batches) is validated block by block; its first
  block is read when the source is made (to learn the feature count) and replayed,
  so a one-pass generator loses nothing.

Batches are dense tensors on the requested device. On the CPU an in-order batch
of a C-contiguous numpy array of the right dtype is a view of the caller's
memory: treat batches as read-only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from .._backend import numpy_dtype, torch_dtype
from .._validation import check_input, check_n_features, shape_error

__all__ = ["RowSource", "ArraySource", "StreamSource", "DaskSource", "as_source", "is_dask",
           "is_stream", "check_block_finite"]


def is_dask(X) -> bool:
    """True for a ``dask.array.Array`` (checked without importing dask)."""
    return type(X).__module__.startswith("dask.") and hasattr(X, "chunks") \
        and hasattr(X, "__dask_graph__")


def is_stream(X) -> bool:
    """True when ``X`` is an iterable of 2-D batches rather than one array-like.

    Arrays, tensors, sparse matrices and anything with ``shape`` or ``__array__``
    (pandas, memmaps) are one array. A list or tuple is a stream only when every
    element is itself 2-D (a nested list of numbers is an array). Any other
    iterable (generator, iterator, ``DataLoader``) is a stream.
    """
    if isinstance(X, (np.ndarray, torch.Tensor, str, bytes, dict)) or sp.issparse(X):
        return False
    if is_dask(X):
        return False
    if hasattr(X, "__array__") or hasattr(X, "shape"):
        return False
    if isinstance(X, (list, tuple)):
        return len(X) > 0 and _is_block(X[0])
    return isinstance(X, Iterable)


def _is_block(b):
    if isinstance(b, dict):  # a batch of a dict dataset: the stream explains what to yield
        return True
    if isinstance(b, (list, tuple)) and len(b) > 0 and isinstance(b[0], torch.Tensor):
        b = b[0]  # (x, y) / [x] batches of a DataLoader
    return sp.issparse(b) or getattr(b, "ndim", None) == 2


def _n_rows(block):
    if isinstance(block, (list, tuple)) and len(block) > 0 and isinstance(block[0], torch.Tensor):
        block = block[0]
    shape = getattr(block, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) > 0 else len(block)


def _resolve_dtype(dtype, data_dtype):
    if dtype is None:
        return numpy_dtype(data_dtype)
    if isinstance(dtype, torch.dtype):
        return numpy_dtype(dtype)
    return np.dtype(dtype)


def _nonfinite_error(name, row=None):
    where = "" if row is None else f" (row {row})"
    return ValueError(
        f"Input X contains NaN or infinity{where}. Remove or impute non-finite values "
        f"before calling {name}."
    )


def check_block_finite(block, i, start, stop, name):
    """Raise when dask block ``i`` (rows ``start:stop``) holds NaN or infinity."""
    data = block.data if sp.issparse(block) else block
    finite = bool(torch.isfinite(data).all()) if isinstance(data, torch.Tensor) \
        else bool(np.isfinite(data).all())
    if not finite:
        raise ValueError(
            f"Input X contains NaN or infinity in block {i} (rows {start} to {stop}) of the "
            f"dask array. Remove or impute non-finite values before calling {name}."
        )
    return block


def _to_tensor(block, device, tdtype):
    """A numpy / scipy / torch block as a dense tensor on ``device``."""
    if isinstance(block, torch.Tensor):
        return block.detach().to(device=device, dtype=tdtype)
    if sp.issparse(block):
        block = block.toarray()
    arr = np.ascontiguousarray(block, dtype=numpy_dtype(tdtype))
    if not arr.flags.writeable:  # torch.from_numpy wants writeable memory
        arr = arr.copy()
    return torch.from_numpy(arr).to(device)


class RowSource:
    """Rows of a data set, read batch by batch.

    Attributes
    ----------
    n_samples : int or None
        Number of rows (None for streams).
    n_features : int
    dtype : numpy.dtype
        Compute dtype (float32 or float64).
    is_stream : bool
    reiterable : bool
        False for a one-pass iterator: it can be read once.
    """

    n_samples: int | None
    n_features: int
    dtype: np.dtype
    is_stream = False
    is_dask = False
    reiterable = True

    def batches(self, batch_size, *, device, shuffle=False, generator=None, dtype=None):
        """Dense batches of at most ``batch_size`` rows on ``device``.

        ``shuffle``: False (row order), True (a permutation of all rows drawn
        with ``generator``; each batch's rows in increasing order) or
        ``"blocks"`` (contiguous blocks of ``batch_size`` rows in a random order,
        rows permuted within each block: contiguous reads for memory maps).
        Streams yield their blocks in the order given (``shuffle`` is ignored).
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def n_batches(self, batch_size):
        """Batches of one pass (None when the number of rows is unknown)."""
        if self.n_samples is None:
            return None
        return -(-int(self.n_samples) // max(1, int(batch_size)))

    def ordered(self, batch_size, *, device, dtype=None):
        """``(start, stop, Xb)`` over all rows in order."""
        start = 0
        for Xb in self.batches(batch_size, device=device, dtype=dtype):
            stop = start + Xb.shape[0]
            yield start, stop, Xb
            start = stop

    def sample(self, n, *, generator, device, dtype=None):
        """Up to ``n`` distinct random rows (for initialisation), as one tensor."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _tdtype(self, dtype):
        return torch_dtype(self.dtype if dtype is None else _resolve_dtype(dtype, self.dtype))


class ArraySource(RowSource):
    """numpy arrays, memory maps, scipy sparse matrices and torch tensors."""

    def __init__(self, X, dtype, *, name, check_finite_per_batch=False):
        self.X = X
        self.n_samples = int(X.shape[0])
        self.n_features = int(X.shape[1])
        self.dtype = np.dtype(dtype)
        self._name = name
        self._check_finite = check_finite_per_batch
        self.is_torch = isinstance(X, torch.Tensor)

    def _rows(self, idx, device, tdtype):
        X = self.X
        if self.is_torch:
            idx = torch.as_tensor(idx, device=X.device)
            out = X.index_select(0, idx).to(device=device, dtype=tdtype)
        else:
            out = _to_tensor(X[np.asarray(idx)], device, tdtype)
        return self._checked(out, lambda i: int(idx[i]))

    def _slice(self, start, stop, device, tdtype):
        return self._checked(_to_tensor(self.X[start:stop], device, tdtype),
                             lambda i: start + i)

    def _checked(self, Xb, row_of):
        """``Xb`` after the finiteness check of rows read lazily; ``row_of`` maps a
        row of ``Xb`` to its row of ``X`` (for the error)."""
        if self._check_finite and not bool(torch.isfinite(Xb).all()):
            bad = int((~torch.isfinite(Xb)).any(1).nonzero()[0, 0])
            raise _nonfinite_error(self._name, row_of(bad))
        return Xb

    def batches(self, batch_size, *, device, shuffle=False, generator=None, dtype=None):
        n, bs = self.n_samples, max(1, int(batch_size))
        tdtype = self._tdtype(dtype)
        if not shuffle:
            for start in range(0, n, bs):
                yield self._slice(start, min(n, start + bs), device, tdtype)
            return
        if shuffle == "blocks":
            n_blocks = -(-n // bs)
            for b in torch.randperm(n_blocks, generator=generator).tolist():
                start, stop = b * bs, min(n, (b + 1) * bs)
                within = torch.randperm(stop - start, generator=generator)
                Xb = self._slice(start, stop, device, tdtype)
                yield Xb[within.to(Xb.device)]
            return
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, bs):
            idx = perm[start : start + bs].sort().values
            yield self._rows(idx if self.is_torch else idx.numpy(), device, tdtype)

    def ordered(self, batch_size, *, device, dtype=None):
        n, bs = self.n_samples, max(1, int(batch_size))
        tdtype = self._tdtype(dtype)
        for start in range(0, n, bs):
            stop = min(n, start + bs)
            yield start, stop, self._slice(start, stop, device, tdtype)

    def sample(self, n, *, generator, device, dtype=None):
        m = min(int(n), self.n_samples)
        # numpy's sort: torch's CPU sort of tens of thousands of indices is slow
        # when the cores are busy, and this runs at every fit's start
        idx = np.sort(torch.randperm(self.n_samples, generator=generator)[:m].numpy())
        return self._rows(torch.from_numpy(idx) if self.is_torch else idx, device,
                          self._tdtype(dtype))


def _loader_batches(loader, bs):
    """Batches of ``bs`` rows in one pass of a ``DataLoader`` that yields blocks of
    ``loader.batch_size`` rows of a sized dataset (its default sampler), else None."""
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return None
    try:
        n = len(loader.dataset)
    except TypeError:  # an iterable-style dataset: the length is unknown
        return None
    B = int(loader.batch_size)
    last = 0 if loader.drop_last else n % B
    return (n // B) * -(-B // bs) + (-(-last // bs) if last else 0)


class StreamSource(RowSource):
    """An iterable of 2-D batches, validated block by block."""

    is_stream = True
    n_samples = None

    def __init__(self, X, *, estimator, reset, dtype):
        self._X = X
        self._name = type(estimator).__name__
        self.reiterable = not isinstance(X, Iterator)
        it = iter(X)
        first = next(it, None)
        while first is not None and _n_rows(first) == 0:  # empty batches are skipped
            first = next(it, None)
        if first is None:
            raise ValueError(
                f"The iterable of batches given to {self._name} is empty; pass at least "
                "one 2-D batch of shape (n_rows, n_features)."
            )
        first, data_dtype = self._validate(first, estimator, reset=reset)
        names = getattr(estimator, "feature_names_in_", None)
        self._names = None if names is None else [str(c) for c in names]
        self.n_features = int(first.shape[1])
        self._expected = self.n_features
        self.dtype = _resolve_dtype(dtype, data_dtype)
        self._first = first
        self._it = it  # continuation of the first pass
        self._passes = 0

    def n_batches(self, batch_size):
        """Batches of one pass of a list or tuple of blocks (each cut into
        batches of ``batch_size`` rows), or of a torch ``DataLoader`` with a fixed
        batch size over a sized dataset; None for other iterables."""
        bs = max(1, int(batch_size))
        if not isinstance(self._X, (list, tuple)):
            return _loader_batches(self._X, bs)
        try:
            return sum(-(-_n_rows(b) // bs) for b in self._X)
        except (TypeError, ValueError):  # a bad block: reading it raises the clear error
            return None

    def _unwrap(self, block):
        if isinstance(block, (list, tuple)) and len(block) > 0 and isinstance(
            block[0], torch.Tensor
        ):
            return block[0]  # (x, y) / [x] batches of a DataLoader
        if isinstance(block, dict):
            raise ValueError(
                f"A batch given to {self._name} is a dict (keys {sorted(map(str, block))}); "
                "yield the 2-D array or tensor itself, e.g. (b['x'] for b in loader)."
            )
        return block

    def _validate(self, block, estimator, *, reset):
        block = self._unwrap(block)
        if not (sp.issparse(block) or hasattr(block, "ndim") or hasattr(block, "__array__")):
            block = np.asarray(block)
        ndim = getattr(block, "ndim", 2)
        if ndim != 2:
            raise shape_error(ndim, block.shape, self._name)
        block, dtype = check_input(estimator, block, reset=reset)
        return block, dtype

    def _check_block(self, block):
        block = self._unwrap(block)
        columns = getattr(block, "columns", None)
        if columns is not None and self._names is not None:
            got = [str(c) for c in columns]
            if got != self._names:
                pairs = zip(got, self._names, strict=False)
                i = next((i for i, (a, b) in enumerate(pairs) if a != b),
                         min(len(got), len(self._names)))
                seen = repr(got[i]) if i < len(got) else "missing"
                raise ValueError(
                    f"A batch's column {i} is {seen}, but {self._name} is expecting "
                    f"{self._names[i]!r} there (the columns of the first batch); give every "
                    "batch the same columns in the same order."
                    if i < len(self._names) else
                    f"A batch has extra columns {got[i:]}; {self._name} is expecting the "
                    "columns of the first batch."
                )
        if isinstance(block, torch.Tensor) and block.layout != torch.strided:
            block = block.detach().to_dense()  # one batch: densified as a scipy batch is
        if not (sp.issparse(block) or isinstance(block, torch.Tensor)):
            block = np.asarray(block)
        if block.ndim != 2:
            raise shape_error(block.ndim, block.shape, self._name)
        if block.shape[1] != self._expected:
            raise ValueError(
                f"A batch has {block.shape[1]} features, but {self._name} is expecting "
                f"{self._expected} features as input (from the first batch)."
            )
        kind = "c" if isinstance(block, torch.Tensor) and block.is_complex() else (
            "f" if isinstance(block, torch.Tensor) else block.dtype.kind)
        if kind == "O":  # numbers held as objects (pandas): converted as the first block is
            try:
                block, kind = np.asarray(block, dtype=np.float64), "f"
            except (TypeError, ValueError):
                pass
        if kind not in "fiub":
            raise ValueError(
                f"A batch has dtype {block.dtype}, but {self._name} needs real numbers in "
                "every batch (as in the first)."
            )
        if block.shape[0] == 0:
            return None
        return block

    def _blocks(self):
        if self._passes == 0:
            self._passes = 1
            yield self._first
            yield from self._it
            return
        if not self.reiterable:
            raise ValueError(
                f"{self._name} was given a one-pass iterator, which has been read; pass a "
                "list of batches or a re-iterable (e.g. a DataLoader) to read it again."
            )
        self._passes += 1
        yield from iter(self._X)

    def batches(self, batch_size, *, device, shuffle=False, generator=None, dtype=None):
        bs = max(1, int(batch_size))
        tdtype = self._tdtype(dtype)
        for block in self._blocks():
            block = self._check_block(block)
            if block is None:
                continue
            Xb = _to_tensor(block, device, tdtype)
            if not bool(torch.isfinite(Xb).all()):
                raise _nonfinite_error(self._name)
            for s in range(0, Xb.shape[0], bs):
                yield Xb[s : s + bs]

    def sample(self, n, *, generator, device, dtype=None):
        Xb = _to_tensor(self._first, device, self._tdtype(dtype))
        if not bool(torch.isfinite(Xb).all()):
            raise _nonfinite_error(self._name)
        m = min(int(n), Xb.shape[0])
        idx = torch.randperm(Xb.shape[0], generator=generator)[:m].sort().values
        return Xb[idx.to(Xb.device)]


class DaskSource(RowSource):
    """A row-chunked ``dask.array.Array``, read block by block.

    ``batches`` computes one block at a time (a dask scheduler or a
    ``distributed`` client does the work) and checks it for NaN / infinity,
    naming the block when it fails. Shuffling visits the blocks in a random
    order and permutes the rows within each block (the ``"blocks"`` order of a
    memory map: a dask array is never gathered whole). The distributed
    learners in :mod:`skdict.distributed` map work over :attr:`blocks` instead
    of reading batches.
    """

    is_dask = True

    def __init__(self, X, dtype, *, name):
        self.X = X
        self.n_samples = int(X.shape[0])
        self.n_features = int(X.shape[1])
        self.dtype = np.dtype(dtype)
        self._name = name
        sizes = [int(c) for c in X.chunks[0]]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def n_blocks(self):
        return len(self.offsets) - 1

    def block_range(self, i):
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def blocks(self):
        """The row blocks as dask arrays (``X.blocks[i, 0]``)."""
        return [self.X.blocks[i, 0] for i in range(self.n_blocks)]

    def _block(self, i, device, tdtype):
        start, stop = self.block_range(i)
        block = check_block_finite(self.X.blocks[i, 0].compute(), i, start, stop, self._name)
        return _to_tensor(block, device, tdtype)

    def batches(self, batch_size, *, device, shuffle=False, generator=None, dtype=None):
        bs = max(1, int(batch_size))
        tdtype = self._tdtype(dtype)
        order = (torch.randperm(self.n_blocks, generator=generator).tolist() if shuffle
                 else range(self.n_blocks))
        rest = None  # rows carried over, so that every batch but the last has bs rows
        for i in order:
            start, stop = self.block_range(i)
            if stop == start:
                continue
            Xb = self._block(i, device, tdtype)
            if shuffle:
                Xb = Xb[torch.randperm(stop - start, generator=generator).to(Xb.device)]
            if rest is not None:
                Xb = torch.cat([rest, Xb])
            full = Xb.shape[0] - Xb.shape[0] % bs
            for s in range(0, full, bs):
                yield Xb[s : s + bs]
            rest = Xb[full:] if full < Xb.shape[0] else None
        if rest is not None:
            yield rest

    def ordered(self, batch_size, *, device, dtype=None):
        bs, tdtype = max(1, int(batch_size)), self._tdtype(dtype)
        for i in range(self.n_blocks):
            start, stop = self.block_range(i)
            if stop == start:
                continue
            Xb = self._block(i, device, tdtype)
            for s in range(0, Xb.shape[0], bs):
                yield start + s, start + min(s + bs, Xb.shape[0]), Xb[s : s + bs]

    def sample(self, n, *, generator, device, dtype=None):
        m = min(int(n), self.n_samples)
        idx = np.sort(torch.randperm(self.n_samples, generator=generator)[:m].numpy())
        rows = self.X[idx].compute()
        if not np.isfinite(rows.data if sp.issparse(rows) else rows).all():
            bad = np.flatnonzero(~np.isfinite(np.asarray(
                rows.toarray() if sp.issparse(rows) else rows)).all(1))[0]
            i = int(np.searchsorted(self.offsets, idx[bad], side="right") - 1)
            check_block_finite(np.array([np.nan]), i, *self.block_range(i), self._name)
        return _to_tensor(rows, device, self._tdtype(dtype))


def _dask_source(X, *, estimator, reset, dtype):
    """Validate a dask array's metadata (nothing is computed) and wrap it."""
    name = type(estimator).__name__
    if X.ndim != 2:
        raise shape_error(X.ndim, X.shape, name)
    if any(np.isnan(c) for c in X.chunks[0]) or any(np.isnan(c) for c in X.shape):
        raise ValueError(
            f"{name} was given a dask array with unknown chunk sizes (shape {X.shape}); "
            "call X.compute_chunk_sizes() first (or build it with known lengths, e.g. "
            "dask_dataframe.to_dask_array(lengths=True))."
        )
    if len(X.chunks[1]) > 1:
        raise ValueError(
            f"{name} reads whole rows block by block, but this dask array is chunked "
            f"along its columns too (column chunks {X.chunks[1]}); rechunk it into row "
            "blocks first: X = X.rechunk({1: -1})."
        )
    data_dtype = _check_lazy_2d(X, estimator, reset, "dask array")
    return DaskSource(X, _resolve_dtype(dtype, data_dtype), name=name)


def _check_lazy_2d(X, estimator, reset, kind):
    """Shape, dtype and feature count of an array that is not read here (a memmap
    or a dask array: finiteness is checked per batch); returns its data dtype."""
    name = type(estimator).__name__
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(
            f"Found array with shape {X.shape}; {name} needs at least 1 sample and 1 feature."
        )
    if X.dtype.kind not in "fiub":
        raise ValueError(f"{name} needs a numeric {kind}, got dtype {X.dtype}.")
    if reset:
        estimator.n_features_in_ = int(X.shape[1])
        if hasattr(estimator, "feature_names_in_"):
            del estimator.feature_names_in_
    else:
        check_n_features(estimator, int(X.shape[1]))
    return X.dtype if X.dtype in (np.float32, np.float64) else np.float64


def as_source(X, *, estimator, reset, dtype=None, allow_stream=True,
              finite="all") -> RowSource:
    """Validate ``X`` at the estimator boundary and wrap it as a :class:`RowSource`.

    Parameters
    ----------
    X : array-like, np.memmap, sparse matrix, torch.Tensor, dask array or iterable \
of batches
    estimator : estimator
        Records ``n_features_in_`` (and ``feature_names_in_``) when ``reset``,
        checks the feature count otherwise; its class name appears in errors.
    reset : bool
    dtype : numpy or torch dtype, optional
        Compute dtype; None keeps the input's float32 / float64 (other dtypes
        become float64).
    allow_stream : bool, default=True
        Accept iterables of batches (training); transforms pass False.
    finite : {"all", "read"}, default="all"
        When an in-memory array is checked for NaN / infinity: all of it now, or
        only the rows read, as they are read (a training run of a few steps
        over a large array then does not pay for a pass over all of it). A
        memory map, a dask array and a stream are always checked as read.
    """
    name = type(estimator).__name__
    if isinstance(X, (list, tuple)) and len(X) == 0:
        raise ValueError(
            f"{name} was given an empty {type(X).__name__}; pass a 2-D array of shape "
            "(n_samples, n_features) or a non-empty list of such batches."
        )
    if is_dask(X):
        return _dask_source(X, estimator=estimator, reset=reset, dtype=dtype)
    if is_stream(X):
        if not allow_stream:
            raise ValueError(
                f"{name} needs one array here, got an iterable of batches "
                f"({type(X).__name__}); call it on each batch instead."
            )
        return StreamSource(X, estimator=estimator, reset=reset, dtype=dtype)
    if isinstance(X, np.memmap):
        # shape and dtype now, finiteness per batch: a memmap is never read whole here
        if X.ndim != 2:
            raise shape_error(X.ndim, X.shape, name)
        data_dtype = _check_lazy_2d(X, estimator, reset, "memmap")
        return ArraySource(X, _resolve_dtype(dtype, data_dtype), name=name,
                           check_finite_per_batch=True)
    if finite not in ("all", "read"):
        raise ValueError(f"finite must be 'all' or 'read', got {finite!r}.")
    lazy = finite == "read"
    X, data_dtype = check_input(estimator, X, reset=reset, ensure_finite=not lazy)
    return ArraySource(X, _resolve_dtype(dtype, data_dtype), name=name,
                       check_finite_per_batch=lazy)

