"""Sparse coding against a fixed dictionary: :class:`SparseCoder` and the shared
batch encoder used by every lasso-type estimator in skdict."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions

from ._backend import torch_dtype
from .base import BaseSparseCoder, check_input
from .data.codes import Codes
from .solvers import fista, ista, lasso_exact, lca, omp, power_iteration
from .solvers.exact import lasso_exact_compact

__all__ = [
    "SparseCoder",
    "encode_batch",
    "encode_codes",
    "transform_state",
    "prepare_dictionary",
    "LASSO_ALGORITHMS",
]

LASSO_ALGORITHMS = ("exact", "fista", "ista", "lca")
ALGORITHMS = LASSO_ALGORITHMS + ("omp",)


def prepare_dictionary(components, device, dtype, *, need_L=True):
    """Tensors the encoders need, computed once per call: ``D``, ``G = D D^T``,
    the Lipschitz constant ``L`` (largest eigenvalue of ``G``; None when
    ``need_L=False``, e.g. for the exact solver, which needs no step size) and
    a float64 Gram ``G64`` for the exact solver's face solves.

    ``components`` may be an array or a torch tensor (moved, not round-tripped
    through the host)."""
    if isinstance(components, torch.Tensor):
        D = components.to(device=device, dtype=torch_dtype(dtype))
    else:
        D = torch.as_tensor(np.asarray(components), dtype=torch_dtype(dtype)).to(device)
    G = D @ D.T
    L = power_iteration(G.double() if G.dtype == torch.float32 else G) if need_L else None
    # the exact solver's float64 face solves use a float64 Gram (cheap: K x K)
    G64 = (D.double() @ D.double().T) if D.dtype != torch.float64 else G
    return {"D": D, "G": G, "L": L, "G64": G64}


def transform_state(components, algorithm, device, dtype):
    """:func:`prepare_dictionary` for a transform with ``algorithm``: the CPU exact
    path needs no step size (the GPU one warm-starts with FISTA, which does)."""
    need_L = algorithm != "exact" or torch.device(device).type != "cpu"
    return prepare_dictionary(components, device, dtype, need_L=need_L)


def encode_batch(
    Xb,
    state,
    *,
    algorithm="exact",
    alpha=1.0,
    n_nonzero_coefs=None,
    positive=False,
    max_iter=1000,
    tol=1e-6,
    tau=None,
    threshold="soft",
    init=None,
    objective=False,
):
    """Encode one batch (a torch tensor on the dictionary's device).

    Returns the :class:`~skdict.solvers.SolverResult` of the chosen solver.
    ``init`` warm-starts iterative solvers (LCA: potentials; others: codes).
    ``objective=True``: the exact solver also fills ``result.objective`` (each
    row's lasso objective); the other algorithms leave it None.
    """
    D, G, L = state["D"], state["G"], state["L"]
    C = Xb @ D.T
    alpha = float(alpha)
    xnorm2 = (Xb * Xb).sum(1)
    if algorithm == "exact":
        # with xnorm2 the solver also returns each row's objective (an extra K x K
        # product on the active-set path), so only when the caller asks for it
        return lasso_exact(C, G, alpha, xnorm2=xnorm2 if objective else None, L=L, a0=init,
                           positive=positive, gram64=state.get("G64"), n_features=D.shape[1])
    if algorithm == "fista":
        return fista(
            C,
            G,
            alpha,
            xnorm2=xnorm2,
            L=L,
            a0=init,
            positive=positive,
            max_iter=max_iter,
            tol=tol,
        )
    if algorithm == "ista":
        return ista(
            C,
            G,
            alpha,
            xnorm2=xnorm2,
            L=L,
            a0=init,
            positive=positive,
            max_iter=max_iter,
            tol=tol,
        )
    if algorithm == "lca":
        return lca(
            C,
            G,
            alpha,
            xnorm2=xnorm2,
            tau=tau,
            L=L,
            threshold=threshold,
            positive=positive,
            max_iter=max_iter,
            tol=tol,
            u0=init,
        )
    if algorithm == "omp":
        k = n_nonzero_coefs if n_nonzero_coefs is not None else max(1, D.shape[1] // 10)
        return omp(C, G, k, xnorm2=xnorm2, positive=positive)
    raise ValueError(f"Unknown algorithm {algorithm!r}; use one of {ALGORITHMS}.")


# rows per block of the CPU exact path: the kernel's fixed-width output of a block
# (rows x (n_features + 1) indices and values) and the block's correlations stay
# within ~4 MB
_EXACT_BLOCK_BYTES = 4 * 2**20


def encode_codes(Xb, state, *, algorithm="exact", alpha=1.0, positive=False, **kwargs):
    """Codes of one batch in the form transforms consume: CSR pieces (a
    :class:`~skdict.data.codes.Codes` with ``csr``) for the exact lasso on CPU (the
    compiled homotopy writes supports directly: no dense ``(b, K)`` codes), else
    the dense codes of :func:`encode_batch`."""
    if algorithm == "exact" and Xb.device.type == "cpu":
        from .data._compact import compact_fixed_width

        D = state["D"]
        n, K = Xb.shape[0], D.shape[0]
        step = max(64, _EXACT_BLOCK_BYTES // (K * Xb.element_size()))
        # float64: the kernel forms each chunk's correlations itself, in its
        # workers (after the kernel has run, MKL's float64 GEMM of a block takes
        # about twice its time in isolation: 20-24 vs 11 ms per 20k rows on two
        # cores); float32: MKL's GEMM, into one buffer (the compiled tiles are
        # slower than MKL's sgemm on short float32 dot products)
        fused = Xb.dtype == torch.float64
        buf = None if fused else torch.empty(min(step, n), K, dtype=Xb.dtype)
        parts = []
        for s in range(0, n, step):
            Cb = Xb[s : s + step]
            if not fused:
                # (torch's GEMM, not numpy's: OpenBLAS threads keep spinning after
                # a call and slow the compiled kernel that follows by ~25% on two cores)
                with torch.no_grad():
                    Cb = torch.matmul(Cb, D.T, out=buf[: Cb.shape[0]])
            idx, val, *_ = lasso_exact_compact(
                Cb, state["G"], float(alpha), positive=positive, gram64=state.get("G64"),
                n_features=D.shape[1], dictionary=D if fused else None,
            )
            parts.append(compact_fixed_width(idx.numpy(), val.numpy(), K, leading=True))
        if len(parts) == 1:
            return Codes(csr=parts[0])
        if not parts:
            return Codes(csr=(Xb.new_zeros(0).numpy(), np.zeros(0, np.int32),
                               np.zeros(0, np.int64)))
        return Codes(csr=tuple(np.concatenate(p) for p in zip(*parts, strict=True)))
    return encode_batch(Xb, state, algorithm=algorithm, alpha=alpha, positive=positive,
                        **kwargs).codes


def _check_dictionary(dictionary):
    if isinstance(dictionary, torch.Tensor):
        dictionary = dictionary.detach().cpu().numpy()
    D = np.asarray(dictionary)
    if D.ndim != 2:
        raise ValueError(f"dictionary must be 2-D (n_components, n_features), got shape {D.shape}.")
    if D.shape[0] < 1 or D.shape[1] < 1:
        raise ValueError(f"dictionary must be non-empty, got shape {D.shape}.")
    if D.dtype.kind not in "fiu":
        raise ValueError(f"dictionary must be numeric, got dtype {D.dtype}.")
    if not np.all(np.isfinite(D)):
        raise ValueError("dictionary contains NaN or infinity.")
    return D


class SparseCoder(BaseSparseCoder):
    """Sparse coding of data against a fixed dictionary, on torch.

    Each row ``x`` is encoded as the solution of::

        argmin_a  0.5 * ||x - a @ dictionary||^2 + alpha * ||a||_1

    (scikit-learn's ``SparseCoder`` / ``DictionaryLearning`` convention, SPAMS'
    ``lambda1``), or greedily with ``n_nonzero_coefs`` atoms for ``"omp"``.
    There is nothing to learn: ``fit`` only validates its input.

    Parameters
    ----------
    dictionary : array-like or torch.Tensor of shape (n_components, n_features)
        Atoms as rows. They need not have unit norm.
    algorithm : {"exact", "fista", "ista", "lca", "omp"}, default="exact"
        ``"exact"``: active-set solver certified by the KKT conditions (reaches the
        optimum to ~1e-7 relative objective in float64). ``"fista"`` / ``"ista"``:
        proximal gradient stopped on the relative duality gap ``tol``. ``"lca"``:
        the Locally Competitive Algorithm (soft threshold, so its fixed point is
        the lasso solution). ``"omp"``: orthogonal matching pursuit with
        ``n_nonzero_coefs`` atoms (``alpha`` is not used).
    alpha : float, default=1.0
        L1 weight (>= 0).
    n_nonzero_coefs : int, default=None
        Atoms per row for ``"omp"``; None means ``max(1, n_features // 10)``.
    positive_code : bool, default=False
        Constrain codes to be non-negative.
    max_iter : int, default=1000
        Iterations for the iterative algorithms.
    tol : float, default=1e-5
        Relative duality gap at which iterative algorithms stop (floored at
        ``20 * eps`` of the data's dtype).
    device : str or torch.device, default="auto"
        "auto" (CUDA when available), "cpu", "cuda", "cuda:N" or a torch.device.
    sparse_output : bool, default=True
        Return codes as scipy CSR (``csr_matrix``, or ``csr_array`` under
        scikit-learn's ``sparse_interface="sparray"``); dense ndarray otherwise.
    batch_size : int, default=None
        Rows encoded at a time; None picks ~64 MB of dense codes per batch.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The dictionary, as an array.
    n_components_ : int
    n_features_in_ : int

    See Also
    --------
    LCASparseCoder : learns the dictionary with LCA inference.
    sklearn.decomposition.SparseCoder : the CPU reference.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import SparseCoder
    >>> rng = np.random.default_rng(0)
    >>> D = rng.standard_normal((8, 5))
    >>> D /= np.linalg.norm(D, axis=1, keepdims=True)
    >>> X = rng.standard_normal((4, 5))
    >>> coder = SparseCoder(D, alpha=0.5, device="cpu")
    >>> codes = coder.fit_transform(X)
    >>> codes.shape
    (4, 8)
    """

    _parameter_constraints: dict = {
        **BaseSparseCoder._parameter_constraints,
        "dictionary": ["array-like", torch.Tensor],
        "algorithm": [StrOptions(set(ALGORITHMS))],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "n_nonzero_coefs": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "positive_code": ["boolean"],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
    }

    def __init__(
        self,
        dictionary,
        *,
        algorithm="exact",
        alpha=1.0,
        n_nonzero_coefs=None,
        positive_code=False,
        max_iter=1000,
        tol=1e-5,
        device="auto",
        sparse_output=True,
        batch_size=None,
    ):
        self.dictionary = dictionary
        self.algorithm = algorithm
        self.alpha = alpha
        self.n_nonzero_coefs = n_nonzero_coefs
        self.positive_code = positive_code
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.sparse_output = sparse_output
        self.batch_size = batch_size

    # The dictionary is the model: these are derived, not learned.
    @property
    def components_(self):
        return _check_dictionary(self.dictionary)

    @property
    def n_components_(self):
        return self.components_.shape[0]

    @property
    def n_features_in_(self):
        return self.components_.shape[1]

    def _check_ready(self):
        self._validate_params()
        if self.algorithm == "omp" and self.n_nonzero_coefs is not None:
            if self.n_nonzero_coefs > self.n_components_:
                raise ValueError(
                    f"n_nonzero_coefs={self.n_nonzero_coefs} exceeds the "
                    f"{self.n_components_} atoms of the dictionary."
                )
        self._device()

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Validate ``X`` against the dictionary; nothing is learned.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        self
        """
        self._check_ready()
        check_input(self, X, reset=False)
        return self

    def _transform_state(self, device, dtype):
        return transform_state(self.components_, self.algorithm, device, dtype)

    def _encode(self, Xb, state):
        return encode_codes(
            Xb,
            state,
            algorithm=self.algorithm,
            alpha=self.alpha,
            n_nonzero_coefs=self.n_nonzero_coefs,
            positive=self.positive_code,
            max_iter=self.max_iter,
            tol=self.tol,
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags
