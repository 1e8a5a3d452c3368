"""Shared helpers of the speed benchmarks: data, SPAMS import, timing,
objectives and table printing."""

from __future__ import annotations

import os
import time

# SPAMS and torch use OpenMP; on a shared, oversubscribed machine spinning
# threads waste the cores, so ask for passive waiting before either is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402


def natural_patches(n, patch_size=8, *, whiten=None, seed=0, dtype=np.float64):
    """Mean-removed natural image patches, each scaled to unit norm (the classic
    setting of Mairal et al. for ``alpha`` around 0.1-0.2), from the images that
    ship with scikit-learn (:func:`skdict.datasets.load_natural_patches`)."""
    from skdict.datasets import load_natural_patches

    X = load_natural_patches(
        patch_size=patch_size,
        n_patches=n,
        whiten=whiten,
        normalize=whiten is None,
        random_state=seed,
        dtype=np.float64,
    )
    if whiten is None:
        keep = np.linalg.norm(X, axis=1) > 0
        X = X[keep]
    return np.ascontiguousarray(X, dtype=dtype)


def import_spams():
    """``(spams_module, None)`` or ``(None, reason)``."""
    try:
        import spams  # noqa: F401

        return spams, None
    except Exception as exc:  # pragma: no cover - depends on the environment
        return None, f"SPAMS not available ({type(exc).__name__}: {exc}); pip install spams-bin"


def lasso_objective(X, A, D, alpha):
    """Per-row ``0.5 ||x - a D||^2 + alpha ||a||_1`` in float64 (A dense or sparse)."""
    import scipy.sparse as sp

    X = np.asarray(X, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    if sp.issparse(A):
        A = A.astype(np.float64)
        R = X - A @ D
        l1 = np.asarray(abs(A).sum(1)).ravel()
    else:
        A = np.asarray(A, dtype=np.float64)
        R = X - A @ D
        l1 = np.abs(A).sum(1)
    return 0.5 * (R * R).sum(1) + alpha * l1


def l0(A):
    import scipy.sparse as sp

    if sp.issparse(A):
        return A.getnnz() / A.shape[0]
    return float((np.asarray(A) != 0).sum(1).mean())


def timed(fn, repeats=1):
    """``(best_wall_seconds, result)`` over ``repeats`` runs."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def print_table(rows, columns, title=None):
    """Print a list of dicts as a fixed-width table (missing entries blank)."""
    if title:
        print(f"\n## {title}\n")
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000 or (abs(v) < 1e-3 and v != 0):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def machine_info():
    import torch

    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
