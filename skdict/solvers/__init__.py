"""Pure torch solvers for sparse coding.

Every function here takes and returns torch tensors (no numpy, no scikit-learn)
and, where it iterates, returns a :class:`SolverResult` with its iteration count
and convergence history. Lasso solvers work on the correlations
``C = op.adjoint(X)`` (``X @ D.T``) and ``xnorm2 = (X**2).sum(1)``; the iterative
ones (ISTA, FISTA, LCA) use only the operator's ``normal`` and ``lipschitz``
(:mod:`skdict.operators`), the exact homotopy / active set and OMP the Gram
matrix ``G = D @ D.T``. Each algorithm registers itself by name in
:mod:`.registry` (one file each).
"""

from ..operators import power_iteration
from ..penalties import hard_threshold, soft_threshold, threshold, topk_threshold
from ._result import SolverResult
from .active_set import lasso_active_set
from .admm import admm
from .decode import dense_decode, sparse_decode, topk_decode
from .exact import lasso_exact, lasso_exact_compact
from .fista import fista
from .ista import ista
from .lca import lca
from .objectives import lasso_duality_gap, lasso_objective, lasso_objective_dense
from .omp import omp
from .registry import get_solver, register, solver_names

__all__ = [
    "SolverResult",
    "admm",
    "dense_decode",
    "fista",
    "get_solver",
    "hard_threshold",
    "ista",
    "lasso_active_set",
    "lasso_duality_gap",
    "lasso_exact",
    "lasso_exact_compact",
    "lasso_objective",
    "lasso_objective_dense",
    "lca",
    "omp",
    "power_iteration",
    "register",
    "soft_threshold",
    "solver_names",
    "sparse_decode",
    "threshold",
    "topk_decode",
    "topk_threshold",
]
