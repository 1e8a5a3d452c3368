"""torch.nn modules and functions for use inside models (differentiable layers)."""

from .attention import (
    HierarchicalSelection,
    SparseAttention,
    hierarchical_select,
    mean_pool_levels,
    sparse_attention,
    sparse_weights,
)
from .lca import LCALayer, LCAOutput
from .lista import LISTA, alista_weight

__all__ = [
    "HierarchicalSelection",
    "LCALayer",
    "LCAOutput",
    "LISTA",
    "SparseAttention",
    "alista_weight",
    "hierarchical_select",
    "mean_pool_levels",
    "sparse_attention",
    "sparse_weights",
]
