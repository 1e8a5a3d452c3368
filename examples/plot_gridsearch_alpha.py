"""
=============================================================
Choosing ``alpha`` with GridSearchCV, with and without labels
=============================================================

skdict's coders are scikit-learn transformers, so their sparsity penalty ``alpha`` is
tuned like any other hyper-parameter.

* **With labels**, put the coder in a :class:`~sklearn.pipeline.Pipeline` in front of a
  classifier; the search maximises the classifier's accuracy.
* **Without labels**, the search uses the coder's own ``score``: minus the Bayesian
  information criterion of the codes per sample, with the number of non-zeros as the
  lasso's degrees of freedom. Unlike the lasso objective, which always prefers the
  smallest ``alpha``, it balances the residual against the number of active atoms.
"""

# %%
# Sparse features for digit classification
# ----------------------------------------
# :class:`skdict.LCASparseCoder` learns a dictionary of 64 atoms on the 8x8 digits
# and feeds the sparse codes to a logistic regression.
import time

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from skdict import LCASparseCoder, SparseCoder
from skdict.datasets import make_sparse_data

X_digits, y_digits = load_digits(return_X_y=True)
X_digits = X_digits / 16.0  # pixel values in [0, 1]
X_digits, y_digits = X_digits[:900], y_digits[:900]  # half the set keeps it quick

pipe = make_pipeline(
    LCASparseCoder(n_components=64, max_iter=3, fit_max_iter=50, random_state=0, device="cpu"),
    LogisticRegression(max_iter=500),
)
t0 = time.perf_counter()
search = GridSearchCV(pipe, {"lcasparsecoder__alpha": [0.05, 0.1, 0.2]}, cv=3)
search.fit(X_digits, y_digits)
print(f"searched in {time.perf_counter() - t0:.1f} s")
for alpha, acc in zip(
    search.cv_results_["param_lcasparsecoder__alpha"],
    search.cv_results_["mean_test_score"],
    strict=True,
):
    print(f"alpha={alpha:<5} accuracy={acc:.3f}")
print("best:", search.best_params_)

# %%
# Recovering the sparsity of planted data, without labels
# -------------------------------------------------------
# :func:`skdict.datasets.make_sparse_data` draws signals that use exactly 5 of 128
# unit-norm atoms each, plus a little noise. We code them with the true dictionary
# in a :class:`skdict.SparseCoder` (exact lasso codes) and let ``GridSearchCV`` pick
# ``alpha`` by cross-validated ``score``, without ``y``.
X, dictionary, true_codes = make_sparse_data(
    n_samples=600, n_features=64, n_components=128, n_nonzero_coefs=5,
    noise=0.05, random_state=0,
)
alphas = np.geomspace(0.05, 3.0, 7)
coder = SparseCoder(dictionary, device="cpu")
t0 = time.perf_counter()
search = GridSearchCV(coder, {"alpha": alphas}, cv=3).fit(X)
print(f"searched in {time.perf_counter() - t0:.1f} s")
best = search.best_params_["alpha"]
print(f"chosen alpha = {best:.3f} (grid {alphas[0]:.3f} .. {alphas[-1]:.3f})")

# mean number of non-zeros of the codes along the grid
l0 = [
    SparseCoder(dictionary, alpha=a, device="cpu").fit(X).transform(X).getnnz(axis=1).mean()
    for a in alphas
]
print(f"mean L0 at the chosen alpha: {l0[list(alphas).index(best)]:.2f} (planted: 5)")

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.5))
ax0.semilogx(alphas, search.cv_results_["mean_test_score"], "o-")
ax0.axvline(best, color="C3", ls="--", label="chosen alpha")
ax0.set_xlabel("alpha")
ax0.set_ylabel("score = -BIC per sample")
ax0.legend()
ax1.semilogx(alphas, l0, "o-")
ax1.axhline(5, color="k", ls=":", label="true non-zeros per sample")
ax1.axvline(best, color="C3", ls="--")
ax1.set_xlabel("alpha")
ax1.set_ylabel("mean L0 of the codes")
ax1.legend()
fig.tight_layout()
plt.show()
