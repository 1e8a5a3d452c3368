"""Dictionaries as operators: what the solvers see of them (:mod:`.base`)."""

from .base import Operator, power_iteration
from .dense import DenseOperator, GramOperator, as_operator

__all__ = ["DenseOperator", "GramOperator", "Operator", "as_operator", "power_iteration"]
