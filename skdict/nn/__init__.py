"""torch.nn modules and functions for use inside models (differentiable layers)."""

from .attention import (
    HierarchicalSelection,
    SparseAttention,
    hierarchical_select,
    mean_pool_levels,
    sparse_attention,
    sparse_weights,
)
from .hierarchical import HierarchicalSparseCoding

__all__ = [
    "HierarchicalSelection",
    "HierarchicalSparseCoding",
    "SparseAttention",
    "hierarchical_select",
    "mean_pool_levels",
    "sparse_attention",
    "sparse_weights",
]
