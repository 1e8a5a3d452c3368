"""``python -m skdict``: learn an Olshausen-Field dictionary on shipped images.

Extracts O&F-whitened 12x12 patches from the photographs that ship with
scikit-learn (no download), at Olshausen & Field's pixel variance of 0.1, learns
144 atoms with ``LCASparseCoder(n_components=144, alpha=0.3)`` (every other
parameter at its default), prints the time, the mean L0 and the objective, and
writes the atom grid to a PNG file.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m skdict",
        description="Olshausen-Field dictionary learning demo on natural image patches.",
    )
    parser.add_argument("--n-patches", type=int, default=30000)
    parser.add_argument("--patch-size", type=int, default=12)
    parser.add_argument("--n-components", type=int, default=144)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=None,
                        help="passes over the patches (default: the estimator's max_iter)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="olshausen_field_atoms.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from skdict import LCASparseCoder, SparseCoder
    from skdict.datasets import load_natural_patches

    t0 = time.perf_counter()
    X = load_natural_patches(
        patch_size=args.patch_size,
        n_patches=args.n_patches,
        whiten="olshausen",
        downsample=2,
        random_state=args.seed,
        dtype=np.float32,
    )
    X *= np.float32(0.1**0.5)  # Olshausen & Field's pixel variance of 0.1
    t_data = time.perf_counter() - t0
    n_train = len(X) - min(1000, len(X) // 10)
    X_train, X_test = X[:n_train], X[n_train:]
    print(
        f"skdict demo: {len(X)} O&F-whitened {args.patch_size}x{args.patch_size} patches "
        f"from scikit-learn's sample images ({t_data:.1f} s); torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    epochs = {} if args.epochs is None else {"max_iter": args.epochs}
    lca = LCASparseCoder(n_components=args.n_components, alpha=args.alpha,
                         random_state=args.seed, device=args.device, **epochs)
    t0 = time.perf_counter()
    lca.fit(X_train)
    t_fit = time.perf_counter() - t0
    print(f"fit: {t_fit:.1f} s, {lca.n_steps_} minibatches on {lca._device()}")
    print("  epoch objective: " + ", ".join(f"{v:.4f}" for v in lca.loss_curve_))

    coder = SparseCoder(lca.components_, alpha=args.alpha, device=args.device)
    # the first call compiles the CPU kernel (numba, cached on disk for later
    # runs) or warms up the GPU; the second is the steady-state time
    t0 = time.perf_counter()
    coder.transform(X_test)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = coder.transform(X_test)
    t_enc = time.perf_counter() - t0
    X_hat = coder.inverse_transform(codes)
    dense = codes.toarray()
    obj = np.mean(0.5 * ((X_test - X_hat) ** 2).sum(1) + args.alpha * np.abs(dense).sum(1))
    rel_err = np.sum((X_test - X_hat) ** 2) / np.sum(X_test**2)
    l0 = codes.nnz / codes.shape[0]
    print(
        f"held-out exact lasso codes ({len(X_test)} rows, {t_enc:.3f} s; first call "
        f"{t_first:.2f} s, with one-off compilation or warm-up): "
        f"mean L0 = {l0:.1f} of {args.n_components}, objective = {obj:.4f}, "
        f"relative squared error = {rel_err:.3f}"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        from skdict.plotting import plot_dictionary

        fig = plot_dictionary(
            lca.components_,
            (args.patch_size, args.patch_size),
            title=f"Olshausen-Field atoms (alpha={args.alpha})",
        )
        fig.savefig(args.out, dpi=100)
        print(f"atoms written to {args.out}")
    except ImportError:
        print("matplotlib is not installed: skipping the atom grid (pip install skdict[plot])")
    print(f"total: {t_data + t_fit + t_first + t_enc:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
