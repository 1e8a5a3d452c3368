"""Olshausen-Field benchmark (issue 3, workload 3): time to localized, oriented,
bandpass atoms.

Run::

    python -m benchmarks.olshausen
    python -m benchmarks.olshausen --steps 600 --eval-every 100   # quick look

12x12 patches of Olshausen-Field-whitened images, downsampled by 2 as in the demo
(``load_natural_patches(whiten="olshausen", downsample=2)``, unit pixel variance),
144 atoms, ``alpha=2.5`` (with unit-variance pixels a patch has norm ~12; at
``alpha=0.3`` the codes are dense and no learner localizes its atoms within
thousands of minibatches), minibatches of 256, online (Mairal) dictionary updates
(skdict with ``forget_window=10000``). The atoms are scored with three simple, measurable proxies:

* **localized**: spatial spread, the energy-weighted standard deviation of the
  pixel positions (radial, in pixels); a uniform 12x12 atom has 4.9, a
  localized one < 3;
* **oriented**: anisotropy of the power spectrum,
  ``|sum P(f) exp(2i theta_f)| / sum P(f)`` (0: isotropic, 1: one orientation);
  oriented if > 0.4;
* **bandpass**: the spectral peak (zero-padded 2-D FFT) lies away from DC
  (radius >= 1 cycle/patch) and below Nyquist.

An atom is "Gabor-like" when all three hold; the table prints, for each learner
and checkpoint, the training wall time, the medians and the Gabor-like
fraction, and the script reports the first time each learner reaches 80%
Gabor-like atoms. Learners: skdict ``LCASparseCoder`` with
``fit_algorithm="exact"`` and with ``"lca"``, and SPAMS ``trainDL`` when
installed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ._common import import_spams, machine_info, print_table

ALPHA = 2.5
K = 144
P = 12
BATCH = 256
LEVELS = (0.5, 0.8)


def atom_metrics(D, p=P):
    """Per-atom (spread, anisotropy, peak radius in cycles/patch)."""
    A = D.reshape(-1, p, p)
    E = A**2
    E = E / E.sum((1, 2), keepdims=True)
    yy, xx = np.mgrid[0:p, 0:p]
    my = (E * yy).sum((1, 2))
    mx = (E * xx).sum((1, 2))
    d2 = (yy - my[:, None, None]) ** 2 + (xx - mx[:, None, None]) ** 2
    spread = np.sqrt((E * d2).sum((1, 2)))
    n = 4 * p
    F = np.abs(np.fft.fft2(A, s=(n, n))) ** 2
    fy = np.fft.fftfreq(n)[:, None] * p  # cycles per patch
    fx = np.fft.fftfreq(n)[None, :] * p
    rad = np.sqrt(fy**2 + fx**2)
    theta = np.arctan2(fy, fx)
    w = F * (rad > 0)
    aniso = np.abs((w * np.exp(2j * theta)).sum((1, 2))) / w.sum((1, 2))
    peak = rad.ravel()[F.reshape(F.shape[0], -1).argmax(1)]
    return spread, aniso, peak


def summarize(D):
    s, a, pk = atom_metrics(D)
    gabor = (s < 3.0) & (a > 0.4) & (pk >= 1.0) & (pk < P / 2)
    return {
        "median spread (px)": float(np.median(s)),
        "median anisotropy": float(np.median(a)),
        "median peak (cyc/patch)": float(np.median(pk)),
        "Gabor-like": float(gabor.mean()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-patches", type=int, default=30000)
    p.add_argument("--steps", type=int, default=1500, help="minibatches per learner")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--skip-lca", action="store_true")
    p.add_argument("--downsample", type=int, default=2)
    p.add_argument("--forget-window", type=int, default=10000,
                   help="LCASparseCoder forget_window (0: None, Mairal's schedule)")
    args = p.parse_args(argv)
    from skdict import LCASparseCoder
    from skdict.datasets import load_natural_patches

    print(f"# Olshausen-Field benchmark  ({machine_info()})")
    X = load_natural_patches(patch_size=P, n_patches=args.n_patches, whiten="olshausen",
                             downsample=args.downsample, random_state=0)
    rng = np.random.default_rng(0)
    D0 = X[rng.choice(X.shape[0], K, replace=False)].copy()
    D0 /= np.linalg.norm(D0, axis=1, keepdims=True)
    print(f"{X.shape[0]} whitened {P}x{P} patches (downsample {args.downsample}), {K} atoms, "
          f"alpha={ALPHA}, batch {BATCH}, skdict forget_window={args.forget_window}")
    rows = [{"learner": "initial (random patches)", "minibatches": 0, "time (s)": 0.0,
             **summarize(D0)}]
    first = {}

    def log(name, steps, el, D):
        r = {"learner": name, "minibatches": steps, "time (s)": el, **summarize(D)}
        rows.append(r)
        for level in LEVELS:
            if r["Gabor-like"] >= level and (name, level) not in first:
                first[name, level] = (steps, el)

    algs = ["exact"] if args.skip_lca else ["exact", "lca"]
    for alg in algs:
        name = f"skdict {alg}/online"

        def make(alg=alg):
            return LCASparseCoder(n_components=K, alpha=ALPHA, fit_algorithm=alg, fit_max_iter=200,
                                  dict_init=D0, batch_size=BATCH, random_state=0, device="cpu",
                                  forget_window=args.forget_window or None)

        # warm-up on a throwaway estimator: loads (or compiles) the numba kernels
        # for these shapes once, a one-off cost that SPAMS' prebuilt binary does not pay
        make().partial_fit(X[: 2 * BATCH])
        est = make()
        order = rng.permutation(X.shape[0])
        el, step = 0.0, 0
        while step < args.steps:
            n_b = min(args.eval_every, args.steps - step)
            idx = np.resize(np.roll(order, -step * BATCH), n_b * BATCH)
            t = time.perf_counter()
            est.partial_fit(X[idx])
            el += time.perf_counter() - t
            step += n_b
            log(name, step, el, est.components_)
    spams, why = import_spams()
    if spams is None:
        print(why)
    else:
        for it in range(args.eval_every, args.steps + 1, args.eval_every):
            t = time.perf_counter()
            D = spams.trainDL(np.asfortranarray(X.T), D=np.asfortranarray(D0.T), K=K,
                              lambda1=ALPHA, iter=it, batchsize=BATCH, numThreads=2, mode=2,
                              verbose=False)
            log("SPAMS trainDL (2 thr)", it, time.perf_counter() - t, np.asarray(D.T))
    print_table(rows, ["learner", "minibatches", "time (s)", "median spread (px)",
                       "median anisotropy", "median peak (cyc/patch)", "Gabor-like"],
                "Olshausen-Field: atom shape vs training time")
    print()
    for level in LEVELS:
        spams_t = first.get(("SPAMS trainDL (2 thr)", level), (None, None))[1]
        for name in dict.fromkeys(r["learner"] for r in rows[1:]):
            if (name, level) in first:
                s, t = first[name, level]
                ratio = f"; {t / spams_t:.2f} x SPAMS' time" if spams_t else ""
                print(f"{name}: >= {level:.0%} Gabor-like atoms after {s} minibatches, "
                      f"{t:.2f} s{ratio}")
            else:
                print(f"{name}: did not reach {level:.0%} Gabor-like atoms")


if __name__ == "__main__":
    main()
