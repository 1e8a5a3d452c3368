"""
======================================================
Hierarchical sparse predictive coding of image patches
======================================================

:class:`skdict.HierarchicalSparseCoder` stacks sparse coding levels: level 1
explains a whitened image patch ``x`` with sparse codes ``a_1`` over atoms
``D_1``, and level 2 explains (predicts) ``a_1`` with sparse codes ``a_2`` over
atoms ``D_2``. The codes of a patch minimise the free energy::

    F = 0.5 ||x - a_1 D_1||^2 + alpha_1 ||a_1||_1
      + 0.5 ||a_1 - a_2 D_2||^2 + alpha_2 ||a_2||_1

so ``a_1`` is pulled both by the patch (bottom-up) and by the prediction of the
level above (top-down). We learn both levels on natural image patches, look at
the atoms of each level (level-2 atoms drawn in pixel space as ``D_2 D_1``),
follow the free energy of each level over training and compare joint inference
with the greedy bottom-up baseline.
"""

# %%
# Whitened natural image patches
# ------------------------------
import time

import matplotlib.pyplot as plt
import numpy as np

from skdict import HierarchicalSparseCoder
from skdict.datasets import load_natural_patches
from skdict.plotting import plot_dictionary

X = load_natural_patches(patch_size=8, n_patches=6000, whiten="olshausen", downsample=2,
                         random_state=0, dtype=np.float32)
X_train, X_test = X[:5000], X[5000:]
print(X.shape, X.dtype)

# %%
# Learning two levels
# -------------------
# 64 level-1 atoms (a complete dictionary of 8x8 patches) and 16 level-2 atoms.
# Each minibatch alternates joint inference of both levels with an online
# dictionary update per level on its own target: ``D_1`` on the patches,
# ``D_2`` on the level-1 codes.
hsc = HierarchicalSparseCoder(n_components=(64, 16), alpha=(0.8, 0.3), max_iter=4,
                              random_state=0, device="cpu")
t0 = time.perf_counter()
hsc.fit(X_train)
print(f"fit in {time.perf_counter() - t0:.1f} s, {hsc.n_steps_} minibatches")

# %%
# The atoms of each level
# -----------------------
# Level-1 atoms are localised, oriented, band-pass filters, as for a single
# level (see :ref:`sphx_glr_auto_examples_plot_olshausen_field.py`). A level-2
# atom is a pattern of level-1 activity; projected to pixel space through
# ``D_1`` it shows what a unit of the second level predicts in the image.
D1, D2 = hsc.components_
plot_dictionary(D1, (8, 8), title="level 1: D_1")
plot_dictionary(D2 @ D1, (8, 8), title="level 2 in pixel space: D_2 D_1")
plt.show()

# %%
# Free energy per level over training
# -----------------------------------
# ``free_energy_curve_`` holds, per epoch, the mean term of each level of ``F``
# (its weighted squared prediction error plus its L1 penalty) on the minibatch
# codes; the rows sum to ``loss_curve_``.
fig, ax = plt.subplots(figsize=(5, 3.5))
epochs = np.arange(1, len(hsc.loss_curve_) + 1)
for level, curve in enumerate(hsc.free_energy_curve_.T, start=1):
    ax.plot(epochs, curve, "o-", label=f"level {level}")
ax.plot(epochs, hsc.loss_curve_, "k--", label="F (sum)")
ax.set_xlabel("epoch")
ax.set_ylabel("mean free energy per patch")
ax.legend()
fig.tight_layout()
plt.show()

# %%
# Joint versus bottom-up inference
# --------------------------------
# The bottom-up baseline codes each level with an exact lasso of the level
# below and ignores the top-down term. Joint inference starts there and
# minimises ``F`` over both levels at once, so its free energy is never higher;
# it trades a little level-1 reconstruction for codes the second level predicts
# better.
rows = []
for mode in ("bottom_up", "joint"):
    hsc.set_params(inference=mode)
    t0 = time.perf_counter()
    terms = hsc.free_energy(X_test, per_level=True)
    elapsed = time.perf_counter() - t0
    l0 = [c.getnnz(axis=1).mean() for c in hsc.transform_levels(X_test)]
    rows.append((mode, terms.mean(0), terms.sum(1).mean(), l0, elapsed))
    print(f"{mode:>9}: F = {terms.sum(1).mean():.4f} (level 1 {terms[:, 0].mean():.4f}, "
          f"level 2 {terms[:, 1].mean():.4f}), L0 per level {l0[0]:.1f} / {l0[1]:.1f}, "
          f"{elapsed:.2f} s")
print(f"joint / bottom-up free energy: {rows[1][2] / rows[0][2]:.3f}")

fig, ax = plt.subplots(figsize=(5, 3.5))
width = 0.35
for i, (mode, per_level, _, _, _) in enumerate(rows):
    ax.bar(np.arange(2) + (i - 0.5) * width, per_level, width, label=mode)
ax.set_xticks([0, 1], ["level 1", "level 2"])
ax.set_ylabel("mean free energy term")
ax.legend()
fig.tight_layout()
plt.show()
