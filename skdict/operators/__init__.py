"""Dictionaries as operators: what the solvers see of them (:mod:`.base`)."""

from .base import Operator, conjugate_gradient, power_iteration
from .conv import ConvOperator, as_conv_filters, conv_operator
from .dense import DenseOperator, GramOperator, as_operator

__all__ = [
    "ConvOperator",
    "DenseOperator",
    "GramOperator",
    "Operator",
    "as_conv_filters",
    "as_operator",
    "conjugate_gradient",
    "conv_operator",
    "power_iteration",
]
