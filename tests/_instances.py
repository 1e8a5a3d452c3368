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
    LCASparseCoder(n_components=5, alpha=0.1, n_epochs=2, max_iter=30, batch_size=16,
                   random_state=0, device="cpu"),
    LCASparseCoder(n_components=4, alpha=0.1, n_epochs=2, max_iter=30, batch_size=16,
                   threshold="hard", dict_update="sgd", transform_algorithm="lca",
                   random_state=0, device="cpu"),
    LCASparseCoder(n_components=4, alpha=0.1, n_epochs=2, max_iter=30, batch_size=16,
                   transform_algorithm="exact", positive_code=True, random_state=0,
                   device="cpu"),
]
