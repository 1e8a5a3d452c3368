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


def natural_patch_split(sizes, n_test, patch_size=8, *, tile=16, test_fraction=0.1, seed=0,
                        dtype=np.float64):
    """Distinct natural patches in disjoint sets, and held-out patches that share
    no pixel with any of them.

    The images of :func:`skdict.datasets.load_natural_images` are cut into
    ``tile x tile`` tiles and a ``test_fraction`` of the tiles, drawn at random,
    is held out. The ``n_test`` held-out patches lie inside held-out tiles; the
    patches of ``sizes`` (e.g. the dictionary's rows and the encoders' training
    rows) are drawn without replacement from the positions whose patch touches
    no held-out tile, so no position repeats and no held-out pixel is trained on.
    Patches are mean-removed and scaled to unit norm, as :func:`natural_patches`
    (flat patches are redrawn). Small tiles spread the held-out patches over
    many parts of the images (16 pixels: about 200 tiles; with 32, 1000 held-out
    patches came from ~50 tiles and their gaps said more about those tiles than
    about the encoder).

    Returns
    -------
    list of ndarray: one ``(n, patch_size ** 2)`` array per entry of ``sizes``,
    then the held-out array.
    """
    from skdict.datasets import load_natural_images

    rng = np.random.default_rng(seed)
    imgs = load_natural_images()
    p = patch_size
    train_pos, test_pos = [], []
    for i, img in enumerate(imgs):
        h, w = img.shape
        th, tw = -(-h // tile), -(-w // tile)
        held = rng.random((th, tw)) < test_fraction
        pix = np.repeat(np.repeat(held, tile, 0), tile, 1)[:h, :w].astype(np.int64)
        # held-out pixels in each p x p window, from a summed-area table
        S = np.zeros((h + 1, w + 1), dtype=np.int64)
        S[1:, 1:] = pix.cumsum(0).cumsum(1)
        win = S[p:, p:] - S[:-p, p:] - S[p:, :-p] + S[:-p, :-p]
        for pos, ok in ((train_pos, win == 0), (test_pos, win == p * p)):
            ys, xs = np.nonzero(ok)
            pos.append(np.stack([np.full(ys.size, i), ys, xs], 1))
    offs = np.arange(p)

    def draw(pool, n):
        idx = rng.permutation(len(pool))
        out, start = [], 0
        while sum(len(o) for o in out) < n:
            take = pool[idx[start:start + n - sum(len(o) for o in out)]]
            if not len(take):
                raise ValueError(f"only {len(pool)} distinct positions; asked for more")
            start += len(take)
            X = np.empty((len(take), p * p))
            for i, img in enumerate(imgs):
                m = take[:, 0] == i
                ys, xs = take[m, 1], take[m, 2]
                X[m] = img[ys[:, None, None] + offs[None, :, None],
                           xs[:, None, None] + offs[None, None, :]].reshape(-1, p * p)
            X -= X.mean(1, keepdims=True)
            nrm = np.linalg.norm(X, axis=1, keepdims=True)
            keep = nrm[:, 0] > 1e-8
            out.append(X[keep] / nrm[keep])
        return np.ascontiguousarray(np.concatenate(out), dtype=dtype), idx[start:]

    train_pool, test_pool = np.concatenate(train_pos), np.concatenate(test_pos)
    if sum(sizes) > len(train_pool):
        raise ValueError(f"{sum(sizes)} training patches asked for; the images have "
                         f"{len(train_pool)} positions outside the held-out tiles")
    outs, rest = [], train_pool
    for n in sizes:
        X, left = draw(rest, n)
        outs.append(X)
        rest = rest[left]
    outs.append(draw(test_pool, n_test)[0])
    return outs
