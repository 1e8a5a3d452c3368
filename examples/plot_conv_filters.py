"""
===================================================
Convolutional filters learned on natural images
===================================================

:class:`skdict.ConvDictionaryLearning` learns a bank of small filters that,
shifted everywhere, reconstruct whole images sparsely (no patch extraction).
Here 24 filters of 8 x 8 pixels are learned on high-passed crops of the
scikit-learn sample images, and one held-out crop is coded with them.
"""

import matplotlib.pyplot as plt
import numpy as np
from scipy.ndimage import gaussian_filter
from sklearn.datasets import load_sample_images

from skdict import ConvDictionaryLearning
from skdict.plotting import plot_dictionary

# %%
# High-passed grey-level crops: the filters model edges and textures, the
# smooth part of the image is left to a low-pass.
rng = np.random.default_rng(0)
images = [im.mean(2) / 255.0 for im in load_sample_images().images]
size = 64


def highpass(im):
    return im - gaussian_filter(im, 2.0, mode="wrap")


crops = []
for im in images:
    hp = highpass(im)
    for _ in range(8):
        r, c = rng.integers(0, hp.shape[0] - size), rng.integers(0, hp.shape[1] - size)
        crops.append(hp[r:r + size, c:c + size])
X = np.stack(crops).reshape(len(crops), -1)
X_train, X_test = X[:-1], X[-1:]

# %%
# Learn the filters: minibatches of 4 crops, ADMM coding, online filter update.
cdl = ConvDictionaryLearning(24, (8, 8), alpha=0.05, image_shape=(size, size), max_iter=6,
                             random_state=0, device="cpu").fit(X_train)
print(f"epoch objectives: {np.round(cdl.loss_curve_, 3)}")
plot_dictionary(cdl.components_, title="24 learned 8x8 filters")

# %%
# Code the held-out crop: 24 sparse maps of 64 x 64 reconstruct it.
codes = cdl.transform(X_test)
recon = cdl.inverse_transform(codes)
density = codes.nnz / codes.shape[1]
fig, axes = plt.subplots(1, 2, figsize=(6, 3))
for a, img, t in zip(axes, [X_test[0], recon[0]],
                     ["held-out crop (high-passed)", f"reconstruction ({density:.1%} non-zero)"],
                     strict=True):
    a.imshow(img.reshape(size, size), cmap="gray")
    a.set_title(t, fontsize=9)
    a.axis("off")
plt.show()
