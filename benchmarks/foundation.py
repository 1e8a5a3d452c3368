"""Exact lasso transform vs scikit-learn's lasso_lars on the demo data.

    python -m benchmarks.foundation [--n-rows 2000] [--alpha 1.0]

Learns the demo's Olshausen-Field dictionary (12x12 O&F-whitened patches, 144
atoms), then encodes the same held-out rows with skdict's SparseCoder (each
algorithm) and scikit-learn's SparseCoder(transform_algorithm="lasso_lars"),
printing time, mean objective, relative objective gap to lasso_lars and mean L0.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n-rows", type=int, default=2000)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = p.parse_args(argv)

    import torch
    from sklearn.decomposition import SparseCoder as SkSparseCoder

    from skdict import LCASparseCoder, SparseCoder
    from skdict.datasets import load_natural_patches

    X = load_natural_patches(
        patch_size=12, n_patches=12000 + args.n_rows, whiten="olshausen", random_state=0
    ).astype(args.dtype)
    X_train, X_test = X[:12000], X[12000:]
    D = (
        LCASparseCoder(144, alpha=args.alpha, max_iter=2, fit_max_iter=30, random_state=0,
                       device="cpu")
        .fit(X_train)
        .components_.astype(args.dtype)
    )

    def objective(A):
        A = A.toarray() if hasattr(A, "toarray") else A
        return float(np.mean(0.5 * ((X_test - A @ D) ** 2).sum(1) + args.alpha * np.abs(A).sum(1)))

    rows = []
    t = time.perf_counter()
    ref = SkSparseCoder(D, transform_algorithm="lasso_lars", transform_alpha=args.alpha)
    ref = ref.transform(X_test)
    t_ref = time.perf_counter() - t
    o_ref = objective(ref)
    rows.append(("sklearn lasso_lars", t_ref, o_ref, (ref != 0).sum(1).mean()))
    for algo in ["exact", "fista", "lca", "ista"]:
        coder = SparseCoder(D, algorithm=algo, alpha=args.alpha, device="cpu",
                            transform_max_iter=5000)
        coder.transform(X_test[:10])  # warm-up
        t = time.perf_counter()
        codes = coder.transform(X_test)
        dt = time.perf_counter() - t
        rows.append((f"skdict {algo}", dt, objective(codes), codes.nnz / codes.shape[0]))
    print(
        f"{len(X_test)} rows x 144 atoms, alpha={args.alpha}, {args.dtype}, "
        f"torch threads={torch.get_num_threads()}"
    )
    print(f"{'solver':<22}{'time s':>9}{'objective':>14}{'rel. gap':>11}{'L0':>7}{'speed-up':>10}")
    for name, dt, o, l0 in rows:
        print(
            f"{name:<22}{dt:>9.3f}{o:>14.6f}{(o - o_ref) / o_ref:>11.1e}{l0:>7.1f}"
            f"{t_ref / dt:>9.1f}x"
        )


if __name__ == "__main__":
    main()
