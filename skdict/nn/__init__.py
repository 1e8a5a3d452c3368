"""torch.nn modules and functions for use inside models (differentiable layers)."""

from .attention import (
    HierarchicalSelection,
    SparseAttention,
    hierarchical_select,
    mean_pool_levels,
    sparse_attention,
    sparse_weights,
)
from .conv import ConvSparseCoding, conv_sparse_coding

__all__ = [
    "ConvSparseCoding",
    "HierarchicalSelection",
    "SparseAttention",
    "conv_sparse_coding",
    "hierarchical_select",
    "mean_pool_levels",
    "sparse_attention",
    "sparse_weights",
]
