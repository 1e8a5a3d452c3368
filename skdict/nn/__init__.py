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
from .conv import ConvSparseCoding, conv_sparse_coding
from .hierarchical import HierarchicalSparseCoding
from .lca import LCALayer, LCAOutput
from .lista import LISTA, alista_weight

__all__ = [
    "ConvSparseCoding",
    "HierarchicalSelection",
    "HierarchicalSparseCoding",
    "LCALayer",
    "LCAOutput",
    "LISTA",
    "SparseAttention",
    "alista_weight",
    "conv_sparse_coding",
    "hierarchical_select",
    "mean_pool_levels",
    "sparse_attention",
    "sparse_weights",
    "block_select",
]
