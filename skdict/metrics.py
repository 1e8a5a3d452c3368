"""Metrics for sparse codes, reconstructions and token selections.

Functions take numpy arrays, scipy sparse matrices or torch tensors and return
Python floats (or small numpy arrays), so they can be used directly as
scikit-learn style scorers or logged during training.
"""

from __future__ import annotations

__all__: list[str] = []
