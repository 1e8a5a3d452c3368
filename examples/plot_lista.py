"""
=====================================================
LISTA: a learned, fixed-depth lasso encoder
=====================================================

:class:`skdict.LISTAEncoder` unrolls ISTA into a network of ``n_layers`` layers and
trains its weights, so that a few layers reach an accuracy that ISTA and FISTA need
many more iterations for.

* On a **compressed-sensing** problem (random dictionary, planted sparse codes) we
  train the coupled-weight network with support selection (``"lista_cp"``) and
  ALISTA on the planted codes and plot the error of each layer next to ISTA and
  FISTA after the same number of iterations.
* On **natural image patches**, LISTA becomes a fast ``transform`` for the dictionary
  of an :class:`skdict.LCASparseCoder`: trained to minimise the lasso objective
  for that dictionary, it encodes new patches in a fixed number of matrix products.
  The default ``variant="auto"`` picks ALISTA when its untrained network codes
  held-out rows at least as well as ISTA, else learned FISTA (``"lfista"``; see
  ``variant_``): here, a complete 64-atom dictionary, ALISTA's analytic weight is
  close to the inverse and wins.
"""

# %%
# Compressed sensing: error per layer
# -----------------------------------
# 100 unit-norm Gaussian atoms in 50 dimensions, codes with 10 % non-zeros.
# ``fit(X, A)`` with ``loss="codes"`` trains on the planted codes ``A``; ``to_module`` returns the
# network (a :class:`skdict.nn.LISTA`), whose ``all_layers=True`` output gives
# every layer's codes.
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from skdict import LCASparseCoder, LISTAEncoder, SparseCoder
from skdict.datasets import load_natural_patches
from skdict.operators import DenseOperator
from skdict.solvers import fista, ista

rng = np.random.default_rng(0)
K, P, n_layers = 100, 50, 10
D = rng.standard_normal((K, P))
D /= np.linalg.norm(D, axis=1, keepdims=True)
A = (rng.random((3300, K)) < 0.1) * rng.standard_normal((3300, K))
X = A @ D
X_train, A_train, X_test, A_test = X[:3000], A[:3000], X[3000:], A[3000:]
alpha = 0.05


def nmse_db(codes):
    codes = np.asarray(codes)
    return 10 * np.log10(np.sum((codes - A_test) ** 2) / np.sum(A_test**2))


curves = {}
for variant in ["lista_cp", "alista"]:
    enc = LISTAEncoder(D, n_layers=n_layers, alpha=alpha, variant=variant, loss="codes",
                       max_iter=10,
                       random_state=0, device="cpu").fit(X_train, A_train)
    with torch.no_grad():
        layers = enc.to_module()(torch.as_tensor(X_test), all_layers=True)
    curves[variant] = [nmse_db(a) for a in layers]

op = DenseOperator(torch.as_tensor(D))
C = op.adjoint(torch.as_tensor(X_test))
for name, solver in [("ISTA", ista), ("FISTA", fista)]:
    curves[name] = [nmse_db(solver(C, op, alpha, xnorm2=None, max_iter=k).codes)
                    for k in range(1, n_layers + 1)]

fig, ax = plt.subplots(figsize=(6, 4))
for name, values in curves.items():
    ax.plot(range(1, n_layers + 1), values, marker="o", label=name)
ax.set_xlabel("layer / iteration")
ax.set_ylabel("NMSE to the planted codes (dB)")
ax.set_title("Held-out rows: learned layers vs iterations")
ax.legend()
fig.tight_layout()

# %%
# A fast transform for a learned dictionary
# -----------------------------------------
# An :class:`~skdict.LCASparseCoder` learns 64 atoms on 8x8 natural image patches.
# A LISTA encoder passed the fitted coder takes its dictionary and its ``alpha``,
# and is trained to minimise the lasso objective of its codes (``fit(X)``). We compare its
# codes on new patches with the exact lasso codes (:class:`~skdict.SparseCoder`).
patches = load_natural_patches(n_patches=6000, random_state=0, dtype=np.float32)
X_fit, X_new = patches[:5000], patches[5000:]
coder = LCASparseCoder(n_components=64, alpha=0.1, fit_algorithm="exact",
                       transform_algorithm="exact", max_iter=2, random_state=0,
                       device="cpu").fit(X_fit)
fast = LISTAEncoder(coder, n_layers=8, max_iter=8, random_state=0, device="cpu").fit(X_fit)
print(f"variant chosen: {fast.variant_}")


def objective(codes):
    codes = codes.toarray()
    r = X_new - codes @ coder.components_
    return np.mean(0.5 * np.sum(r**2, 1) + coder.alpha * np.abs(codes).sum(1))


exact = SparseCoder(coder.components_, alpha=coder.alpha, device="cpu")
for name, est in [("exact lasso", exact), ("LISTA, 8 layers", fast)]:
    t = time.perf_counter()
    codes = est.transform(X_new)
    dt = time.perf_counter() - t
    print(f"{name:16s} objective {objective(codes):.5f}  non-zeros/row "
          f"{codes.getnnz() / codes.shape[0]:5.1f}  {len(X_new) / dt:9.0f} rows/s")

# %%
# ``layer_gap_`` holds the relative gap of each layer's lasso objective to the exact
# optimum on the rows held out of training.
fig, ax = plt.subplots(figsize=(6, 4))
ax.semilogy(range(1, fast.n_layers + 1), fast.layer_gap_, marker="o")
ax.set_xlabel("layer")
ax.set_ylabel("relative objective gap")
ax.set_title("LISTA on natural patches (validation rows)")
fig.tight_layout()
plt.show()
