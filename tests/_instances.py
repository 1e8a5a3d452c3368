"""Small, fast instances of every public estimator for tests/test_common.py.

Add one entry per estimator (and per important configuration). ``EXPECTED``
maps an estimator class name to ``{check_name: reason}`` for checks that are
expected to fail, each with a written reason.
"""

INSTANCES = []
EXPECTED = {}

# ---------------------------------------------------------------- LCASparseCoder
from skdict import LCASparseCoder  # noqa: E402

INSTANCES += [
    LCASparseCoder(n_components=5, alpha=0.1, max_iter=2, fit_max_iter=30, batch_size=16,
                   random_state=0, device="cpu"),
    LCASparseCoder(n_components=4, alpha=0.1, max_iter=2, fit_max_iter=30, batch_size=16,
                   threshold="hard", dict_update="sgd", transform_algorithm="lca",
                   random_state=0, device="cpu"),
    LCASparseCoder(n_components=4, alpha=0.1, max_iter=2, fit_max_iter=30, batch_size=16,
                   fit_algorithm="lca", transform_algorithm="exact", positive_code=True,
                   random_state=0, device="cpu"),
    LCASparseCoder(n_components=4, alpha=0.1, n_steps=3, fit_algorithm="exact",
                   batch_size=16, dead_window=0, forget_window=None, random_state=0,
                   device="cpu"),
]

# ---------------------------------------------------------- SparseTokenSelector
# fit(X) stores X as the tokens; transform(X) selects among them for each row.
from skdict import SparseTokenSelector  # noqa: E402

INSTANCES += [
    SparseTokenSelector(method="lasso", alpha=0.5, device="cpu"),
    SparseTokenSelector(method="threshold", alpha=0.5, keep_ratio=0.5, device="cpu"),
    SparseTokenSelector(method="sparsemax", scale=2.0, device="cpu", tile_size=7),
    SparseTokenSelector(method="topk", keep_ratio=0.3, device="cpu", tile_size=7),
]

# ---------------------------------------------------- CollapsedDictionaryLearner
from skdict import CollapsedDictionaryLearner  # noqa: E402

# n_nonzero_coefs=1: several sklearn checks force n_components=1, and
# n_nonzero_coefs > n_components is (deliberately) a ValueError.
INSTANCES += [
    CollapsedDictionaryLearner(n_components=6, n_nonzero_coefs=1, tile_size=4,
                               batch_size=8, max_iter=2, random_state=0, device="cpu"),
    CollapsedDictionaryLearner(n_components=6, n_nonzero_coefs=1, positive_code=True,
                               routing="approximate", n_clusters=3, n_probes=2,
                               batch_size=8, max_iter=2, random_state=0, device="cpu"),
    CollapsedDictionaryLearner(n_components=6, n_nonzero_coefs=1, n_steps=3, dead_window=0,
                               shuffle=False, batch_size=8, random_state=0, device="cpu"),
]

# ---------------------------------------------------------- KSparseAutoencoder
from skdict import KSparseAutoencoder  # noqa: E402

# k=1: check_fit2d_1feature forces n_components=1, and k > n_components is a
# ValueError by design.
INSTANCES += [
    KSparseAutoencoder(n_components=8, k=1, n_steps=3, batch_size=16, random_state=0,
                       device="cpu"),
    KSparseAutoencoder(n_components=8, k=1, sparsity="batchtopk", n_steps=3,
                       batch_size=16, random_state=0, device="cpu"),
    KSparseAutoencoder(n_components=8, k=1, sparsity="l1", n_steps=3, batch_size=16,
                       random_state=0, device="cpu"),
    KSparseAutoencoder(n_components=8, k=1, sparsity="jumprelu", n_steps=3, batch_size=16,
                       random_state=0, device="cpu"),
    KSparseAutoencoder(n_components=8, k=1, sparsity="matryoshka", n_steps=3,
                       batch_size=16, random_state=0, device="cpu"),
    KSparseAutoencoder(n_components=8, k=1, sparsity="kl", n_steps=3, batch_size=16,
                       random_state=0, device="cpu"),
    KSparseAutoencoder(n_components=8, k=1, sparsity="lifetime", n_steps=3, batch_size=16,
                       random_state=0, device="cpu"),
]

# ---------------------------------------------------------------- LISTAEncoder
from skdict import LISTAEncoder  # noqa: E402

# dictionary=None learns one from X, so every check's width works; n_components=1:
# check_fit2d_1feature has one feature.
INSTANCES += [
    LISTAEncoder(n_components=1, n_layers=2, alpha=0.1, loss="codes", max_iter=2,
                 batch_size=16, random_state=0, device="cpu"),
    LISTAEncoder(n_components=1, n_layers=2, alpha=0.1, variant="lista_cp", loss="objective",
                 max_iter=2, batch_size=16, random_state=0, device="cpu"),
]

# ------------------------------------------------------ HierarchicalSparseCoder
from skdict import HierarchicalSparseCoder  # noqa: E402

INSTANCES += [
    HierarchicalSparseCoder(n_components=(5, 3), alpha=0.1, max_iter=2, fit_max_iter=30,
                            transform_max_iter=60,
                            batch_size=16, random_state=0, device="cpu"),
    HierarchicalSparseCoder(n_components=(4, 2), alpha=0.1, inference="bottom_up",
                            learn_sigma=True, positive_code=True, dict_update="sgd",
                            n_steps=3, batch_size=16, random_state=0, device="cpu"),
]

# ------------------------------------------------ ConvSparseCoder, ConvDictionaryLearning
# image_shape=None: each row is a 1-D signal of the data's width (the checks use
# several widths, down to 2); 2-tap filters fit all but the 1-feature data, which is refused.
import numpy as _np  # noqa: E402

from skdict import ConvDictionaryLearning, ConvSparseCoder  # noqa: E402

INSTANCES += [
    ConvSparseCoder(_np.random.default_rng(0).standard_normal((2, 2)), alpha=0.1,
                    transform_max_iter=50, device="cpu"),
    ConvSparseCoder(_np.random.default_rng(0).standard_normal((2, 2)), alpha=0.1,
                    algorithm="fista", boundary="zero", transform_max_iter=50, device="cpu"),
    ConvDictionaryLearning(2, (2,), alpha=0.1, max_iter=2, fit_max_iter=10,
                           dict_update_iter=3, transform_max_iter=30, random_state=0,
                           device="cpu"),
]
