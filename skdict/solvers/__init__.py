"""Pure torch solvers for sparse coding.

Every function here takes and returns torch tensors (no numpy, no scikit-learn)
and, where it iterates, returns a :class:`SolverResult` with its iteration count
and convergence history. Lasso solvers work in Gram form: ``C = X @ D.T``,
``G = D @ D.T`` and ``xnorm2 = (X**2).sum(1)``.
"""

from ._result import SolverResult
from .decode import dense_decode, sparse_decode, topk_decode
from .exact import lasso_exact
from .ista import fista, ista
from .lca import lca
from .lipschitz import gram, power_iteration
from .objectives import lasso_duality_gap, lasso_objective, lasso_objective_dense
from .omp import omp
from .thresholds import hard_threshold, soft_threshold, threshold, topk_threshold

__all__ = [
    "SolverResult",
    "dense_decode",
    "fista",
    "gram",
    "hard_threshold",
    "ista",
    "lasso_duality_gap",
    "lasso_exact",
    "lasso_objective",
    "lasso_objective_dense",
    "lca",
    "omp",
    "power_iteration",
    "soft_threshold",
    "sparse_decode",
    "threshold",
    "topk_decode",
    "topk_threshold",
]
