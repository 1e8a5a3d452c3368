"""Dictionary update rules (pure torch): online statistics, sparse normal
equations, unit-norm projection, dead-atom resampling.

Each module registers itself here with one import line; append yours.
"""

from . import (
    online,  # noqa: F401
    sparse_stats,  # noqa: F401
)
from .sparse_stats import SparseStats  # noqa: F401
