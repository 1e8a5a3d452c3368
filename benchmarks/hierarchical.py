"""HierarchicalSparseCoder: joint vs bottom-up inference, linear probes per level,
inference time vs number of levels.

Run ``python -m benchmarks.hierarchical`` (``--quick`` for a smaller run,
``--device cuda`` for the GPU, ``--parts`` to select)::

    python -m benchmarks.hierarchical --quick
    python -m benchmarks.hierarchical --device cuda --quick

Parts
-----
energy  digits and whitened natural patches: one two-level model per data set
        (fitted with joint inference); mean free energy of held-out rows with joint
        and bottom-up inference on that same model, per level, and the ratio.
probe   logistic regression on each level's codes (digits: the digit; patches:
        which photograph the patch comes from) vs a single-level LCASparseCoder
        with as many atoms as the top level, fitted with the same epochs.
levels  inference time of joint and bottom-up inference for 1..4 levels (the same
        rows, dictionaries fitted level by level), iterations, and the ratio to one
        level.
device  with ``--device cuda``: the same transform on CPU and on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from benchmarks._common import timed  # noqa: I001 (sets OMP_WAIT_POLICY before torch loads)
from skdict import HierarchicalSparseCoder, LCASparseCoder


def _scale(X):
    X = X - X.mean(1, keepdims=True)
    return np.ascontiguousarray(X / np.sqrt(np.mean(X**2)), dtype=np.float32)


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return _scale(d.data.astype(np.float64)), d.target


def patches(n):
    from skdict.datasets import load_natural_patches

    parts = [load_natural_patches(patch_size=8, n_patches=n // 2, whiten="olshausen",
                                  downsample=2, images=img, random_state=i)
             for i, img in enumerate(("china", "flower"))]
    X = np.concatenate(parts)
    y = np.repeat([0, 1], [len(p) for p in parts])
    perm = np.random.default_rng(0).permutation(len(X))
    return _scale(X[perm]), y[perm]


SETTINGS = {  # sizes and alpha per data set (about 10% of level-1 atoms active)
    "digits": {"n_components": (64, 16), "alpha": (0.5, 0.2)},
    "patches": {"n_components": (64, 16), "alpha": (0.8, 0.3)},
}


def _split(X, y, frac=0.7):
    n = int(frac * len(X))
    return X[:n], X[n:], y[:n], y[n:]


def _table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)))


_FITTED = {}


def _fit(name, X, args):
    """The two-level model of a data set (fitted once per device, shared by the parts)."""
    key = (name, args.device, len(X))
    if key not in _FITTED:
        params = {**SETTINGS[name], "max_iter": args.epochs, "random_state": 0,
                  "device": args.device}
        t0 = time.perf_counter()
        _FITTED[key] = HierarchicalSparseCoder(**params).fit(X)
        print(f"[fit {name} on {args.device}: {time.perf_counter() - t0:.1f} s]")
    return _FITTED[key]


def part_energy(data, args):
    rows = []
    for name, (X, y) in data.items():
        Xtr, Xte, _, _ = _split(X, y)
        est = copy.deepcopy(_fit(name, Xtr, args))
        res = {}
        for mode in ("bottom_up", "joint"):
            est.set_params(inference=mode)
            t, terms = timed(lambda e=est, x=Xte: e.free_energy(x, per_level=True))
            res[mode] = (terms.astype(np.float64).mean(0), t)
        bu, jt = res["bottom_up"], res["joint"]
        rows.append((name, f"{bu[0].sum():.4f}", f"{jt[0].sum():.4f}",
                     f"{jt[0].sum() / bu[0].sum():.4f}",
                     " / ".join(f"{v:.3f}" for v in bu[0]),
                     " / ".join(f"{v:.3f}" for v in jt[0]),
                     f"{bu[1]:.2f}", f"{jt[1]:.2f}", f"{jt[1] / bu[1]:.1f}"))
    _table("Free energy of held-out rows, same model (mean per row)",
           ["data", "F bottom-up", "F joint", "joint/bu", "per level bu", "per level joint",
            "t bu [s]", "t joint [s]", "t ratio"], rows)


def part_probe(data, args):
    from sklearn.linear_model import LogisticRegression

    def probe(Ztr, Zte, ytr, yte):
        clf = LogisticRegression(max_iter=2000).fit(Ztr, ytr)
        return clf.score(Zte, yte)

    rows = []
    for name, (X, y) in data.items():
        Xtr, Xte, ytr, yte = _split(X, y)
        est = _fit(name, Xtr, args)
        Ltr, Lte = est.transform_levels(Xtr), est.transform_levels(Xte)
        K_top = est.n_components_[-1]
        lca = LCASparseCoder(n_components=K_top, alpha=SETTINGS[name]["alpha"][0],
                             max_iter=args.epochs, random_state=0, device=args.device).fit(Xtr)
        acc_lca = probe(lca.transform(Xtr), lca.transform(Xte), ytr, yte)
        acc = [probe(a, b, ytr, yte) for a, b in zip(Ltr, Lte, strict=True)]
        l0 = [f"{c.getnnz(axis=1).mean():.1f}" for c in Lte]
        rows.append((name, f"{probe(Xtr, Xte, ytr, yte):.3f}",
                     *(f"{a:.3f} (K={k}, L0 {z})" for a, k, z in
                       zip(acc, est.n_components_, l0, strict=True)),
                     f"{acc_lca:.3f} (K={K_top})", f"{acc[-1] / acc_lca:.3f}"))
    _table("Logistic-regression probe accuracy on held-out rows",
           ["data", "raw X", "level 1", "level 2", "LCA 1 level", "level 2 / LCA"], rows)


def part_levels(data, args):
    X, y = data["patches"]
    Xtr, Xte, _, _ = _split(X, y)
    Xte = Xte[: args.n_time]
    sizes = (64, 32, 16, 8)
    alphas = (0.8, 0.3, 0.15, 0.08)
    full = HierarchicalSparseCoder(n_components=sizes, alpha=alphas, max_iter=args.epochs,
                                   random_state=0, device=args.device).fit(Xtr)
    rows = []
    base = {}
    for L in range(1, 5):
        est = HierarchicalSparseCoder(n_components=sizes[:L], alpha=alphas[:L],
                                      device=args.device)
        est.fit(Xtr[:64])  # fitted attributes, then the dictionaries of the full model
        est.components_ = [D.copy() for D in full.components_[:L]]
        row = [L]
        for mode in ("bottom_up", "joint"):
            est.set_params(inference=mode)
            t, _ = timed(lambda e=est: e.transform(Xte), repeats=2)
            base.setdefault(mode, t)
            row += [f"{t:.3f}", f"{t / base[mode]:.2f}"]
        rows.append(tuple(row))
    _table(f"Inference time vs number of levels ({len(Xte)} patches, sizes {sizes}, "
           f"device {args.device})",
           ["levels", "bottom-up [s]", "x 1 level", "joint [s]", "x 1 level"], rows)


def part_device(data, args):
    if not torch.cuda.is_available():
        print("\n[device] CUDA not available: skipped")
        return
    X, y = data["patches"]
    Xtr, Xte, _, _ = _split(X, y)
    fits = {}
    for dev in ("cpu", "cuda"):
        params = {**SETTINGS["patches"], "max_iter": args.epochs, "random_state": 0,
                  "device": dev}
        t0 = time.perf_counter()
        fits[dev] = (HierarchicalSparseCoder(**params).fit(Xtr), time.perf_counter() - t0)
    est = fits["cpu"][0]
    rows = [("fit (joint)", f"{fits['cpu'][1]:.2f}", f"{fits['cuda'][1]:.2f}",
             f"{fits['cpu'][1] / fits['cuda'][1]:.1f}",
             f"{fits['cpu'][0].loss_curve_[-1]:.4f}", f"{fits['cuda'][0].loss_curve_[-1]:.4f}")]
    for mode in ("bottom_up", "joint"):
        est.set_params(inference=mode, device="cpu")
        t_cpu, F_cpu = timed(lambda: est.free_energy(Xte).mean(), repeats=2)
        est.set_params(device="cuda")
        est.free_energy(Xte[:256])  # warm-up
        t_gpu, F_gpu = timed(lambda: est.free_energy(Xte).mean(), repeats=2)
        rows.append((f"free_energy ({mode})", f"{t_cpu:.3f}", f"{t_gpu:.3f}",
                     f"{t_cpu / t_gpu:.1f}", f"{F_cpu:.5f}", f"{F_gpu:.5f}"))
    _table(f"CPU vs GPU, same data ({len(Xtr)} training / {len(Xte)} held-out patches; "
           "the free energy rows use the CPU-fitted model on both devices)",
           ["what", "CPU [s]", "GPU [s]", "speed-up", "F CPU", "F GPU"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="energy,probe,levels,device")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n-patches", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n-time", type=int, default=4000)
    args = p.parse_args(argv)
    if args.quick:
        args.n_patches, args.epochs, args.n_time = 6000, 2, 1000
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}, epochs {args.epochs}, patches {args.n_patches}")
    data = {"digits": digits(), "patches": patches(args.n_patches)}
    parts = args.parts.split(",")
    for name, fn in (("energy", part_energy), ("probe", part_probe), ("levels", part_levels),
                     ("device", part_device)):
        if name in parts and (name != "device" or args.device != "cpu"):
            t0 = time.perf_counter()
            fn(data, args)
            print(f"[{name}: {time.perf_counter() - t0:.1f} s]")


if __name__ == "__main__":
    main()
