"""Sparse coding as functions.

:func:`sparse_encode` is the validated public entry point (scikit-learn's
``sklearn.decomposition.sparse_encode`` with skdict's algorithms, on torch).
Its unchecked per-block twins run inside estimators' loops:
:func:`encode_block` (one torch block against an operator -> ``SolverResult``),
:func:`encode_codes` (-> :class:`~skdict.data.codes.Codes`, CSR pieces straight
from the compiled kernel on the CPU exact path) and :class:`BlockEncoder`, a
picklable callable mapping a block of rows to CSR codes (``transform``, Dask).
"""

from __future__ import annotations

import copy
import numbers
import os
import sys
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

from ._backend import default_batch_size, numpy_dtype, resolve_device, torch_dtype
from ._validation import (
    DEVICE_CONSTRAINT,
    check_dictionary,
    check_n_nonzero_coefs,
    feature_probe,
)
from .data.codes import Codes, CSRBuilder
from .data.sources import ArraySource, as_source
from .operators import DenseOperator, as_operator
from .solvers import SolverResult
from .solvers.exact import lasso_exact_compact
from .solvers.registry import get_solver, solver_names

__all__ = ["sparse_encode", "encode_block", "encode_codes", "BlockEncoder", "BlockTransformer",
           "ConvergenceRecord"]


def encode_block(
    Xb,
    op,
    *,
    algorithm,
    alpha,
    positive=False,
    n_nonzero_coefs=None,
    max_iter=1000,
    tol=1e-5,
    tau=None,
    threshold="soft",
    init=None,
    objective=False,
) -> SolverResult:
    """Codes of one block ``Xb`` (a torch tensor on the operator's device and
    dtype) by the registered solver ``algorithm``; no input validation.

    ``init`` warm-starts the solver (LCA: potentials; others: codes).
    ``objective=True``: the exact solver also fills ``result.objective`` (each
    row's lasso objective); the other algorithms leave it None. Parameters a
    solver does not use (``tau`` for FISTA, ``alpha`` for OMP ...) are ignored.
    """
    spec = get_solver(algorithm)
    spec.check(op)
    return spec(
        op.adjoint(Xb),
        op,
        alpha=float(alpha),
        # float64: squared norms of float32 rows near 1e19 overflow float32, which
        # would break the relative stopping criteria
        xnorm2=(Xb.double() ** 2).sum(1),
        positive=positive,
        n_nonzero_coefs=n_nonzero_coefs,
        max_iter=max_iter,
        tol=tol,
        tau=tau,
        threshold=threshold,
        init=init,
        objective=objective,
    )


# rows per block of the CPU exact path: the kernel's fixed-width output of a block
# (rows x (n_features + 1) indices and values) and the block's correlations stay
# within ~4 MB
_EXACT_BLOCK_BYTES = 4 * 2**20
# float32 calls of at most this many rows take the fused path (measured on 8x8
# patches, 256 atoms, 2 threads: 10% faster at 1k rows and L0 ~5, within +-3%
# either way from 2k rows up)
_FUSED_MAX_ROWS = 2048


def encode_codes(
    Xb,
    op,
    *,
    algorithm,
    alpha,
    positive=False,
    n_nonzero_coefs=None,
    max_iter=1000,
    tol=1e-5,
    tau=None,
    threshold="soft",
    init=None,
    record=None,
) -> Codes:
    """Codes of one block in the form transforms consume: CSR pieces for the exact
    lasso of a dense dictionary on CPU (the compiled homotopy writes supports
    directly: no dense ``(b, K)`` codes; it starts from zero, so ``init`` is not
    used there), else the dense codes of :func:`encode_block` (same arguments).
    ``record``: a :class:`ConvergenceRecord` that notes the solver's convergence."""
    if algorithm == "exact" and Xb.device.type == "cpu" and isinstance(op, DenseOperator):
        return _exact_cpu_codes(Xb, op, float(alpha), positive)
    res = encode_block(Xb, op, algorithm=algorithm, alpha=alpha, positive=positive,
                       n_nonzero_coefs=n_nonzero_coefs, max_iter=max_iter, tol=tol, tau=tau,
                       threshold=threshold, init=init)
    if record is not None:
        record.add(res)
    return Codes(dense=res.codes)


def _exact_cpu_codes(Xb, op, alpha, positive):
    from .data._compact import compact_fixed_width

    D = op.D
    n, K = Xb.shape[0], op.n_atoms
    step = max(64, _EXACT_BLOCK_BYTES // (K * Xb.element_size()))
    # float64: the kernel forms each chunk's correlations itself, in its workers
    # (after the kernel has run, MKL's float64 GEMM of a block takes about twice
    # its time in isolation); float32: MKL's GEMM, into one buffer (the compiled
    # tiles are slower than MKL's sgemm on short float32 dot products), except
    # for small calls, where the separate GEMM pass costs more than it saves
    fused = Xb.dtype == torch.float64 or n <= _FUSED_MAX_ROWS
    buf = None if fused else torch.empty(min(step, n), K, dtype=Xb.dtype)
    parts = []
    for s in range(0, n, step):
        Cb = Xb[s : s + step]
        if not fused:
            # torch's GEMM, not numpy's: OpenBLAS threads keep spinning after a
            # call and slow the compiled kernel that follows
            with torch.no_grad():
                Cb = torch.matmul(Cb, D.T, out=buf[: Cb.shape[0]])
        idx, val, *_ = lasso_exact_compact(
            Cb, op.gram(), alpha, positive=positive, gram64=op.gram64(), gram_f32=op.gram64_f32(),
            n_features=op.n_features, dictionary=D if fused else None,
        )
        parts.append(compact_fixed_width(idx.numpy(), val.numpy(), K, leading=True))
    if len(parts) == 1:
        return Codes(csr=parts[0])
    if not parts:
        return Codes(csr=(Xb.new_zeros(0).numpy(), np.zeros(0, np.int32), np.zeros(0, np.int64)))
    return Codes(csr=tuple(np.concatenate(p) for p in zip(*parts, strict=True)))


class ConvergenceRecord:
    """Whether every solver call of one public call met its tolerance.

    A public call (``sparse_encode``, ``transform``, ``score``) notes each
    block's :class:`~skdict.solvers.SolverResult` and, at its end, :meth:`warn`
    emits one scikit-learn ``ConvergenceWarning`` when some block stopped at
    the iteration cap, as ``Lasso`` does.
    """

    def __init__(self):
        self.converged = True
        self.worst = 0.0

    def add(self, res):
        if not res.converged:
            self.converged = False
            if res.history:
                self.worst = max(self.worst, float(res.history[-1]))

    def warn(self, owner, algorithm, *, max_iter, tol, max_iter_name="max_iter",
             tol_name="tol"):
        if self.converged:
            return
        warnings.warn(
            f"{owner}: algorithm={algorithm!r} stopped at {max_iter_name}={max_iter} before "
            f"reaching {tol_name}={tol} on some rows (largest remaining criterion "
            f"{self.worst:.3g}); the codes are not optimal. Increase {max_iter_name} (or "
            "use algorithm 'exact' for the lasso).",
            ConvergenceWarning,
            stacklevel=_caller_level(),
        )


def _caller_level():
    """``stacklevel`` of the first frame outside skdict and scikit-learn (whose
    wrappers, e.g. set_output's, sit between the user and the estimator)."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(2), 2  # the frame calling ConvergenceRecord.warn
    while frame is not None and (frame.f_code.co_filename.startswith(pkg)
                                 or f"{os.sep}sklearn{os.sep}" in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


@validate_params(
    {
        "X": ["array-like", "sparse matrix", torch.Tensor],
        "dictionary": ["array-like", torch.Tensor],
        "algorithm": [StrOptions(set(solver_names()))],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "n_nonzero_coefs": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "positive": ["boolean"],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "init": ["array-like", torch.Tensor, None],
        "device": DEVICE_CONSTRAINT,
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
    },
    prefer_skip_nested_validation=True,
)
def sparse_encode(
    X,
    dictionary,
    *,
    algorithm="exact",
    alpha=1.0,
    n_nonzero_coefs=None,
    positive=False,
    max_iter=1000,
    tol=1e-5,
    init=None,
    device="auto",
    batch_size=None,
):
    """Sparse codes of the rows of ``X`` against a fixed dictionary.

    Each row ``x`` is encoded as the solution of::

        argmin_a  0.5 * ||x - a @ dictionary||^2 + alpha * ||a||_1

    (scikit-learn's ``sparse_encode`` / ``SparseCoder`` convention; the atoms
    need not have unit norm), or greedily with ``n_nonzero_coefs`` atoms by
    ``"omp"``.

    Parameters
    ----------
    X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)
        Data. float32 stays float32; other dtypes are computed in float64. A
        torch tensor is read on its own device batch by batch.
    dictionary : array-like or torch.Tensor of shape (n_components, n_features)
        Atoms as rows.
    algorithm : str, default="exact"
        A registered solver (:func:`skdict.solvers.solver_names`): ``"exact"``
        (KKT-certified optimum), ``"fista"`` / ``"ista"`` (proximal gradient,
        stopped on the relative duality gap ``tol``), ``"lca"`` (Locally
        Competitive Algorithm), ``"omp"`` (orthogonal matching pursuit,
        ``alpha`` unused).
    alpha : float, default=1.0
        L1 weight (>= 0).
    n_nonzero_coefs : int, default=None
        Atoms per row for ``"omp"`` (at most ``n_components``); None means
        ``max(1, n_features // 10)``, as in scikit-learn.
    positive : bool, default=False
        Constrain the codes to be non-negative.
    max_iter : int, default=1000
        Iterations of the iterative algorithms.
    tol : float, default=1e-5
        Relative duality gap at which the iterative algorithms stop.
    init : array-like of shape (n_samples, n_components), default=None
        Warm start of the iterative and exact solvers.
    device : str or torch.device, default="auto"
        "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
    batch_size : int, default=None
        Rows encoded at a time; None picks ~64 MB of dense codes per batch.

    Returns
    -------
    codes : ndarray of shape (n_samples, n_components)
        Dense codes, in the dtype of ``X`` (float32 or float64).

    See Also
    --------
    skdict.SparseCoder : the same as a scikit-learn transformer (CSR output).
    sklearn.decomposition.sparse_encode : the CPU reference.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict.functional import sparse_encode
    >>> D = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> sparse_encode(np.array([[3.0, -0.5]]), D, alpha=1.0, device="cpu")
    array([[2., 0.]])
    """
    D = check_dictionary(dictionary)
    src = as_source(X, estimator=feature_probe(D.shape[1], "sparse_encode"),
                    reset=False, allow_stream=False)
    n, K, dtype = src.n_samples, D.shape[0], src.dtype
    spec = get_solver(algorithm)
    if spec.problem == "l0":
        check_n_nonzero_coefs(n_nonzero_coefs, K)
    if init is not None:
        if isinstance(init, torch.Tensor):
            init = init.detach().cpu().numpy()
        init = np.asarray(init)
        if init.shape != (n, K):
            raise ValueError(
                f"init must have shape (n_samples, n_components) = {(n, K)}, got {init.shape}."
            )
        if not np.all(np.isfinite(init)):
            raise ValueError("init contains NaN or infinity.")
    dev = resolve_device(device)
    op = as_operator(D, dev, dtype)
    bs = int(batch_size) if batch_size is not None else default_batch_size(K, dtype)
    out = np.zeros((n, K), dtype=dtype)
    params = dict(algorithm=algorithm, alpha=alpha, positive=positive,
                  n_nonzero_coefs=n_nonzero_coefs, max_iter=max_iter, tol=tol)
    record = ConvergenceRecord()
    for s, _, Xb in src.ordered(bs, device=dev):
        if init is None:
            codes = encode_codes(Xb, op, record=record, **params).to_dense(K)
        else:
            a0 = torch.from_numpy(np.ascontiguousarray(init[s : s + bs], dtype=dtype)).to(dev)
            res = encode_block(Xb, op, init=a0, **params)
            record.add(res)
            codes = res.codes
        out[s : s + Xb.shape[0]] = codes.detach().cpu().numpy()
    record.warn("sparse_encode", algorithm, max_iter=max_iter, tol=tol)
    return out


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64), torch.float32, torch.float64)


class BlockEncoder:
    """A picklable per-block encoder: ``enc(X_block) -> CSR codes``.

    Holds the dictionary and the encoding parameters; the operator (Gram,
    Lipschitz constant ...) is built on first use for the block's device and
    dtype, kept for the following blocks and dropped when pickled (so a pickle
    carries only the dictionary and the parameters, e.g. to Dask workers).
    No validation: give it float blocks with the dictionary's number of features.

    Parameters
    ----------
    components : array-like or torch.Tensor of shape (n_components, n_features)
    algorithm : str, default="exact"
        A registered solver name.
    device : str or torch.device, default="auto"
        Where ``__call__`` encodes (``codes`` uses the block's own device).
    dtype : numpy or torch float dtype, default=None
        Compute dtype of ``__call__``; None: the block's (float32 or float64).
    batch_size : int, default=None
        Rows per solver call in ``__call__``.
    param_names : dict, default=None
        The caller's names for ``max_iter`` and ``tol`` in the convergence
        warning (e.g. ``{"max_iter": "transform_max_iter"}``).
    **params
        ``alpha``, ``positive``, ``n_nonzero_coefs``, ``max_iter``, ``tol``,
        ``tau``, ``threshold`` as in :func:`encode_block`.
    """

    def __init__(self, components, algorithm="exact", *, device="auto", dtype=None,
                 batch_size=None, param_names=None, **params):
        get_solver(algorithm)  # an unknown name fails here, not on the first block
        self.components = components
        self.algorithm = algorithm
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.param_names = dict(param_names or {})
        self.params = params
        self._ops = {}
        self.record = ConvergenceRecord()

    def report(self, owner):
        """Warn (once) when a block's solver stopped before its tolerance since the
        last report, and start a new record."""
        names = self.param_names
        # encode_codes' defaults when the caller did not set them
        self.record.warn(owner, self.algorithm, max_iter=self.params.get("max_iter", 1000),
                         tol=self.params.get("tol", 1e-5),
                         max_iter_name=names.get("max_iter", "max_iter"),
                         tol_name=names.get("tol", "tol"))
        self.record = ConvergenceRecord()

    @property
    def n_components(self):
        return int(self.components.shape[0])

    def operator(self, device, dtype):
        """The (cached) dictionary operator on ``device`` in ``dtype``."""
        key = (str(torch.device(device)), torch_dtype(dtype))
        op = self._ops.get(key)
        if op is None:
            op = self._ops[key] = as_operator(self.components, torch.device(device), dtype)
        return op

    def codes(self, Xb) -> Codes:
        """Codes of one torch block (on any device; float32 or float64)."""
        op = self.operator(Xb.device, Xb.dtype)
        return encode_codes(Xb, op, algorithm=self.algorithm, record=self.record, **self.params)

    def __call__(self, X):
        """CSR codes (scikit-learn's sparse interface) of a block ``X`` (ndarray,
        scipy sparse or torch tensor)."""
        if self.dtype is not None:
            dtype = numpy_dtype(self.dtype)
        else:
            dtype = X.dtype if isinstance(X, torch.Tensor) else np.dtype(X.dtype)
            dtype = numpy_dtype(dtype) if dtype in _FLOATS else np.dtype(np.float64)
        src = ArraySource(X, dtype, name=type(self).__name__)  # unchecked by design
        dev = resolve_device(self.device)
        K = self.n_components
        builder = CSRBuilder(K, dtype)
        for Xb in src.batches(self.batch_size or default_batch_size(K, dtype), device=dev):
            self.codes(Xb).add_to(builder)
        self.report(type(self).__name__)
        return builder.build()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ops"] = {}
        if isinstance(self.components, torch.Tensor):
            state["components"] = self.components.detach().cpu()
        return state


# fitted state that per-block work never reads: training statistics, history
_TRAINING_ONLY = ("_train_state", "_resume", "history_", "loss_curve_")


class BlockTransformer:
    """A picklable per-block twin of a fitted estimator: ``transform``,
    ``inverse_transform`` and the batch reduce behind ``score`` of one block.

    Holds a copy of the estimator without its training state (statistics,
    optimizer moments, history), so a pickle carries the fitted arrays and
    parameters only (e.g. to Dask workers, once per call). What the estimator
    prepares per call (dictionary on the device, Gram matrix, routing index) is
    built on first use and kept for the following blocks, never pickled.
    No validation of the blocks beyond the estimator's own.

    Parameters
    ----------
    estimator : fitted skdict estimator
    """

    def __init__(self, estimator):
        est = copy.copy(estimator)
        for attr in _TRAINING_ONLY:
            est.__dict__.pop(attr, None)
        if "callbacks" in est.__dict__:  # a parameter (validated per call), never pickled
            est.callbacks = None
        self.estimator = est
        self._cache = {}

    def transform(self, X, sparse_output=None):
        """Codes of one block (CSR, or dense with ``sparse_output=False``)."""
        return self.estimator._transform_impl(X, sparse_output=sparse_output,
                                              cache=self._cache)

    def inverse_transform(self, codes):
        """Reconstruction of one block of codes (dense)."""
        return self.estimator.inverse_transform(codes)

    def reduce(self, X, sums=None, fn=None):
        """``(totals, n_samples, n_features)`` of one block (see
        ``SparseCodingMixin._reduce``); ``fn`` is the name of an estimator method."""
        fn = None if fn is None else getattr(self.estimator, fn)
        return self.estimator._reduce(X, sums, fn=fn, cache=self._cache)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state
