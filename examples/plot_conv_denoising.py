"""
=====================================================
Image denoising with convolutional sparse coding
=====================================================

A noisy image is split into a smooth low-pass part (little noise survives the
blur) and a high-pass part, which is coded by :class:`skdict.ConvSparseCoder`
with filters learned on another image; the sparse codes keep the edges and drop
most of the noise. The result is compared, by PSNR, with the noisy input and with
patch-based denoising by :class:`skdict.SparseCoder` (a patch dictionary learned
on the same image, overlapping patches averaged).
"""

import matplotlib.pyplot as plt
import numpy as np
from scipy.ndimage import gaussian_filter
from sklearn.datasets import load_sample_images
from sklearn.feature_extraction.image import (
    extract_patches_2d,
    reconstruct_from_patches_2d,
)

from skdict import ConvDictionaryLearning, ConvSparseCoder, LCASparseCoder, SparseCoder

rng = np.random.default_rng(0)
china, flower = (im.mean(2) / 255.0 for im in load_sample_images().images)
clean = china[120:248, 200:328]
sigma = 0.08
noisy = clean + sigma * rng.standard_normal(clean.shape)


def psnr(img):
    return 10 * np.log10(1.0 / np.mean((img - clean) ** 2))


def lowpass(im):
    return gaussian_filter(im, 2.0, mode="reflect")


# %%
# Filters learned on high-passed crops of the *other* image.
size = 64
train = []
hp_flower = flower - lowpass(flower)
for _ in range(12):
    r, c = rng.integers(0, flower.shape[0] - size), rng.integers(0, flower.shape[1] - size)
    train.append(hp_flower[r:r + size, c:c + size].ravel())
cdl = ConvDictionaryLearning(24, (8, 8), alpha=0.05, image_shape=(size, size), max_iter=5,
                             random_state=0, device="cpu").fit(np.array(train))

# %%
# Convolutional denoising: the high-pass part of the noisy image, coded with a
# larger ``alpha`` (about the noise level), plus its low-pass part.
low = lowpass(noisy)
coder = ConvSparseCoder(cdl.components_, alpha=0.12, image_shape=clean.shape,
                        boundary="zero", algorithm="fista", device="cpu")
high = (noisy - low).reshape(1, -1)
conv_denoised = low + coder.fit(high).inverse_transform(coder.transform(high)).reshape(
    clean.shape)

# %%
# Patch-based denoising: a dictionary of 8x8 patches learned on the other
# image, every overlapping patch of the noisy image coded, patches averaged.
P = extract_patches_2d(hp_flower, (8, 8), max_patches=10000, random_state=0).reshape(-1, 64)
patch_dl = LCASparseCoder(n_components=96, alpha=0.05, fit_algorithm="exact", max_iter=2,
                          random_state=0, device="cpu").fit(P)
patches = extract_patches_2d(noisy - low, (8, 8)).reshape(-1, 64)
pcoder = SparseCoder(patch_dl.components_, alpha=0.12, device="cpu")
denoised_patches = pcoder.inverse_transform(pcoder.fit_transform(patches))
patch_denoised = low + reconstruct_from_patches_2d(denoised_patches.reshape(-1, 8, 8),
                                                   clean.shape)

# %%
results = {"noisy": noisy, "convolutional": conv_denoised, "patch SparseCoder": patch_denoised}
for name, img in results.items():
    print(f"{name:>18}: PSNR {psnr(img):.2f} dB")
fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
for a, (name, img) in zip(axes, [("clean", clean), *results.items()], strict=True):
    a.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
    a.set_title(name if name == "clean" else f"{name}\n{psnr(img):.2f} dB", fontsize=9)
    a.axis("off")
plt.show()
