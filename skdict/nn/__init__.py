"""torch.nn modules and functions for use inside models (differentiable layers)."""

from .attention import (
    HierarchicalSelection,
    SparseAttention,
    block_select,
    hierarchical_select,
    mean_pool_levels,
    sparse_attention,
    sparse_weights,
)

__all__ = [
    "HierarchicalSelection",
    "SparseAttention",
    "hierarchical_select",
    "mean_pool_levels",
    "sparse_attention",
    "sparse_weights",
    "block_select",
]
