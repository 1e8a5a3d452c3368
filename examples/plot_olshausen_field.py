"""
==============================================================
Olshausen-Field dictionary learned on natural image patches
==============================================================

Olshausen and Field (1996) showed that a dictionary learned to give *sparse* codes of
whitened natural image patches consists of localised, oriented, band-pass atoms, much
like the receptive fields of simple cells in the primary visual cortex.

We reproduce the experiment on the two photographs shipped with scikit-learn:
12x12 patches, whitened with the paper's ``f * exp(-(f / f0)^4)`` filter, and a
complete dictionary of 144 atoms learned by :class:`skdict.LCASparseCoder`, which
alternates sparse inference (by default the exact lasso codes; ``fit_algorithm="lca"``
runs the locally competitive algorithm) and a dictionary update on minibatches.
"""

# %%
# Whitened natural image patches
# ------------------------------
# The images are downsampled by 2 (block averaging), which removes most of the JPEG
# compression artefacts that whitening would otherwise amplify. Every patch is
# mean-removed and the whole set is scaled to Olshausen and Field's pixel variance
# of 0.1.
import time

import matplotlib.pyplot as plt
import numpy as np

from skdict import LCASparseCoder
from skdict.datasets import load_natural_patches
from skdict.plotting import plot_activation_density, plot_dictionary

X = load_natural_patches(
    patch_size=12,
    n_patches=20_000,
    whiten="olshausen",
    downsample=2,
    random_state=0,
    dtype=np.float32,
) * np.float32(0.1**0.5)
print(X.shape, X.dtype)

# %%
# Learning the dictionary
# -----------------------
# ``alpha`` is the L1 weight of the lasso objective
# ``0.5 * ||x - a D||^2 + alpha * ||a||_1``; on these patches ``alpha = 0.3`` leaves
# about fifteen active atoms per patch. Every other parameter is at its default.
lca = LCASparseCoder(n_components=144, alpha=0.3, random_state=0, device="cpu")
t0 = time.perf_counter()
lca.fit(X)
print(f"fit in {time.perf_counter() - t0:.1f} s, {lca.n_iter_} epochs")

# %%
# The atoms
# ---------
# Each atom is shown with its own symmetric grey scale (zero is mid-grey).
fig = plot_dictionary(lca.components_, (12, 12), title="LCASparseCoder atoms")
plt.show()

# %%
# Convergence and sparsity
# ------------------------
# ``loss_curve_`` records the mean lasso objective of every epoch, evaluated on
# the minibatch codes before each dictionary update (``history_["loss"]`` has one
# value per minibatch). ``transform`` returns the codes
# as a scipy CSR matrix; ``inverse_transform`` reconstructs the patches.
codes = lca.transform(X[:4000])
X_hat = lca.inverse_transform(codes)
l0 = codes.getnnz(axis=1).mean()
rel_err = np.linalg.norm(X[:4000] - X_hat) / np.linalg.norm(X[:4000])
print(f"mean L0 = {l0:.1f} of 144 atoms, relative reconstruction error = {rel_err:.3f}")

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.5))
ax0.plot(np.arange(1, len(lca.loss_curve_) + 1), lca.loss_curve_, "o-")
ax0.set_xlabel("epoch")
ax0.set_ylabel("mean objective per patch")
ax0.set_title("loss_curve_")
plot_activation_density(codes, ax=ax1, bins=20, title="how often each atom fires")
fig.tight_layout()
plt.show()
