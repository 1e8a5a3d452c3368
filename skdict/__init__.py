"""skdict: sparse coding and dictionary learning on torch, with a scikit-learn API."""

__version__ = "0.1.0"

from .autoencoder import KSparseAutoencoder  # noqa: E402
from .coding import SparseCoder  # noqa: E402
from .conv import ConvDictionaryLearning, ConvSparseCoder  # noqa: E402
from .functional import sparse_encode  # noqa: E402
from .hierarchical import HierarchicalSparseCoder  # noqa: E402
from .large import CollapsedDictionaryLearner  # noqa: E402
from .lca import LCASparseCoder  # noqa: E402
from .lista import LISTAEncoder  # noqa: E402
from .selection import SparseTokenSelector  # noqa: E402

__all__ = [
    "CollapsedDictionaryLearner",
    "ConvDictionaryLearning",
    "ConvSparseCoder",
    "HierarchicalSparseCoder",
    "KSparseAutoencoder",
    "LCASparseCoder",
    "LISTAEncoder",
    "SparseCoder",
    "SparseTokenSelector",
    "__version__",
    "sparse_encode",
]
